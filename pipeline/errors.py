"""The errors a user can fix: `hwq` prints them as one line and exits with status 2.

Everything else is a bug in hwq (or a dependency) and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["UserError", "StoreAccessError", "ExecutorError", "printable"]


class UserError(Exception):
    """Base of every error whose message says what is wrong and how to fix it."""


class StoreAccessError(UserError, RuntimeError):
    """The store cannot be reached or used: unknown protocol, missing package, no
    credentials, access denied, missing bucket, unreachable endpoint."""


class ExecutorError(UserError, RuntimeError):
    """The Ray cluster cannot be reached or joined."""


def printable(text: str) -> str:
    """Text from the store with control characters (terminal escapes) removed; newlines and
    tabs kept. A store is untrusted, and a terminal obeys escape sequences."""
    return "".join(c for c in text if c in "\n\t" or (c.isprintable() and c != "\x7f"))
