"""The package's compiled extensions (csrc/), each optional at install time."""
from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.cache  # a missing module would otherwise be searched for again on every call
def extension(name: str) -> ModuleType | None:
    """mirror_core.<name> where it was built; None where the install had no compiler (or,
    for `_jpegregion`, no libjpeg headers)."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError:
        return None
