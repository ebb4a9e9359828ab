"""The one exception type users see.

Anything a user can cause (a bad file, a bad key, a missing package) is raised as
``TunelabError`` with a message that says what and where; the CLI prints it as a
single line and exits 1. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TunelabError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def where(path: object, line: int | None = None, field: str | None = None) -> str:
    """Format a location as ``file:line: field`` (parts omitted when unknown)."""
    text = str(path)
    if line is not None:
        text += f":{line}"
    if field:
        text += f": {field}"
    return text


def require(module: str, extra: str):
    """Import an optional dependency, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TunelabError(
            f"this feature needs the '{module}' package: pip install 'tunelab[{extra}]'"
        ) from exc
