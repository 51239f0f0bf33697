"""Checks of a run config that need more than one section, kept out of config.py: sizes
with units, and which runs the per-tensor stages and the streamed residency can take."""

from __future__ import annotations

import re

__all__ = ["check_finetune_batch", "check_prune", "check_serve_bits", "feedback_gap", "finetune_mode", "one_shot", "prune_method",
           "parse_bytes", "parse_n_m", "per_tensor", "per_tensor_gap", "prune_gap", "serve_levels",
           "rotate_gap", "second_moments", "streamed_gap"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(v: int | str, key: str) -> int:
    """A size as bytes: an integer, or a number with a unit ("24GiB", "500 MB", "1.5gb")."""
    if isinstance(v, bool):
        raise ValueError(f"{key} is a size such as 24GiB, not {v!r}")
    if isinstance(v, int):
        n = v
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(v))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{key}={v!r} is not a size: write e.g. 24GiB, 500MB or 1000000")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 1:
        raise ValueError(f"{key} must be a positive size, got {v!r}")
    return n


def finetune_mode(cfg) -> str:
    """finetune.mode resolved: `auto` is blockwise for a streamed causal LM (the end-to-end
    fine-tune holds the whole model) and end_to_end otherwise."""
    mode = cfg.finetune.mode
    if mode != "auto":
        return mode
    streamed = cfg.model.residency == "streamed" and cfg.model.name == "hf_causal_lm"
    return "blockwise" if streamed else "end_to_end"


def parse_n_m(text: str) -> tuple[int, int]:
    """(n, m) of an "N:M" pattern: n of every m consecutive weights kept, 0 < n < m ≤ 64."""
    mt = re.fullmatch(r"\s*([0-9]+)\s*:\s*([0-9]+)\s*", str(text))
    if not mt:
        raise ValueError(f"prune.n_m={text!r} is not an N:M pattern such as 2:4")
    n, m = int(mt.group(1)), int(mt.group(2))
    if not 0 < n < m <= 64:
        raise ValueError(f"prune.n_m={text!r}: need 0 < N < M ≤ 64 (2:4 keeps 2 of every 4)")
    return n, m


def per_tensor_gap(cfg) -> str | None:
    """What keeps a causal LM off the per-tensor stages (hessian/streamed_stage.py,
    quantize/tensors_stage.py, encode/tensors_stage.py) — the settings they do not cover yet —
    else None. Both residencies run those stages when this is None; a resident run outside
    them takes the whole-model stage bodies."""
    if cfg.model.name != "hf_causal_lm":
        return "model.name=hf_causal_lm (a safetensors folder or a GGUF file)"
    if cfg.finetune.enabled and cfg.quantize.enabled and finetune_mode(cfg) != "blockwise":
        return ("finetune.mode=blockwise or finetune.enabled=false (end-to-end fine-tuning "
                "holds the whole model)")
    if cfg.quantize.scope != "channel" or cfg.quantize.method not in ("uniform", "ecsq"):
        return "quantize.scope=channel with quantize.method uniform or ecsq"
    if cfg.encode.positions != "gaps" or cfg.encode.indices != "static" or \
            cfg.encode.fixed_length:
        return "encode.indices=static and encode.positions=gaps"
    return None


def per_tensor(cfg) -> bool:
    """Whether the stages after `load` run per tensor (a streamed model always does)."""
    return cfg.model.residency == "streamed" or (cfg.quantize.enabled
                                                 and per_tensor_gap(cfg) is None)


def streamed_gap(cfg) -> str | None:
    """What the streamed residency cannot run: settings outside the per-tensor stages
    (`per_tensor_gap`). A causal LM's safetensors folder or GGUF file (the load stage
    converts a GGUF one tensor at a time) both stream."""
    return per_tensor_gap(cfg)


def prune_method(cfg) -> str:
    """prune.method resolved: `auto` is one_shot for a causal LM (no training split to
    retrain on), retrain otherwise."""
    m = cfg.prune.method
    if m != "auto":
        return m
    return "one_shot" if cfg.model.name == "hf_causal_lm" else "retrain"


def one_shot(cfg) -> bool:
    """Whether the quantize stage prunes (one-shot pruning on)."""
    return bool(cfg.prune.enabled) and prune_method(cfg) == "one_shot"


