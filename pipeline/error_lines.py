"""What a user sees of an exception: the error to print as one line (`hwq: error: …`) or None
for a bug (which keeps its traceback), and the one-line text a batch records per entry.
Shared by the CLI, `hwq batch`, the driver's run record and the job entrypoints."""

from __future__ import annotations

from pipeline.errors import ExecutorError, StoreAccessError, UserError, printable

__all__ = ["user_error", "unwrap", "is_users", "aborted", "error_line", "one_line"]

_DEPTH = 8  # wrappers unwrapped at most (a task's error inside a worker's inside Train's)


def unwrap(e: BaseException) -> BaseException:
    """The error inside Ray's wrappers: a task's RayTaskError (its cause), Ray Train's
    WorkerGroupError (the first worker failure that is the user's, else the first, by rank),
    ControllerError (the controller's failure), Train v1's TrainingFailedError (its cause) and
    an error carrying a `user_error` (a fine-tune worker's, pipeline.finetune.stage._Unheld).
    Anything else is returned as it is."""
    for _ in range(_DEPTH):
        inner = _inner(e)
        if inner is None or inner is e:
            break
        e = inner
    return e


def _inner(e: BaseException) -> BaseException | None:
    kinds = {c.__name__ for c in type(e).__mro__}  # by name: no Ray import to classify
    if "RayTaskError" in kinds:
        cause = getattr(e, "cause", None)
        return cause if isinstance(cause, BaseException) else None
    failures = getattr(e, "worker_failures", None)
    if "WorkerGroupError" in kinds and isinstance(failures, dict) and failures:
        errs = [failures[k] for k in sorted(failures, key=str)
                if isinstance(failures[k], BaseException)]
        # A user error in one worker fails its peers' collectives too: show its cause.
        return next((x for x in errs if is_users(x)), errs[0] if errs else None)
    if "ControllerError" in kinds:
        inner = getattr(e, "controller_failure", None)
        return inner if isinstance(inner, BaseException) else None
    if "TrainingFailedError" in kinds:
        return e.__cause__
    held = getattr(e, "user_error", None)  # a fine-tune worker's error that had to fail it
    return held if isinstance(held, BaseException) else None


def is_users(e: BaseException) -> bool:
    """Whether `e` (unwrapped) is a mistake for the user to fix that a rerun would meet
    again: a UserError, or a ValueError or FileNotFoundError (what `hwq` shows as one line).
    Ray and Ray Train must not retry these. A store or cluster that cannot be reached is the
    exception: it may be back on the next try."""
    e = unwrap(e)
    return (isinstance(e, (UserError, ValueError, FileNotFoundError))
            and not isinstance(e, (StoreAccessError, ExecutorError)))


def user_error(e: BaseException) -> BaseException | None:
    """The error to show a user without a traceback, unwrapping Ray's task and Train errors."""
    e = unwrap(e)
    if isinstance(e, (UserError, ValueError, FileNotFoundError)):
        return e
    if not isinstance(e, Exception):  # not Ctrl-C or exit (main's caller handles those)
        return aborted(e)
    if type(e).__name__ in _STORE_FAILURES or isinstance(e, PermissionError):
        # Raised by s3fs/botocore on any store access, not only the first one.
        from pipeline.store import StoreAccessError, describe_store_error

        return StoreAccessError(describe_store_error(e, ""))
    return None


def aborted(e: BaseException) -> UserError:
    """A library that gave up with a BaseException rather than an Exception: a Rust panic in
    pyo3's bindings (tokenizers: a tokenizer file whose regex it cannot run) is one. What it
    was reading is the likeliest cause; one line, not a traceback (-v shows it)."""
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    where = type(e).__module__.split(".")[0]
    text = printable(f"{where}.{type(e).__name__}: {first}"[:300])
    return UserError(f"a library aborted ({text}); the file it was reading (a tokenizer, a "
                     "model or data file) is likely malformed")


# Exceptions of the storage libraries that mean "this store cannot be used as configured".
_STORE_FAILURES = frozenset({
    "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientError",
    "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ParamValidationError",
    "ClientPayloadError", "ServerDisconnectedError", "ConnectionClosedError",
})


MAX_ERROR_CHARS = 400


def error_line(e: BaseException) -> str:
    """A readable one-line error: Ray's task errors unwrapped, user errors as their message,
    anything else as `Type: message`."""
    inner = unwrap(e)
    shown = user_error(inner)
    text = str(shown) if shown is not None else (
        f"{type(inner).__name__}: {inner}" if str(inner) else type(inner).__name__)
    if "RayTaskError" in {c.__name__ for c in type(inner).__mro__}:
        # no cause: its text is a traceback; keep the end
        lines = [ln for ln in str(inner).splitlines() if ln.strip()]
        text = f"{type(inner).__name__}: {lines[-1].strip() if lines else ''}"
    text = one_line(text)
    text = "".join(c for c in text if c.isprintable())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def one_line(text: str) -> str:
    """A config error (possibly one line per problem) as one line."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} " + "; ".join(lines[1:])
    return "; ".join(lines)
