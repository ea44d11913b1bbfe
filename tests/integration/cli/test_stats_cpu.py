"""CPU per instance in the stats, from the runner's cgroups, on a real node.

A real single-box node (``twistd -n epio --role=all``, tests.integration.run.helpers
.RunNode) and the real CLI; a real build of an app whose ``burner`` process spins
on one core while its ``idler`` sleeps.  The runner samples each instance's
``cpuacct.usage`` every ``runner.stats_interval`` and sends the share of a core
used since the previous sample (``cpu_percent``); ``epio stats`` shows it in
percent, per instance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.run.helpers import RunNode, skip_reason, wait_until

BURN = "while True:\n    pass\n"
IDLE = "import time\nwhile True:\n    time.sleep(1)\n"


def cpuacct_usable() -> bool:
    return Path("/sys/fs/cgroup/cpuacct/cpuacct.usage").exists()


class StatsCpuTests(SynchronousTestCase):
    def setUp(self) -> None:
        if skip_reason():
            self.skipTest(skip_reason() or "")
        if not cpuacct_usable():
            self.skipTest("no cgroup v1 cpuacct controller on this host")
        self.node = RunNode(runner={"stats_interval": 1.0},
                            logger={"stats_flush_delay": 1.0, "maintenance_interval": 0.5},
                            app="burn")
        self.addCleanup(self.node.close)
        self.node.start(seed=False)
        self.dir = self.node.tmp / "apps" / "burn"
        self.dir.mkdir(parents=True)
        (self.dir / "burn.py").write_text(BURN)
        (self.dir / "idle.py").write_text(IDLE)
        (self.dir / "Procfile").write_text("burner: python burn.py\nidler: python idle.py\n")
        (self.dir / "requirements.txt").write_text("")

    def epio(self, *args: str) -> str:
        return self.node.epio(*args, "--app", "burn", timeout=240)[1]

    def test_cpu_of_a_busy_and_an_idle_process(self) -> None:
        """The spinning process's cpu_percent is well above the sleeping one's (which is
        about 0) in the stats series, per instance; `epio stats --metric cpu` shows both
        with a % unit; the API lists cpu_percent among the metrics."""
        self.node.epio("deploy", str(self.dir), "--app", "burn", "--poll", "0.2", timeout=240)

        def series() -> dict[str, Any] | None:
            got = json.loads(self.epio("stats", "--metric", "cpu", "--json"))["series"]
            burner = [v for _, v in got.get("cpu_percent:burner.1", [])]
            idler = [v for _, v in got.get("cpu_percent:idler.1", [])]
            # a full bucket of each (the first sample of an instance has no CPU share)
            return got if len(burner) >= 2 and idler else None

        got = wait_until("cpu_percent of both instances", series, timeout=90, interval=1.0)
        burner = [v for _, v in got["cpu_percent:burner.1"]]
        idler = [v for _, v in got["cpu_percent:idler.1"]]
        # two cores shared with other work: a spinning process still gets a good part of one
        self.assertGreater(max(burner), 25.0, got)
        self.assertLessEqual(max(burner), 100.0 * 1.2, got)  # one thread: one core at most
        self.assertLess(max(idler), 5.0, got)
        text = self.epio("stats", "--metric", "cpu")
        rows = {line.split()[1]: line.split() for line in text.splitlines()
                if line.startswith("cpu_percent ")}
        self.assertEqual(set(rows), {"burner.1", "idler.1"}, text)
        for row in rows.values():
            self.assertTrue(all(v.endswith("%") for v in row[2:5]), text)
        _, _, err = self.node.epio("stats", "--app", "burn", "--metric", "cpux", check=False)
        self.assertIn("cpu_percent", err)
