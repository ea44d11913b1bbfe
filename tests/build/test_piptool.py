"""The node's pip copy that builds run is compiled to bytecode once per interpreter."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from epio.runner.build.builder import compile_piptool


class CompilePiptoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tool = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.tool)
        (self.tool / "pip" / "_internal").mkdir(parents=True)
        (self.tool / "pip" / "__init__.py").write_text("X = 1\n")
        (self.tool / "pip" / "_internal" / "__init__.py").write_text("Y = 2\n")

    def test_compiled_once_with_a_marker(self) -> None:
        """Builds run pip with PYTHONDONTWRITEBYTECODE, so pip's bytecode must be in the
        copy already: every module gets a .pyc for the interpreter's cache tag, and a
        second call (the next node start) finds the marker and compiles nothing."""
        tag = sys.implementation.cache_tag
        self.assertTrue(compile_piptool(self.tool, Path(sys.executable)))
        for mod in (self.tool / "pip", self.tool / "pip" / "_internal"):
            self.assertTrue((mod / "__pycache__" / f"__init__.{tag}.pyc").is_file(), mod)
        self.assertTrue((self.tool / f".compiled-{tag}").exists())
        shutil.rmtree(self.tool / "pip" / "__pycache__")
        self.assertTrue(compile_piptool(self.tool, Path(sys.executable)))
        self.assertFalse((self.tool / "pip" / "__pycache__").exists())

    def test_an_interpreter_that_cannot_run_is_skipped(self) -> None:
        """A listed Python that does not run leaves the copy as it is (no marker)."""
        self.assertFalse(compile_piptool(self.tool, self.tool / "no-such-python"))
        self.assertEqual([p.name for p in self.tool.iterdir()], ["pip"])
