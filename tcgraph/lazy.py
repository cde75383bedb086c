"""Names a package imports on first use (PEP 562), so that importing it stays light (no torch)."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_names(package: str, names: dict[str, str], namespace: dict) -> Callable[[str], object]:
    """The module `__getattr__` of `package`: a name in `names` (name -> module) is imported from its
    module when first asked for and kept in `namespace` (the package's globals)."""

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(names[name]), name)
        namespace[name] = value
        return value

    return __getattr__
