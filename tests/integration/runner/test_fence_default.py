"""Secure by default: a real ``twistd epio`` runner without a working network fence
refuses to start unless the operator turned the fence off, and then says so."""

from __future__ import annotations

import os
import shutil
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.util import NodeProcess, isolated_config, to_toml

# a PATH without /usr/sbin and /sbin: nft (nftables) is not found, as on a host
# where the package is missing
NO_NFT_PATH = "/usr/bin:/bin"
START_TIMEOUT = 60.0  # seconds a node may take to start or to give up


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (a non-root runner is refused for another reason)"
    if any(shutil.which("nft", path=d) for d in NO_NFT_PATH.split(":")):
        return f"nft is on {NO_NFT_PATH}: cannot simulate a host without it"
    return None


class FenceDefaultTests(SynchronousTestCase):
    skip = skip_reason()

    def node(self, runner: dict[str, object]) -> NodeProcess:
        doc, _ = isolated_config({"runner": runner})
        node = NodeProcess(["--role=runner"], config=to_toml(doc), env={"PATH": NO_NFT_PATH})
        self.addCleanup(node.cleanup)
        return node

    def test_runner_without_nft_refuses_to_start(self) -> None:
        """With the default config on a host without nft the node exits non-zero
        before the reactor runs, saying why and how to run unfenced."""
        node = self.node({})
        deadline = time.monotonic() + START_TIMEOUT
        while node.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertIsNotNone(node.proc.returncode, node.output())
        self.assertNotEqual(node.proc.returncode, 0, node.output())
        out = node.output()
        self.assertIn("the runner cannot install its network fence: nft (nftables) is not "
                      "installed", out)
        self.assertIn('runner.fence = "off"', out)

    def test_fence_off_starts_and_says_so(self) -> None:
        """With runner.fence = "off" the same runner starts, and its start-up log says
        the fence is off and why."""
        node = self.node({"fence": "off"})
        node.wait_for_log("runner isolation OFF: network fence: disabled by runner.fence = off",
                          timeout=START_TIMEOUT)
        node.stop()
