"""Peer (baseline) weight-only quantizers that hwq is compared against on an LLM.

Each function quantizes, in place, the weights of the given Linear layers of a
``torch.nn.Module`` (a Hugging Face causal LM in fp32 on CPU) and leaves plain
fp32 ``nn.Linear`` weights holding the dequantized values, so a plain forward
pass gives the quantized model's outputs.  Each returns a summary dict::

    {"method", "bits", "group", "bits_per_weight", "side_bits", "code_bits",
     "quantized_params", "note"}

Bits are counted the same way for every method: ``code_bits`` is ``bits`` per
quantized weight, ``side_bits`` is 16 bits for each scale and 16 bits for each
zero/offset (fp16 side information) per group, and
``bits_per_weight = (code_bits + side_bits) / quantized_params``.  For HQQ the
side bits are read from the tensors it actually stores.

``names`` lists Linear parameter names as in ``model.named_parameters()``
(``"model.layers.0.mlp.up_proj.weight"``); a module name (without ``.weight``)
is accepted too.

- :func:`rtn`  round-to-nearest, asymmetric min-max per group (fp16 scale+zero).
- :func:`hqq`  HQQ (PyPI ``hqq``), half-quadratic zero-point optimisation.
- :func:`gptq` GPTQ through llm-compressor's ``oneshot`` (PyPI ``llmcompressor``).
- :func:`awq`  AWQ's activation-aware scales, then round-to-nearest, through the same.

The optional packages are listed in ``benchmarks/requirements-peers.txt``.
"""
from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["rtn", "hqq", "gptq", "awq", "resolve_linears", "side_bits_per_group_layout"]

FP16_BITS = 16


# --------------------------------------------------------------------------- helpers
def _module_name(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def resolve_linears(model: nn.Module, names: Iterable[str]) -> list[tuple[str, nn.Linear]]:
    """Map parameter (or module) names to their ``nn.Linear`` modules, in order, no repeats."""
    modules = dict(model.named_modules())
    out: list[tuple[str, nn.Linear]] = []
    seen: set[str] = set()
    for name in names:
        mname = _module_name(name)
        if mname in seen:
            continue
        mod = modules.get(mname)
        if mod is None:
            raise KeyError(f"no module named {mname!r} (from {name!r})")
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"{mname!r} is a {type(mod).__name__}, not an nn.Linear")
        seen.add(mname)
        out.append((mname, mod))
    if not out:
        raise ValueError("no Linear layers given")
    return out


def side_bits_per_group_layout(rows: int, cols: int, group: int, per_group_bits: int = 2 * FP16_BITS) -> int:
    """Side bits of a [rows, cols] weight quantized in row-wise groups of ``group`` columns
    (a shorter last group when cols is not a multiple of group)."""
    return rows * math.ceil(cols / group) * per_group_bits


def _summary(method: str, bits: int, group: int, params: int, side_bits: int, note: str) -> dict:
    code_bits = params * bits
    return {
        "method": method,
        "bits": int(bits),
        "group": int(group),
        "bits_per_weight": (code_bits + side_bits) / params,
        "side_bits": int(side_bits),
        "code_bits": int(code_bits),
        "quantized_params": int(params),
        "note": note,
    }


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


def _check_group(group: int) -> None:
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be a positive int, got {group!r}")


