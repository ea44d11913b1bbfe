"""The runner's peers for image fetches (epio.runner.service.PeerRunners), from a real
store."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from epio.runner.service import PeerRunners
from epio.store import open_store


class PeerOrderTests(TestCase):
    async def test_most_recently_seen_first(self) -> None:
        """Peers come most recently seen first, never this runner itself: a runner whose
        host died (still registered, silent) is asked last, so an image fetch does not
        wait out runner.fetch_timeout on it before a live peer."""
        tmp = Path(tempfile.mkdtemp(prefix="epio-peers-"))
        self.addCleanup(shutil.rmtree, tmp, True)
        store = await open_store(f"sqlite:///{tmp / 'store.sqlite3'}", reactor)
        self.addCleanup(store.close)
        for at, node in ((100.0, "h5"), (150.0, "h6"), (140.0, "h7"), (160.0, "h11")):
            await store.upsert_node(node, ["runner"], f"tcp://{node}:7731", "boot",
                                    last_seen=at)
        ready = type("Ready", (), {"whenReady": lambda self: defer.succeed(store)})()
        peers = PeerRunners(ready, "h11", "tcp://h11:7731", lambda eps: None)  # type: ignore[arg-type,return-value]
        self.assertEqual(await peers.endpoints(),
                         ["tcp://h6:7731", "tcp://h7:7731", "tcp://h5:7731"])
