"""Module objects whose attributes import fine and raise only when used."""

import sys
import types


class _Missing:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, item):
        return _Missing(f"{self._name}.{item}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is an import-only test stand-in; install the real package to use it")

    def __mro_entries__(self, bases):
        return (object,)


class StandIn(types.ModuleType):
    def __getattr__(self, item):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Missing(f"{self.__name__}.{item}")


def install(name):
    mod = sys.modules[name]
    mod.__class__ = StandIn
    mod.__path__ = []
    return mod


def install_package(name):
    """Make `name` (already in sys.modules) and every `name.sub.module` import-only stand-ins."""
    import importlib.abc
    import importlib.machinery

    mod = install(name)
    mod.__version__ = "0.0.0+standin"

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path=None, target=None):
            if fullname.startswith(name + "."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            return StandIn(spec.name)

        def exec_module(self, module):
            module.__path__ = []

    sys.meta_path.insert(0, _Finder())
    return mod
