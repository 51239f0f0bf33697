"""A causal language model run one decoder block at a time, straight from its checkpoint.

`StreamedLM` builds the model's skeleton with every parameter on the ``meta`` device (no
memory; buffers such as rotary frequencies stay real), then materialises one piece at a time
from a `WeightsFolder` by range reads: the input embedding, block i, the final norm and the
output head. Block streaming follows llm-compressor's sequential onloading: the calibration
windows go through the embedding once, the inputs of block 0 (and the keyword arguments the
model passes to every block: position embeddings, mask) are captured by a pre-hook on block 0,
and from then on the hidden states of block i are the inputs of block i + 1; block i is freed
before block i + 1 is read.

Used by the streamed estimators (`pipeline.hessian.stream`) and by `perplexity`, so a model
larger than memory is calibrated and measured with a few blocks resident.

`ActivationCache` keeps per-block activations in memory up to a budget and spills the rest to
files (safetensors, never pickles) in a folder the caller chooses.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import uuid
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline.memory import release_memory
from pipeline.models.folder_checks import (
    building_from,
    check_config_against_weights,
    check_model_type,
    params_on_meta,
    parse_json,
)
from pipeline.models.lm_loss import _LOGIT_TRANSFORMS, _chunk_nll
from pipeline.models.stored_linear import use_stored_linears
from pipeline.models.weights import WeightsError, WeightsFolder

__all__ = ["StreamedLM", "ActivationCache"]


class _Stop(Exception):
    pass


class StreamedLM:
    """A Hugging Face causal LM whose weights stay in `url` until a piece is needed.

    url: model folder (local or fsspec URL) with config.json and safetensors weights.
    dtype: compute dtype every piece is cast to when loaded (float32 by default; "stored"
        keeps a 16-bit checkpoint's bfloat16 — half the memory, and several times faster on
        CPUs with bf16 matrix units — and uses float32 otherwise).
    stored_linears: the decoder blocks' nn.Linear weights stay in the checkpoint's 16-bit
        dtype and are widened to `dtype` one call at a time (`pipeline.models.stored_linear`:
        the same products, half a block's weight memory in float32).
    """

    def __init__(self, url: str, storage_options: dict | None = None,
                 dtype: torch.dtype | str = torch.float32, stored_linears: bool = False):
        from transformers import AutoModelForCausalLM
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        from pipeline.models.hf_causal import largest_module_list

        self.weights = WeightsFolder(url, storage_options)
        files = self.weights._files
        where = f"{url}/config.json"
        if not files.exists("config.json"):
            raise WeightsError(f"{url} has no config.json")
        cfg_dict = parse_json(files.read_whole("config.json", 4 << 20), where)
        # Before anything is built: the layer count and sizes must be what the weights hold.
        check_config_against_weights(
            cfg_dict, {n: t.shape for n, t in self.weights.tensors.items()}, where)
        check_model_type(cfg_dict, where)
        with building_from(where):
            cfg = CONFIG_MAPPING[cfg_dict["model_type"]].from_dict(cfg_dict)
        cfg.use_cache = False
        self.config = cfg
        if dtype == "stored":
            stored = {t.dtype for t in self.weights.tensors.values() if len(t.shape) == 2}
            dtype = torch.bfloat16 if stored == {"BF16"} else torch.float32
        self.dtype = dtype
        with building_from(where), params_on_meta():
            self.model = AutoModelForCausalLM.from_config(cfg, dtype=dtype,
                                                          trust_remote_code=False)
        self.model.eval()
        self.model.config.use_cache = False
        self.layers_name, self.layers = largest_module_list(self.model)
        self._as_stored: set[str] = set()  # parameters read in their stored 16-bit dtype
        if stored_linears and dtype == torch.float32:
            self._as_stored = {f"{self.layers_name}.{n}" for n in use_stored_linears(self.layers)}
        self.names = {id(m): n for n, m in self.model.named_modules()}
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        self.plain_head = all(getattr(cfg, a, None) in (None, 1, 1.0) for a in _LOGIT_TRANSFORMS)
        self._check_shapes()

    def _check_shapes(self) -> None:
        """Every parameter of the skeleton has a tensor of its shape in the weights (before
        any block runs: a wrong folder fails here, not blocks into a run)."""
        for name, p in self.model.named_parameters():
            t = self.weights.tensors[self._key(name)]
            if tuple(t.shape) != tuple(p.shape):
                raise WeightsError(f"{self.weights.url}: tensor {name!r} is {list(t.shape)} in "
                                   f"the weights, but config.json makes it {list(p.shape)}")

    # -- loading pieces ----------------------------------------------------------------------

    def _key(self, name: str) -> str:
        if name in self.weights.tensors:
            return name
        emb = self.names[id(self.model.get_input_embeddings())] + ".weight"
        head = self.model.get_output_embeddings()
        if (self.tied and head is not None
                and name == self.names[id(head)] + ".weight" and emb in self.weights.tensors):
            return emb
        raise WeightsError(f"{self.weights.url} has no tensor {name!r} (the model's config "
                           f"expects it)")

    def load(self, module: nn.Module) -> nn.Module:
        """Read `module`'s parameters and persistent buffers from the checkpoint."""
        prefix = self.names[id(module)]
        prefix = prefix + "." if prefix else ""
        own = dict(module.named_parameters(recurse=True))
        sd = {}
        for n, p in own.items():
            if p.device.type == "meta":
                key = self._key(prefix + n)
                keep = (prefix + n in self._as_stored
                        and self.weights.info(key).dtype in ("BF16", "F16"))
                sd[n] = self.weights.read(key, None if keep else self.dtype)
        if sd:
            missing = set(own) - set(sd)
            for n in missing:
                sd[n] = own[n].detach()
            module.load_state_dict(sd, strict=False, assign=True)
        for n, p in module.named_parameters():
            # What was just read is frozen: an estimator asks for the gradients it wants (and a
            # piece already resident keeps what its estimator asked for, e.g. the head's weight
            # across the calls of `window_nll`).
            if n in sd:
                p.requires_grad_(False)
        return module

    @staticmethod
    def unload(module: nn.Module) -> None:
        """Free `module`'s parameters (back to the meta device) and hand the freed pages back
        to the system (glibc keeps freed blocks of a few MB in its heap otherwise, and a sweep
        over 30 blocks then grows the process by a block's size per block)."""
        for sub in module.modules():
            for n, p in list(sub._parameters.items()):
                if p is not None and p.device.type != "meta":
                    sub._parameters[n] = nn.Parameter(p.to("meta"), requires_grad=False)
        release_memory()

    @property
    def embedding_name(self) -> str:
        """The input embedding's weight name as the model names it (``model.embed_tokens.weight``)."""
        return self.names[id(self.model.get_input_embeddings())] + ".weight"

    @property
    def head_name(self) -> str | None:
        """The output head's weight name (``lm_head.weight``), or None for a model without one.
        Tied to the embedding, the checkpoint may hold only the embedding (see `_key`)."""
        head = self.model.get_output_embeddings()
        return None if head is None else self.names[id(head)] + ".weight"

    def block(self, i: int) -> nn.Module:
        return self.load(self.layers[i])

    def block_prefix(self, i: int) -> str:
        return f"{self.layers_name}.{i}."

    def block_params(self, i: int) -> list[str]:
        """Full names of block i's parameters (as in the checkpoint)."""
        return [self.block_prefix(i) + n for n, _ in self.layers[i].named_parameters()]

    # -- running -------------------------------------------------------------------------------

    def block_inputs(self, windows: Tensor) -> tuple[Tensor, list[tuple[tuple, dict[str, Any]]]]:
        """Hidden states entering block 0 for `windows` [n, L], and per block the other
        arguments the model passes it (position embeddings, its attention mask: layers of
        different kinds, such as sliding-window and full attention, get different masks).

        The arguments are captured for one window (they broadcast over a batch) by running the
        model with every block replaced by a recorder: only the embedding is read."""
        emb = self.load(self.model.get_input_embeddings())
        calls: list[tuple[tuple, dict[str, Any]]] = []
        last = len(self.layers) - 1

        def recorder(i: int):
            def forward(*args, **kwargs):
                hidden = kwargs.pop("hidden_states", None)
                if hidden is None:
                    hidden, args = args[0], args[1:]
                for k in ("past_key_values", "past_key_value"):
                    kwargs.pop(k, None)
                kwargs["use_cache"] = False
                calls.append((tuple(args), kwargs))
                if i == last:
                    raise _Stop
                return hidden

            return forward

        first: dict[str, Tensor] = {}

        def grab_first(*args, **kwargs):
            h = kwargs.get("hidden_states")
            first["hidden"] = args[0] if h is None else h
            raise _Stop

        for i, layer in enumerate(self.layers):
            layer.forward = recorder(i)
        try:
            with torch.no_grad(), contextlib.suppress(_Stop):
                self.model(input_ids=windows[:1], use_cache=False)
            # The hidden states of every window as the model hands them to block 0 (after
            # whatever it does to the embeddings: Gemma scales them, for one).
            self.layers[0].forward = grab_first
            with torch.no_grad(), contextlib.suppress(_Stop):
                self.model(input_ids=windows, use_cache=False)
            hidden = first["hidden"].to(self.dtype)
        finally:
            for layer in self.layers:
                layer.__dict__.pop("forward", None)
            self.unload(emb)
        if len(calls) != len(self.layers):
            raise WeightsError(f"the model called {len(calls)} of its {len(self.layers)} "
                               f"blocks once each; hwq streams models that call every block "
                               f"once, in order")
        return hidden, calls

    def embedding_cotangent(self, windows: Tensor, cot: Tensor) -> Tensor:
        """The cotangent at the input embedding's output, float32 [n, L, d], given `cot` at
        block 0's input [n, L, d]: whatever the model does in between (Gemma scales the
        embeddings) is back-propagated, one batch for all windows (it acts token by token,
        so row s stays window s's)."""
        emb = self.load(self.model.get_input_embeddings())
        leaf: dict[str, Tensor] = {}

        def tap(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            leaf["e"] = out.detach().float().requires_grad_(True)
            return leaf["e"].to(out.dtype)

        def grab_first(*args, **kwargs):
            h = kwargs.get("hidden_states")
            leaf["h"] = args[0] if h is None else h
            raise _Stop

        handle = emb.register_forward_hook(tap)
        self.layers[0].forward = grab_first
        try:
            with torch.enable_grad(), contextlib.suppress(_Stop):
                self.model(input_ids=windows, use_cache=False)
            (g,) = torch.autograd.grad(leaf["h"], leaf["e"], grad_outputs=cot.to(leaf["h"].dtype))
        finally:
            handle.remove()
            self.layers[0].__dict__.pop("forward", None)
            self.unload(emb)
        return g

    @staticmethod
    def call_block(block: nn.Module, hidden: Tensor, args: tuple, kwargs: dict) -> Tensor:
        out = block(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple | list) else out

    def run_block(self, i: int, hidden: Tensor, call: tuple[tuple, dict], *,
                  batch: int = 8) -> Tensor:
        block = self.layers[i]
        args, kwargs = call
        with torch.no_grad():
            return torch.cat([self.call_block(block, hidden[s : s + batch], args, kwargs)
                              for s in range(0, hidden.shape[0], batch)])

    def _head(self) -> tuple[nn.Module, nn.Module]:
        decoder = self.model.base_model if hasattr(self.model, "base_model") else self.model.model
        norm = getattr(decoder, "norm", None) or getattr(decoder, "ln_f", None)
        if norm is None:
            raise WeightsError("this model has no final norm hwq knows how to stream "
                               "(expected model.norm or transformer.ln_f)")
        return norm, self.model.get_output_embeddings()

    def head_modules(self) -> tuple[nn.Module, nn.Module]:
        """The final norm and the output head (loaded)."""
        norm, head = self._head()
        return self.load(norm), self.load(head)

    def window_nll(self, hidden: Tensor, windows: Tensor, chunk_tokens: int = 128) -> Tensor:
        """Per-window sum of next-token NLL from the last block's output (differentiable)."""
        if not self.plain_head:
            raise WeightsError("this model transforms its logits after the output head "
                               "(soft-capping or a logit scale); its loss is not streamed")
        norm, head = self.head_modules()
        h = norm(hidden)[:, :-1]
        targets = windows[:, 1:]
        total = h.new_zeros(h.shape[0], dtype=torch.float32)
        for s in range(0, h.shape[1], chunk_tokens):
            hs, ts = h[:, s : s + chunk_tokens], targets[:, s : s + chunk_tokens]
            if torch.is_grad_enabled():  # logits recomputed in the backward, not kept
                total = total + checkpoint(_chunk_nll, head, hs, ts, use_reentrant=False)
            else:
                total = total + _chunk_nll(head, hs, ts)
        return total

    def release_head(self) -> None:
        for m in self._head():
            self.unload(m)

    def perplexity(self, windows: Tensor, *, batch: int = 8, progress=None) -> float:
        """exp(mean NLL over every predicted token), the model streamed block by block."""
        hidden, calls = self.block_inputs(windows)
        for i in range(len(self.layers)):
            self.block(i)
            hidden = self.run_block(i, hidden, calls[i], batch=batch)
            self.unload(self.layers[i])
            if progress:
                progress(i)
        with torch.no_grad():
            nll = torch.cat([self.window_nll(hidden[s : s + batch], windows[s : s + batch])
                             for s in range(0, hidden.shape[0], batch)])
        self.release_head()
        return math.exp(float(nll.double().sum()) / (windows.shape[0] * (windows.shape[1] - 1)))


class ActivationCache:
    """Tensors by key: in memory while the total stays under `max_bytes`, else in files."""

    def __init__(self, max_bytes: int, spill_dir: str | os.PathLike):
        self.max_bytes = int(max_bytes)
        self.dir = os.path.join(str(spill_dir), f"acts-{uuid.uuid4().hex[:12]}")
        self.mem: dict[Any, Tensor] = {}
        self.on_disk: set[Any] = set()
        self.bytes = 0
        self.spilled_bytes = 0

    def put(self, key: Any, t: Tensor) -> None:
        from safetensors.torch import save_file

        self.drop(key)
        n = t.numel() * t.element_size()
        if self.bytes + n <= self.max_bytes:
            self.mem[key] = t
            self.bytes += n
            return
        os.makedirs(self.dir, exist_ok=True)
        save_file({"t": t.contiguous()}, self._path(key))
        self.on_disk.add(key)
        self.spilled_bytes += n

    def get(self, key: Any) -> Tensor:
        from safetensors.torch import load_file

        if key in self.mem:
            return self.mem[key]
        if key in self.on_disk:
            return load_file(self._path(key))["t"]
        raise KeyError(key)

    def drop(self, key: Any) -> None:
        t = self.mem.pop(key, None)
        if t is not None:
            self.bytes -= t.numel() * t.element_size()
        if key in self.on_disk:
            self.on_disk.discard(key)
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._path(key))

    def _path(self, key: Any) -> str:
        return os.path.join(self.dir, f"{key}.safetensors")

    def close(self) -> None:
        self.mem.clear()
        self.on_disk.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ActivationCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
