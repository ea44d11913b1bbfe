"""pytest set-up for the whole suite.

trial's ``TestCase.mktemp()`` makes directories relative to the working
directory; under pytest that would litter the checkout.  The session runs in a
fresh temporary directory instead (removed at the end), with the checkout kept
importable by its absolute path.  The directory changes once the tests are
collected (in each xdist worker too), from where pytest was invoked.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Any

CHECKOUT = os.path.dirname(os.path.abspath(__file__))
if CHECKOUT not in sys.path:
    sys.path.insert(0, CHECKOUT)

_state: dict[str, str] = {}


def _traversable_mktemp() -> None:
    """trial's ``mktemp()`` makes its random directory with ``mkdtemp`` (mode 0700).  A
    root runner refuses a data dir its build and app users cannot reach
    (:func:`epio.node.reach_problem`), so a test's temporary directories are made
    searchable (0711, not listable) by others, as a data dir's parents must be."""
    from twisted.trial import _synctest

    original = _synctest.SynchronousTestCase.mktemp

    def mktemp(self: Any) -> str:
        path: str = original(self)
        os.chmod(os.path.dirname(os.path.abspath(path)), 0o711)
        return path

    _synctest.SynchronousTestCase.mktemp = mktemp  # type: ignore[method-assign]


def pytest_sessionstart(session: Any) -> None:
    _traversable_mktemp()


def pytest_collection_finish(session: Any) -> None:
    # after collection, not at the session's start: an xdist worker collects the test
    # paths it was given, relative to where pytest was invoked, after its session starts
    if "cwd" in _state:
        return
    _state["cwd"] = os.getcwd()
    _state["workdir"] = tempfile.mkdtemp(prefix="epio-tests-")
    # searchable (not listable) by others, like any data dir's parent: a root runner
    # refuses a data dir its build and app users cannot reach (mkdtemp makes 0700)
    os.chmod(_state["workdir"], 0o711)
    os.chdir(_state["workdir"])


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    if "cwd" in _state:
        os.chdir(_state["cwd"])
        shutil.rmtree(_state["workdir"], ignore_errors=True)
