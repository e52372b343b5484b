"""Lazy public names for a package's ``__init__`` (PEP 562)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(package: str, modules: Mapping[str, Sequence[str]]) -> tuple[Callable[[str], Any], list[str]]:
    """``(__getattr__, __all__)`` for the package ``package`` whose public names are those of
    ``modules`` (submodule, relative to the package -> the names it provides): a name is
    imported from its submodule the first time it is asked for. Reading a stage's config (for
    ``vitscope <stage> --help``, say) then imports the config's module and none of the stage's
    heavy code."""
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name], package), name)
        importlib.import_module(package).__dict__[name] = value
        return value

    return __getattr__, sorted(where)
