"""Calls into the user's own code: the callables a config names as "package.module:function"
(`model.factory`, `model.loss_fn`, `evaluate.metric`, `data.factory`), and the module a
`model.factory` builds (its forward runs inside hwq's loss and metric calls).

What such a call raises is the user's to fix and a rerun would meet it again, so it becomes a
`UserCodeError` naming the setting, the callable, the exception and the line of the user's
code it came from: one `hwq: error:` line, never retried by Ray or Ray Train (see
`pipeline.error_lines.is_users`). Left as they are: a UserError (already says what to fix),
running out of memory and a failed collective (the machine's failure, not the code's).
"""

from __future__ import annotations

import difflib
import importlib
import os
import sysconfig
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

__all__ = ["UserCodeError", "UserCallable", "call_user", "user_code_error", "ImportPathError",
           "import_object", "import_callable"]

# Exceptions that say the machine failed, not that the code is wrong: out of memory (torch's
# is a RuntimeError named OutOfMemoryError), and torch.distributed's errors (DistError: a peer
# of a fine-tune died inside a collective that the model's forward ran, under ZeRO-3): Ray
# Train must still restart the worker group for those.
_NOT_THE_CODES = ("MemoryError", "OutOfMemoryError", "DistError")


class UserCodeError(UserError):
    """An exception raised by the user's own code (a factory, loss, metric or data function,
    or the forward of the user's model)."""


def user_code_error(what: str, e: BaseException) -> UserCodeError | None:
    """The UserCodeError for exception `e` raised by `what` ("model.loss_fn 'pkg.mod:fn'"), or
    None when `e` is not the code's mistake (a UserError, running out of memory, Ctrl-C)."""
    if (
        not isinstance(e, Exception)
        or isinstance(e, UserError)
        or any(c.__name__ in _NOT_THE_CODES for c in type(e).__mro__)
    ):
        return None
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    where = _where(e)
    return UserCodeError(
        f"{what} raised {type(e).__name__}"
        + (f": {first}" if first else "")
        + (f" (at {where})" if where else "")
    )


def call_user(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs); what it raises becomes a UserCodeError naming `what`."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        err = user_code_error(what, e)
        if err is None:
            raise
        raise err from e


class UserCallable:
    """A user's function that calls through `call_user` (picklable: Ray ships it to tasks)."""

    def __init__(self, what: str, fn: Callable[..., Any]):
        self.what, self.fn = what, fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return call_user(self.what, self.fn, *args, **kwargs)


def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots.add(str(Path(__file__).resolve().parent))  # hwq's own package
    return tuple(str(Path(r).resolve()) + os.sep for r in roots if r)


def _where(e: BaseException) -> str:
    """file:line (function) of the innermost frame of the traceback outside Python, installed
    packages and hwq: the user's line that raised (or called what raised); "" if none."""
    frames = traceback.extract_tb(e.__traceback__)
    roots = _library_roots()
    theirs = [f for f in frames if not str(Path(f.filename).resolve()).startswith(roots)]
    if not theirs:
        return ""
    f = theirs[-1]
    path = Path(f.filename)
    try:
        path = path.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return f"{path}:{f.lineno} in {f.name}"


class ImportPathError(UserError, ValueError):
    """A "package.module:attribute" path that cannot be resolved."""


def import_object(spec: str, what: str = "object") -> Any:
    """The object at "package.module:attribute" (the attribute may be dotted: "mod:Cls.make").

    what: how messages name it ("model.factory", "data.factory", ...).
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ImportPathError(f"{what} {spec!r}: expected 'package.module:name'")
    mod_name, attr = spec.split(":")
    if not mod_name or not attr:
        raise ImportPathError(f"{what} {spec!r}: expected 'package.module:name'")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        # The module itself (or a parent package) is missing, or something it imports is.
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise ImportPathError(f"{what} {spec!r}: no module named {e.name!r} (is it on "
                                  "PYTHONPATH, or installed?)") from None
        raise ImportPathError(f"{what} {spec!r}: module {mod_name!r} failed to import: {e}"
                              ) from None
    except Exception as e:  # noqa: BLE001 - any error while importing user code
        raise ImportPathError(f"{what} {spec!r}: module {mod_name!r} failed to import: "
                              f"{type(e).__name__}: {e}") from None
    done = mod_name
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            near = difflib.get_close_matches(part, names, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ImportPathError(f"{what} {spec!r}: {done!r} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
        done = f"{done}:{part}" if done == mod_name else f"{done}.{part}"
    return obj


def import_callable(spec: str, what: str = "function") -> Callable[..., Any]:
    """`import_object` that also checks the result is callable."""
    obj = import_object(spec, what)
    if not callable(obj):
        raise ImportPathError(f"{what} {spec!r} is a {type(obj).__name__}, not a function")
    return obj
