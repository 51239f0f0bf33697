"""Which parameters a run quantizes: name patterns matched against a model.

A pattern is one of

* a glob (`fnmatch`, case-sensitive; `*` matches any run of characters, dots included,
  `?` one character, `[...]` a set): `model.layers.*.self_attn.q_proj`, `*.mlp.*`, `fc1`;
* `re:` followed by a Python regular expression, matched whole (`re.fullmatch`), in the manner
  of llm-compressor's targets: `re:.*layers\\.(0|1)\\..*_proj`.

Matching (the precise rule):

1. Module route. A pattern that matches a module's full name (as in `named_modules()`)
   selects that module's own parameter called `weight`, if it has one. Modules without a
   `weight` (containers, activations) are passed over. This is how `*.mlp.*` picks the MLP's
   projection weights but not their biases.
2. Parameter route, globs only. A glob whose last dotted component has no wildcard
   (`fc1.weight`, `*.bias`, `model.norm.weight`) is also matched against full parameter names
   and selects each parameter it matches. `re:` patterns take the module route only.

The selection is the union over `targets`, minus the union over `ignore` (same rules), as
canonical parameter names in `named_parameters()` order (a tied weight is selected once, by
its first name: targeting `lm_head` of a model with tied embeddings selects
`model.embed_tokens.weight`). A pattern (in either list) that matches nothing in the model is
a `TargetError` naming it and suggesting the nearest names.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Sequence

from torch import nn

from pipeline.errors import UserError

__all__ = ["TargetError", "match_named_parameters", "match_names", "output_axis", "parameter_owner"]

_WILDCARD = re.compile(r"[*?\[]")


class TargetError(UserError, ValueError):
    """A target or ignore pattern that selects nothing, or is not a valid pattern."""


class _Pattern:
    def __init__(self, text: str, where: str):
        if not isinstance(text, str) or not text.strip():
            raise TargetError(f"{where}: empty pattern {text!r}")
        self.text = text
        if text.startswith("re:"):
            try:
                self._re = re.compile(text[3:])
            except re.error as e:
                raise TargetError(f"{where}: {text!r} is not a valid regular expression ({e})"
                                  ) from None
            self.params_too = False
        else:
            self._re = re.compile(fnmatch.translate(text))
            self.params_too = not _WILDCARD.search(text.rsplit(".", 1)[-1])

    def matches(self, name: str) -> bool:
        return self._re.fullmatch(name) is not None


def _candidates(model: nn.Module) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Canonical parameter names in model order, and (module, local name, canonical name) for
    every place a parameter is registered (tied weights appear under each owner)."""
    canon: dict[int, str] = {}
    order: list[str] = []
    for name, p in model.named_parameters():
        canon[id(p)] = name
        order.append(name)
    places = []
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for local, p in mod.named_parameters(recurse=False):
            if id(p) in canon:
                places.append((mod_name, local, canon[id(p)]))
    return order, places


def _select(pattern: _Pattern, places: list[tuple[str, str, str]]) -> set[str]:
    out = set()
    for mod_name, local, cname in places:
        if local == "weight" and mod_name and pattern.matches(mod_name):
            out.add(cname)
        elif pattern.params_too and pattern.matches(f"{mod_name}.{local}" if mod_name else local):
            out.add(cname)
    return out


def _suggest(pattern: str, names: Iterable[str]) -> str:
    # Offer both real names and their layer-generic forms (`model.layers.*.mlp.up_proj`), so a
    # mistyped glob gets a glob back.
    pool = set()
    for n in names:
        pool.add(n)
        pool.add(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", n))
    text = pattern[3:] if pattern.startswith("re:") else pattern
    near = difflib.get_close_matches(text, sorted(pool), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""


def match_named_parameters(
    model: nn.Module,
    targets: Sequence[str],
    ignore: Sequence[str] = (),
    *,
    where: str = "targets",
) -> list[str]:
    """Parameter names selected by `targets` minus `ignore` (rules: module docstring).

    Returns canonical names in `model.named_parameters()` order. Raises TargetError for a
    pattern that matches nothing. `where` prefixes messages (e.g. "quantize.targets").
    """
    order, places = _candidates(model)
    return _match(order, places, targets, ignore, where)


def match_names(names: Sequence[str], targets: Sequence[str], ignore: Sequence[str] = (), *,
                where: str = "targets") -> list[str]:
    """`match_named_parameters` on tensor names alone (a safetensors folder read in place, no
    module built): `a.b.weight` is parameter `weight` of module `a.b`; same rules, same
    errors, names in the given order."""
    places = [(n.rsplit(".", 1)[0] if "." in n else "", n.rsplit(".", 1)[-1], n) for n in names]
    return _match(list(names), places, targets, ignore, where)


def _match(order: list[str], places: list[tuple[str, str, str]], targets: Sequence[str],
           ignore: Sequence[str], where: str) -> list[str]:
    if isinstance(targets, str) or isinstance(ignore, str):
        raise TargetError(f"{where}: targets and ignore are lists of patterns, not one string")
    everything = [m for m, _, _ in places if m] + order

    def union(patterns: Sequence[str], label: str) -> set[str]:
        chosen: set[str] = set()
        for text in patterns:
            pat = _Pattern(text, label)
            got = _select(pat, places)
            if not got:
                raise TargetError(
                    f"{label}: pattern {text!r} matches no parameter of the model"
                    f"{_suggest(text, everything)}"
                )
            chosen |= got
        return chosen

    selected = union(targets, where) - union(ignore, f"{where} (ignore)")
    return [n for n in order if n in selected]


def parameter_owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that registers parameter `name` directly, and the parameter's local name."""
    mod_name, _, local = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        raise TargetError(f"the model has no parameter {name!r}") from None
    if local not in dict(mod.named_parameters(recurse=False)):
        raise TargetError(f"the model has no parameter {name!r}")
    return mod, local


def output_axis(model: nn.Module, name: str) -> int:
    """The output-channel axis of weight `name`.

    0 for nn.Linear [out, in] and Conv [out, in/groups, ...]; 1 for ConvTranspose
    [in, out/groups, ...] and for Hugging Face's GPT-2 style `Conv1D`, which stores [in, out].
    """
    mod, _ = parameter_owner(model, name)
    if isinstance(mod, nn.modules.conv._ConvTransposeNd):
        return 1
    # Identified by name so that this works without importing transformers.
    if type(mod).__name__ == "Conv1D" and type(mod).__module__.startswith("transformers"):
        return 1
    return 0
