"""What a user sees of an exception: the error to print as one line (`hwq: error: …`) or None
for a bug (which keeps its traceback), and the one-line text a batch records per entry.
Shared by the CLI, `hwq batch`, the driver's run record and the job entrypoints."""

from __future__ import annotations

from pipeline.errors import UserError, printable

__all__ = ["user_error", "aborted", "error_line", "one_line"]


def user_error(e: BaseException) -> BaseException | None:
    """The error to show a user without a traceback, unwrapping Ray's task errors."""
    try:
        from ray.exceptions import RayTaskError
    except ImportError:  # pragma: no cover
        RayTaskError = ()  # noqa: N806
    seen = 0
    while isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None and seen < 5:
        e, seen = e.cause, seen + 1
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
    try:
        from ray.exceptions import RayTaskError
    except ImportError:  # pragma: no cover
        RayTaskError = ()  # noqa: N806
    inner, seen = e, 0
    while isinstance(inner, RayTaskError) and getattr(inner, "cause", None) is not None \
            and seen < 5:
        inner, seen = inner.cause, seen + 1
    shown = user_error(inner)
    text = str(shown) if shown is not None else (
        f"{type(inner).__name__}: {inner}" if str(inner) else type(inner).__name__)
    if isinstance(inner, RayTaskError):  # no cause: its text is a traceback; keep the end
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