def check_prune(cfg, given: bool) -> None:
    """The prune section against the model (ValueError if it cannot run), with what the
    method implies filled in: scope row (one shot) or layer; a causal LM's keep {} unless
    given (LeNet-5's names are no language model's), so a dumped config re-enables pruning as
    it was. given: prune.enabled was set in the config (else a model hwq did not train is
    not pruned)."""
    p = cfg.prune
    if p.scope is None:
        p.__dict__["scope"] = "row" if prune_method(cfg) == "one_shot" else "layer"
    if cfg.model.name == "hf_causal_lm" and "keep" not in p.model_fields_set:
        p.__dict__["keep"] = {}
    if not cfg.model.trained_here:
        if p.enabled and given:
            why = prune_gap(cfg)  # a model of your own retrains on its "train" split
            if why:
                raise ValueError(why)
        else:
            p.__dict__["enabled"] = False
    elif p.enabled and (prune_method(cfg) != "retrain" or p.scope == "row" or
                        p.n_m is not None):
        raise ValueError("LeNet-5 prunes with retraining (prune.method=retrain, prune.scope="
                         "layer or global, no prune.n_m)")
    if p.enabled and p.criterion == "obd" and prune_method(cfg) == "retrain" and \
            cfg.hessian.estimator not in ("ggn", "fisher", "hutchinson"):
        raise ValueError(f"prune.criterion=obd re-estimates the Hessian on the masked model "
                         f"before each step, which hessian.estimator={cfg.hessian.estimator} "
                         "cannot (it reads the training run's Adam state); use "
                         "hessian.estimator=ggn, fisher or hutchinson")


def prune_gap(cfg) -> str | None:
    """Why pruning cannot run for a model hwq did not train (prune.enabled set), else None.
    A model of your own (model.name=factory) prunes by magnitude and retrains on its data's
    "train" split, as LeNet-5 does; a causal LM prunes one shot (`one_shot_gap`)."""
    if prune_method(cfg) == "one_shot":
        return one_shot_gap(cfg)
    if cfg.model.name != "factory":
        return ("prune.method=retrain is for models trained on their own data (model.name="
                "lenet5 or factory); a causal LM prunes with prune.method=one_shot")
    if "keep" not in cfg.prune.model_fields_set:
        return ("prune.keep: name the fraction of each tensor to keep, e.g. "
                "{fc1.weight: 0.1} (the default names LeNet-5's tensors)")
    if cfg.prune.criterion != "magnitude":
        return ("prune.criterion=obd re-estimates the Hessian with LeNet-5's estimators; a "
                "model of your own prunes by prune.criterion=magnitude")
    if cfg.prune.scope == "row" or cfg.prune.n_m is not None:
        return ("prune.scope=row and prune.n_m are one-shot settings (prune.method=one_shot); "
                "retraining prunes per layer or globally")
    if cfg.quantize.enabled and cfg.quantize.scope in ("channel", "group"):
        return ("a pruned model of your own is quantized with quantize.scope=network or layer "
                "(its rows keep different counts, which the per-row solvers do not take)")
    return None


def one_shot_gap(cfg) -> str | None:
    """What one-shot pruning cannot run with, else None. Fills in what the settings imply
    (scope row; keep {"*": N/M} for an N:M pattern) so every dump holds the value used."""
    p = cfg.prune
    if cfg.model.name != "hf_causal_lm":
        return ("prune.method=one_shot is for causal LMs (model.name=hf_causal_lm); a model "
                "with its own data retrains (prune.method=retrain)")
    if p.scope != "row":
        return (f"prune.scope={p.scope}: one-shot pruning keeps the same number of weights in "
                "every row (prune.scope=row), so a row's kept weights quantize as one dense row")
    if p.n_m is not None:
        n, m = parse_n_m(p.n_m)
        if not p.keep:
            p.__dict__["keep"] = {"*": n / m}
        elif any(abs(r - n / m) > 1e-9 for r in p.keep.values()):
            return (f"prune.keep: with prune.n_m={p.n_m} every tensor keeps {n}/{m}; name the "
                    f"tensors with that fraction (e.g. {{'*': {n / m:g}}}) or drop prune.keep")
    elif not p.keep:
        return ("prune.keep: name the fraction to keep, e.g. {'*': 0.5} (every decoder "
                "Linear) or {'model.layers.*.mlp.*': 0.5}; or prune.n_m: '2:4'")
    if not cfg.quantize.enabled or cfg.quantize.scope != "channel":
        return ("quantize.scope=channel: one-shot pruning happens in the per-channel "
                "quantizer (quantize.enabled=true)")
    if p.criterion == "obd" and not cfg.hessian.enabled:
        return "hessian.enabled=true: prune.criterion=obd weighs w² by the Hessian"
    return None


def serve_levels(cfg) -> int | None:
    """The most levels a row may have under quantize.serve_bits: 2**bits, one fewer when
    pruning is on (a pruned weight is a zero the runtime's table must hold too); None if
    quantize.serve_bits is not set."""
    bits = cfg.quantize.serve_bits
    if bits is None:
        return None
    return (1 << bits) - (1 if cfg.prune.enabled else 0)


