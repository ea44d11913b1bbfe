"""The README's install line and .ci/apt-packages name the same packages."""

from __future__ import annotations

import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent.parent
# docs/development.md: dashboard tests (chromium) and the ACME test (pebble) only
TEST_ONLY = {"chromium", "chromium-driver", "pebble"}


class InstallDocsTests(SynchronousTestCase):
    def test_readme_apt_line_matches_ci_packages(self) -> None:
        """The README's one ``apt-get install`` line lists exactly the packages of
        .ci/apt-packages that are not test-only, and it includes nftables: a node
        installed by the README gets its network fence (a runner without it refuses
        to start)."""
        lines = re.findall(r"^apt-get install (.+)$", (ROOT / "README.md").read_text(),
                           re.MULTILINE)
        self.assertEqual(len(lines), 1, lines)
        readme = set(lines[0].split())
        ci = {line.strip() for line in (ROOT / ".ci" / "apt-packages").read_text().splitlines()
              if line.strip()}
        self.assertIn("nftables", readme)
        self.assertEqual(readme, ci - TEST_ONLY)
        self.assertLessEqual(TEST_ONLY, ci)

    def test_readme_quick_start_from_any_clone(self) -> None:
        """The README's quick start names one absolute data dir, and ``epio login`` reads
        the admin token from that dir: the same commands work from any clone, root's 0700
        home included (tests/integration/node/test_quickstart_home.py runs them); its
        first command puts ``epio`` on PATH."""
        readme = (ROOT / "README.md").read_text()
        section = readme.split("## Start a single-box node", 1)[1].split("\n## ", 1)[0]
        blocks = re.findall(r"^```sh\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
        node, cli = [b for b in blocks if not b.startswith("apt-get ")]
        self.assertIn('export PATH="$PWD/.venv/bin:$PATH"', node.splitlines()[0])
        dirs = re.findall(r"^twistd -n .*--data-dir (\S+)$", node, re.MULTILINE)
        self.assertEqual(len(dirs), 1, node)
        self.assertTrue(dirs[0].startswith("/"), dirs)
        self.assertRegex(cli, rf"(?m)^epio login --api \S+ < {re.escape(dirs[0])}/admin-token$")
