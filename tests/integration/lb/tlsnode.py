"""A real ``twistd epio --role=lb`` serving HTTPS for one hostname, with two processes.

Shared by the TLS integration tests: a backend (``python -m http.server`` over a
``hello.txt``), a test CA's certificate for :data:`HOST` in ``lb.tls_cert_dir``, and a
standalone router (``--routes``) with ``lb.workers = 2`` started and listening in every
process.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.certs.test_certs import CA
from tests.util import NodeProcess, free_port, wait_for_port

HOST = "secure.example.com"


def start_tls_router(test: SynchronousTestCase, lb_extra: str = "") -> None:
    """Start the router for ``test``; sets ``test.tmp``, ``test.ca_file`` (the CA to
    trust), ``test.port`` (HTTP), ``test.tls_port`` and ``test.node``.  ``lb_extra``
    is more ``[lb]`` TOML lines."""
    t = test
    t.tmp = Path(t.mktemp()).absolute()  # type: ignore[attr-defined]
    tmp: Path = t.tmp  # type: ignore[attr-defined]
    (tmp / "certs").mkdir(parents=True)
    (tmp / "www").mkdir()
    (tmp / "www" / "hello.txt").write_text("hello over tls\n")
    bport = free_port()
    backend = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(bport), "--bind", "127.0.0.1"],
        cwd=tmp / "www", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t.addCleanup(lambda: (backend.kill(), backend.wait()))
    wait_for_port("127.0.0.1", bport)
    routes = tmp / "routes.toml"
    routes.write_text(f'[apps.hello]\nhostnames = ["{HOST}"]\n'
                      f'backends = ["127.0.0.1:{bport}"]\n')
    ca = CA()
    cert, key = ca.leaf([HOST])
    (tmp / "certs" / f"{HOST}.pem").write_bytes(key + cert)
    t.ca_file = tmp / "ca.pem"  # type: ignore[attr-defined]
    t.ca_file.write_bytes(ca.cert_pem())  # type: ignore[attr-defined]
    t.port, t.tls_port = free_port(), free_port()  # type: ignore[attr-defined]
    config = (f'[lb]\nworkers = 2\n'
              f'tls_listen = "tcp:{t.tls_port}:interface=127.0.0.1"\n'  # type: ignore[attr-defined]
              f'tls_cert_dir = "{tmp / "certs"}"\n{lb_extra}')
    node = NodeProcess(["--role=lb", "--routes", str(routes), "--lb-listen",
                        f"tcp:{t.port}:interface=127.0.0.1"],  # type: ignore[attr-defined]
                       data_dir=tmp / "data", config=config)
    t.node = node  # type: ignore[attr-defined]
    t.addCleanup(node.cleanup)
    deadline = time.monotonic() + 30
    while node.output().count("router listening on") < 4:  # 2 ports x 2 processes
        t.assertLess(time.monotonic(), deadline, node.output())
        time.sleep(0.1)
