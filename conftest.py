"""pytest set-up for the whole suite.

trial's ``TestCase.mktemp()`` makes directories relative to the working
directory; under pytest that would litter the checkout.  The session runs in a
fresh temporary directory instead (removed at the end), with the checkout kept
importable by its absolute path.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

CHECKOUT = os.path.dirname(os.path.abspath(__file__))
if CHECKOUT not in sys.path:
    sys.path.insert(0, CHECKOUT)

_WORKDIR = tempfile.mkdtemp(prefix="epio-tests-")
_ORIGINAL_CWD = os.getcwd()
os.chdir(_WORKDIR)


def pytest_unconfigure(config: object) -> None:
    os.chdir(_ORIGINAL_CWD)
    shutil.rmtree(_WORKDIR, ignore_errors=True)