# --------------------------------------------------------------------------- RTN
@torch.no_grad()
def _rtn_block(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min-max round-to-nearest of each row of ``w`` [rows, g] (one group per
    row); scale and zero are rounded to fp16 before dequantizing."""
    maxq = (1 << bits) - 1
    lo = w.amin(dim=1, keepdim=True)
    hi = w.amax(dim=1, keepdim=True)
    amax = torch.maximum(lo.abs(), hi.abs())
    # Keep |zero| = |lo|/scale <= 2**14 (finite in fp16) in (near-)constant groups; a
    # real group's (hi-lo)/maxq is far above amax/2**14, so this never bites there.
    scale = torch.maximum((hi - lo) / maxq, amax / 2.0**14)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(torch.float16).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))  # fp16 underflow
    zero = (-lo / scale).to(torch.float16).to(torch.float32)
    q = torch.clamp(torch.round(w / scale + zero), 0, maxq)
    return (q - zero) * scale


@torch.no_grad()
def rtn(model: nn.Module, names: list[str], bits: int, group: int = 128) -> dict:
    """Round-to-nearest, asymmetric min-max per group of ``group`` consecutive input
    columns of each row, fp16 scale and fp16 zero (offset in code units) per group:
    ``w ~ (q - z) * s`` with ``q = clamp(round(w / s + z), 0, 2**bits - 1)``.
    A row whose length is not a multiple of ``group`` ends in a shorter group."""
    _check_bits(bits)
    _check_group(group)
    params = side = 0
    for _, mod in resolve_linears(model, names):
        w = mod.weight.data
        rows, cols = w.shape
        wf = w.float()
        out = torch.empty_like(wf)
        full = (cols // group) * group
        if full:
            blk = wf[:, :full].reshape(-1, group)
            out[:, :full] = _rtn_block(blk, bits).reshape(rows, full)
        if full < cols:
            out[:, full:] = _rtn_block(wf[:, full:], bits)
        w.copy_(out.to(w.dtype))
        params += w.numel()
        side += side_bits_per_group_layout(rows, cols, group)
    ragged = any(m.weight.shape[1] % group for _, m in resolve_linears(model, names))
    note = "asym min-max RTN, fp16 scale + fp16 zero per group"
    if ragged:
        note += f"; rows not a multiple of {group} end in a shorter group (counted)"
    return _summary("rtn", bits, group, params, side, note)


# --------------------------------------------------------------------------- HQQ
@torch.no_grad()
def hqq(model: nn.Module, names: list[str], bits: int, group: int = 128) -> dict:
    """HQQ (``hqq`` package): ``HQQLinear`` with ``BaseQuantizeConfig(nbits=bits,
    group_size=group, axis=1)`` on CPU with fp16 meta-data (its default), then the
    stored codes are dequantized with the stored fp16 scale/zero into the fp32 weight.

    HQQ groups ``group`` consecutive elements of the row-major weight (it reshapes the
    whole tensor to [-1, group]); when a row length is not a multiple of ``group`` a
    group spans the end of one row and the start of the next.  Side bits are counted
    from the scale/zero tensors it stores."""
    _check_bits(bits)
    _check_group(group)
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear, Quantizer

    if bits not in Quantizer.SUPPORTED_BITS:
        raise ValueError(f"hqq does not support {bits} bits")
    cfg = BaseQuantizeConfig(nbits=bits, group_size=group, axis=1)
    params = side = 0
    straddle = False
    for _, mod in resolve_linears(model, names):
        w = mod.weight.data
        if w.numel() % group:
            raise ValueError(f"hqq needs numel divisible by group={group}, got shape {tuple(w.shape)}")
        straddle |= bool(w.shape[1] % group)
        layer = HQQLinear.from_weights(
            w.detach().clone().float(), None, cfg,
            compute_dtype=torch.float16, device="cpu", del_orig=True,
        )
        meta = layer.meta
        if meta.get("quant_scale") or meta.get("quant_zero") or "zero_scale" in meta:
            raise RuntimeError("hqq quantized/packed its meta-data; not supported here")
        scale, zero = meta["scale"], meta["zero"]
        meta_f32 = dict(meta)
        meta_f32["compute_dtype"] = torch.float32  # fp16 scale/zero applied in fp32
        w_hat = Quantizer.dequantize(layer.W_q.data, meta_f32)
        if w_hat.shape != w.shape:
            raise RuntimeError(f"hqq dequantized shape {tuple(w_hat.shape)} != {tuple(w.shape)}")
        w.copy_(w_hat.to(w.dtype))
        params += w.numel()
        side += scale.numel() * scale.element_size() * 8 + zero.numel() * zero.element_size() * 8
        del layer
    note = (f"hqq HQQLinear, axis=1, optimize=True, round_zero={cfg['weight_quant_params']['round_zero']}, "
            f"scale/zero {FP16_BITS}-bit as stored")
    if straddle:
        note += f"; groups are {group} consecutive weights of the flattened matrix (some span two rows)"
    return _summary("hqq", bits, group, params, side, note)


# --------------------------------------------------------------------------- GPTQ
def _gptq_group(cols_list: list[int], group: int) -> int:
    """The group llm-compressor accepts nearest to ``group``: its weight observer needs
    every row length to be a multiple of the group (a shorter or ragged last group is
    refused).  Largest power of two <= group dividing every row length (kernel-friendly
    sizes; for SmolLM2's 576/1536 and group 128 that is 64)."""
    def ok(g: int) -> bool:
        return all(c % g == 0 for c in cols_list)

    if ok(group):
        return group
    g = 1 << (group.bit_length() - 1)
    while g > 1 and not ok(g):
        g //= 2
    return g


def _strip_compressed_tensors(model: nn.Module, own_forwards: set[int]) -> None:
    """Leave a plain transformers model after oneshot: undo llm-compressor's CPU
    "dispatch" (offload caches and forward wrappers on every module; the forwards it
    restores are the ones captured while its pipeline had patched them), the quantized
    forward, q-params, observers and status attributes that compressed-tensors attached,
    and the wrapped save_pretrained.  Target weights must already hold dequantized values.
    ``own_forwards``: ids of modules that had an instance ``forward`` before oneshot."""
    from compressed_tensors.offload.dispatch import remove_dispatch
    from compressed_tensors.quantization.quant_metadata import QuantizationMetadata

    remove_dispatch(model, onload_tensors=True)
    for mod in model.modules():
        QuantizationMetadata.clear_quantization(mod)
        if id(mod) not in own_forwards:
            mod.__dict__.pop("forward", None)
        for attr in ("quantization_status", "quantization_enabled", "_original_forward_func"):
            mod.__dict__.pop(attr, None)
        for attr in list(mod._modules):
            if attr.endswith("_observer"):
                del mod._modules[attr]
        for attr in list(mod._parameters) + list(mod._buffers):
            if attr.startswith(("weight_", "input_", "output_")):
                delattr(mod, attr)
    model.__dict__.pop("save_pretrained", None)


def gptq(model: nn.Module, names: list[str], bits: int, group: int, calib_windows: torch.Tensor,
         *, dampening_frac: float = 0.01, block_size: int = 128, pipeline: str | None = None) -> dict:
    """GPTQ through llm-compressor ``oneshot`` with a ``GPTQModifier`` (weight-only,
    asymmetric int ``bits``, groups of ``group`` input columns, fp16 scales,
    llm-compressor's default static activation ordering), calibrated on the token windows
    ``calib_windows`` (int64 [n, seq_len]).  Only the Linear layers in ``names`` are
    quantized (every other Linear, lm_head included, is in the recipe's ignore list).

    If a row length >= group is not a multiple of ``group`` (llm-compressor refuses that),
    the largest power-of-two group dividing all such rows is used and "note" says so.
    After oneshot the compressed-tensors wrappers are removed: each Linear holds its
    dequantized fp32 weight."""
    from llmcompressor.modifiers.quantization import GPTQModifier

    def recipe(scheme, others):
        return GPTQModifier(config_groups={"group_0": scheme}, ignore=others,
                            dampening_frac=dampening_frac, block_size=block_size)

    return _oneshot("gptq", model, names, bits, group, calib_windows, recipe,
                    "llm-compressor GPTQModifier, asym, fp16 scales, static actorder", pipeline)


def awq(model: nn.Module, names: list[str], bits: int, group: int, calib_windows: torch.Tensor,
        *, n_grid: int = 20, pipeline: str | None = None) -> dict:
    """AWQ through llm-compressor ``oneshot``: its ``AWQModifier`` (Llama mappings: each
    decoder block's input norm → q/k/v, v → o, post-attention norm → gate/up, up → down)
    searches per-channel scales on the calibration activations (``n_grid`` points, duo
    scaling) and folds them into the smoothing layers, then a ``QuantizationModifier``
    rounds the Linears in ``names`` to asymmetric int ``bits`` per group with fp16 scales.
    Groups, calibration and the returned summary as in :func:`gptq`. The norms' weights the
    scales were folded into stay unquantized (as the peers' other unquantized tensors)."""
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache

    def recipe(scheme, others):
        return [AWQModifier(n_grid=n_grid),
                QuantizationModifier(config_groups={"group_0": scheme}, ignore=others)]

    # llm-compressor 0.14's AWQ pins its activation cache for host-to-GPU copies, which a
    # CPU-only torch refuses ("Cannot access accelerator device"); pinning changes no value,
    # so without an accelerator it is skipped for this call.
    pin = IntermediatesCache.pin_memory
    if not torch.cuda.is_available():
        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    try:
        return _oneshot("awq", model, names, bits, group, calib_windows, recipe,
                        f"llm-compressor AWQModifier (n_grid {n_grid}, duo scaling) + "
                        "QuantizationModifier, asym, fp16 scales", pipeline)
    finally:
        IntermediatesCache.pin_memory = pin


def _oneshot(method: str, model: nn.Module, names: list[str], bits: int, group: int,
             calib_windows: torch.Tensor, make_recipe, note: str,
             pipeline: str | None = None) -> dict:
    """Run llm-compressor's ``oneshot`` with ``make_recipe(scheme, ignored Linear names)`` on
    the Linears in ``names`` and leave a plain model holding the dequantized weights."""
    _check_bits(bits)
    _check_group(group)
    import datasets
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot

    calib = torch.as_tensor(calib_windows)
    if calib.ndim != 2 or calib.dtype not in (torch.int64, torch.int32):
        raise ValueError("calib_windows must be an int64 tensor [n, seq_len]")
    n, seq_len = calib.shape
    targets = resolve_linears(model, names)
    target_names = {m for m, _ in targets}
    others = [name for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name not in target_names]
    g = _gptq_group([m.weight.shape[1] for _, m in targets], group)
    if g != group:
        note += (f"; group {group} refused (row lengths "
                 f"{sorted({m.weight.shape[1] for _, m in targets})}), used group {g}")

    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group",
                                 group_size=g, scale_dtype=torch.float16),
        input_activations=None, output_activations=None,
    )
    recipe = make_recipe(scheme, others)
    ds = datasets.Dataset.from_dict({
        "input_ids": calib.to(torch.int64).tolist(),
        "attention_mask": torch.ones_like(calib, dtype=torch.int64).tolist(),
    })

    # oneshot re-reads the config from model.config.name_or_path, refuses a model whose
    # config carries another quantization_config (a GGUF checkpoint loaded by transformers
    # has quant_method "gguf" although its weights are dequantized to fp32), and needs a
    # processor when given a dataset (the dataset is already tokenized, so none is used).
    own_forwards = {id(m) for m in model.modules() if "forward" in m.__dict__}
    cfg = model.config
    old_path = getattr(cfg, "_name_or_path", "")
    had_qcfg = "quantization_config" in cfg.__dict__
    old_qcfg = cfg.__dict__.pop("quantization_config", None)
    try:
        with tempfile.TemporaryDirectory(prefix=f"hwq_{method}_") as tmp:
            cfg.save_pretrained(tmp)
            cfg._name_or_path = tmp
            kwargs = dict(model=model, recipe=recipe, dataset=ds, processor=_TokenizedOnly(),
                          num_calibration_samples=n, max_seq_length=seq_len,
                          shuffle_calibration_samples=False, output_dir=None)
            if pipeline is not None:
                kwargs["pipeline"] = pipeline
            oneshot(**kwargs)
    finally:
        cfg._name_or_path = old_path
        cfg.__dict__.pop("quantization_config", None)
        if had_qcfg:
            cfg.quantization_config = old_qcfg

    params = side = 0
    quantized = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and getattr(mod, "quantization_scheme", None) is not None:
            quantized.add(name)
    if quantized != target_names:
        raise RuntimeError(f"llm-compressor quantized {sorted(quantized ^ target_names)[:5]}... "
                           "differently from the requested names")
    from compressed_tensors.offload.dispatch import remove_dispatch

    remove_dispatch(model, onload_tensors=True)  # plain parameter dicts before writing weights
    for _name, mod in targets:
        with torch.no_grad():
            w_hat = _ct_dequant(mod.weight.data.float(), mod.weight_scale.detach().float(),
                                mod.weight_zero_point.detach(), mod.quantization_scheme.weights)
            mod.weight.data.copy_(w_hat.to(mod.weight.dtype))
        rows, cols = mod.weight.shape
        params += rows * cols
        side += side_bits_per_group_layout(rows, cols, g)
    _strip_compressed_tensors(model, own_forwards)
    return _summary(method, bits, g, params, side, note)


class _TokenizedOnly:
    """Stand-in processor: the calibration dataset already holds input_ids."""

    pad_token_id = 0
    eos_token_id = 0
    bos_token_id = None
    model_max_length = 1 << 30

    def __call__(self, *a, **k):  # pragma: no cover - only reached on untokenized text
        raise RuntimeError("calibration data must already be tokenized")


def _ct_dequant(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, args) -> torch.Tensor:
    """Re-apply the stored qparams with compressed-tensors' own fake_quantize (a no-op on
    GPTQ's output, which already lies on the grid), to make sure the weight is on it."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    return fake_quantize(w, scale, zp, args)
