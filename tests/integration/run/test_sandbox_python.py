"""The sandbox a Python process expects (issue 16): a private, writable, bounded
/dev/shm, so multiprocessing locks, pools and tempfile work in an app's process.

A real node (``--role=all``, root, bubblewrap) with ``runner.shm_mb = 8``; the
commands run through ``epio run`` in the app's real sandbox (its UID, its image).
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.run.helpers import RunNode, skip_reason

PROBE = """\
import errno, json, multiprocessing, os, tempfile
out = {"uid": os.getuid(), "before": sorted(os.listdir("/dev/shm"))}
lock = multiprocessing.Lock()  # a POSIX semaphore in /dev/shm
with lock:
    out["lock"] = True
with multiprocessing.Pool(2) as pool:  # worker processes + their queues' semaphores
    out["pool"] = pool.map(abs, [-1, -2, -3])
with tempfile.NamedTemporaryFile(dir=None) as f:
    f.write(b"x")
    out["tempdir"] = os.path.dirname(f.name)
st = os.statvfs("/dev/shm")
out["shm_bytes"] = st.f_blocks * st.f_frsize
open("/dev/shm/mine-%d" % os.getpid(), "w").write("x")
try:
    with open("/dev/shm/big", "wb") as f:
        f.write(b"\\0" * (9 * 1024 * 1024))
    out["overflow"] = "fits"
except OSError as e:
    out["overflow"] = errno.errorcode[e.errno]
print(json.dumps(out))
"""


class SandboxPythonTests(SynchronousTestCase):
    def setUp(self) -> None:
        if skip_reason():
            self.skipTest(skip_reason() or "")
        self.node = RunNode(runner={"shm_mb": 8})
        self.addCleanup(self.node.close)
        self.node.start(files={"probe.py": PROBE})

    def probe(self) -> dict[str, object]:
        _, out, _ = self.node.epio("run", "--app", "hello", "--", "python", "probe.py")
        return json.loads(out.strip().splitlines()[-1])

    def test_multiprocessing_and_tempfile_work_in_a_private_bounded_shm(self) -> None:
        """As the app's UID: multiprocessing.Lock() and Pool work, tempfile writes to
        the private /tmp; /dev/shm is runner.shm_mb (8 MiB) big, writing past it fails
        with ENOSPC, and what one session left there is not seen by the next."""
        first = self.probe()
        self.assertNotEqual(first["uid"], 0)
        self.assertEqual((first["lock"], first["pool"], first["tempdir"]),
                         (True, [1, 2, 3], "/tmp"))
        self.assertEqual(first["shm_bytes"], 8 * 1024 * 1024)
        self.assertEqual(first["overflow"], "ENOSPC")
        second = self.probe()
        self.assertEqual(second["before"], [])  # private: nothing of the first session
