"""torch on first use, for the modules a study file's validation imports.

`studies.spec` checks task and variant names and options against the registries in
`workers.tasks` and `workers.attention`; importing torch (about 3 s) only to read those would make
a typo in a study file take seconds to report. The task modules therefore reach torch through
these stand-ins, which import it the first time an attribute is used: in a trial, where it is
loaded anyway.
"""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Any, Callable


class LazyModule:
    """Stands in for a module; the first attribute access imports it (then a dict lookup per access)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        module = sys.modules.get(self._name) or importlib.import_module(self._name)
        return getattr(module, attribute)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


torch = LazyModule("torch")
F = LazyModule("torch.nn.functional")


def no_grad(function: Callable) -> Callable:
    """`@torch.no_grad()` without importing torch when the decorated class is defined."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return function(*args, **kwargs)

    return wrapper
