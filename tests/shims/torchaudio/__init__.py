"""Import-only stand-in for torchaudio (tests only)."""
import importlib.abc
import importlib.machinery
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from _standin import StandIn, install  # noqa: E402

install(__name__)
__version__ = "0.0.0+standin"


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return StandIn(spec.name)

    def exec_module(self, module):
        module.__path__ = []


sys.meta_path.insert(0, _Finder())
