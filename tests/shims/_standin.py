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