def check_serve_bits(cfg) -> None:
    """Fits quantize.k_max to quantize.serve_bits (per-row uniform/ECSQ), or refuses a
    setting that contradicts it: a fixed k (k-means, uniform with k, layer_k) above the cap,
    an explicit k_max above it, or a method whose level count has no cap (network/layer
    uniform or ECSQ by target_bits). Raises ValueError (a config error)."""
    q = cfg.quantize
    cap = serve_levels(cfg)
    why = f"quantize.serve_bits={q.serve_bits} allows at most {cap} levels a row" + (
        " (2^bits less the zero level pruned weights need)" if cfg.prune.enabled else "")
    ks = {"quantize.k": q.k} if q.k is not None else {}
    ks.update({f"quantize.layer_k[{n}]": k for n, k in (q.layer_k or {}).items()})
    for key, k in ks.items():
        if k > cap:
            raise ValueError(f"{key}={k} needs more than {q.serve_bits} bits a weight to "
                             f"serve: {why}; set {key} <= {cap} or raise quantize.serve_bits")
    if q.method in ("uniform", "ecsq") and q.k is None and q.layer_k is None:
        if q.scope not in ("channel", "group"):
            raise ValueError(f"quantize.serve_bits caps the levels of per-row codebooks "
                             f"(quantize.scope=channel or group); quantize.method={q.method} "
                             f"at scope={q.scope} sets its levels by target_bits with no cap: "
                             "use scope=channel, or a fixed quantize.k (uniform, k-means)")
        if "k_max" in q.model_fields_set and q.k_max > cap:
            raise ValueError(f"quantize.k_max={q.k_max} contradicts {why}; set "
                             f"quantize.k_max <= {cap} or leave it out")
        # The value used, in the dump and so in the stage key.
        q.__dict__["k_max"] = min(q.k_max, cap)
def feedback_gap(cfg) -> str | None:
    """What quantize.feedback=ldl cannot run with, else None: the error feedback runs in the
    per-tensor quantize stage (a causal LM, channel scope, ECSQ or uniform) and its X·Xᵀ in
    the per-tensor hessian stage."""
    if cfg.quantize.feedback == "none" or not cfg.quantize.enabled:
        return None
    if cfg.quantize.method not in ("ecsq", "uniform") or cfg.quantize.scope != "channel":
        return "quantize.scope=channel with quantize.method ecsq or uniform"
    if not cfg.hessian.enabled:
        return "hessian.enabled=true (the hessian stage estimates each Linear's X·Xᵀ)"
    return per_tensor_gap(cfg)


def rotate_gap(cfg) -> str | None:
    """What quantize.rotate=hadamard cannot run with, else None: the rotation is applied in
    the per-tensor quantize stage and undone by the block-wise fine-tune and the decoder."""
    if cfg.quantize.rotate == "none" or not cfg.quantize.enabled:
        return None
    if one_shot(cfg):
        return ("no one-shot pruning (prune.enabled=false): a mask of rotated weights would "
                "cut no weight of the model")
    return per_tensor_gap(cfg)


def second_moments(cfg) -> bool:
    """Whether the hessian stage also estimates each decoder Linear's X·Xᵀ: the error
    feedback's matrix, and a rotation's Hessian weights (the diagonal of V·XᵀX·Vᵀ)."""
    q = cfg.quantize
    return q.enabled and (q.feedback == "ldl" or q.rotate == "hadamard")


def check_finetune_batch(cfg) -> None:
    """A fine-tune batch the workers cannot split, or larger than the data it is drawn
    from, fails here rather than after the stages before fine-tuning."""
    ft = cfg.finetune
    if not (ft.enabled and cfg.quantize.enabled) or ft.mode == "blockwise":
        return
    if ft.batch_size % ft.workers:
        raise ValueError(f"finetune.batch_size={ft.batch_size} is not divisible by "
                         f"finetune.workers={ft.workers}: each worker takes an equal share")
    n, key = None, ""
    if cfg.data.name == "text":
        n, key = cfg.data.calibration_windows, "data.calibration_windows"
    elif cfg.data.name == "fashion_mnist" and not cfg.model.trained_here:
        # (a loaded model fine-tunes on the Hessian's calibration images)
        n, key = cfg.hessian.calibration_samples, "hessian.calibration_samples"
        if cfg.data.train_samples is not None and cfg.data.train_samples < n:
            n, key = cfg.data.train_samples, "data.train_samples"
    elif cfg.data.name == "fashion_mnist" and cfg.data.train_samples is not None:
        n, key = cfg.data.train_samples, "data.train_samples"
    if n is not None and ft.batch_size > n:
        raise ValueError(f"finetune.batch_size={ft.batch_size} is larger than the {n} "
                         f"samples it is drawn from ({key}); set finetune.batch_size ≤ "
                         f"{n} or raise {key}")
