"""Named points of a run where a test may step in (crash a worker at a chosen step).

The product fires a few events and nothing happens unless a hook is set: the environment
variable HWQ_HOOK="module:function[:argument]" names a callable, which `fire` imports and calls
as ``function(event, argument, **info)``. hwq ships no hook; the tests' hooks live outside the
package, and a run without HWQ_HOOK imports nothing for this.

Ray workers do not see the driver's environment as it is when a stage starts (an embedded Ray's
workers keep the one Ray started with, a cluster's nodes have their own), so the driver reads
HWQ_HOOK once (`from_env`) and sends the string along with the work; the worker fires it.

Events (info keywords):

- ``finetune.step``: in each fine-tune worker, after step ``step`` (1-based) and its
  checkpoint; ``rank``: the worker's rank.

HWQ_HOOK runs code named by whoever sets the environment, in the driver's workers, as
PYTHONPATH would (docs/SECURITY.md).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__all__ = ["ENV", "fire", "from_env"]

ENV = "HWQ_HOOK"


def from_env() -> str | None:
    """The hook named by HWQ_HOOK ("module:function[:argument]"), or None if unset."""
    return os.environ.get(ENV) or None


def fire(spec: str | None, event: str, **info: Any) -> None:
    """Call the hook `spec` (see the module docstring) with `event` and `info`; nothing if None.

    The hook may raise or end the process: that is what a test hook is for."""
    if spec is None:
        return
    module, sep, rest = spec.partition(":")
    name, _, argument = rest.partition(":")
    if not (module and sep and name):
        raise ValueError(f"{ENV}={spec!r}: expected module:function[:argument]")
    getattr(importlib.import_module(module), name)(event, argument, **info)
