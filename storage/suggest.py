""""Did you mean ...?" for names a user typed (tasks, variants, commands, studies): difflib's
closest matches. Lives in `storage` because every package may import it (see DESIGN.md)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def close_matches(value: object, choices: Iterable[object], n: int = 3) -> list[str]:
    """Up to n choices that look like `value` (difflib ratio >= 0.6, also ignoring case)."""
    names = [str(c) for c in choices]
    text = str(value)
    found = difflib.get_close_matches(text, names, n=n, cutoff=0.6)
    if not found:  # "WikiText2" vs "wikitext2"
        lowered = {name.lower(): name for name in names}
        found = [lowered[m] for m in difflib.get_close_matches(text.lower(), list(lowered), n=n, cutoff=0.6)]
    return found


def did_you_mean(value: object, choices: Iterable[object]) -> str:
    """'; did you mean 'x'?' (or "'x' or 'y'"), or '' when nothing is close: append to an error."""
    found = close_matches(value, choices)
    if not found:
        return ""
    return "; did you mean " + " or ".join(repr(m) for m in found) + "?"
