"""The Python API: `compress(config, **overrides)` runs hwq's stages and returns the report.

    from pipeline import compress

    report = compress("configs/smollm2_135m.yaml", quantize={"target_bits": 4.0},
                      store="runs/smol")
    report["metrics"]["decoded_perplexity"], report["metrics"]["bits_per_weight"]

`hwq run` is a thin layer over this function.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from pipeline.config import ConfigError, RunConfig, apply_overrides, from_dict, load_config
from pipeline.config_paths import resolve_paths

__all__ = ["compress", "to_config"]


def _flatten(prefix: str, value: Any) -> list[str]:
    """{"quantize": {"target_bits": 4}} → ["quantize.target_bits=4"] (values as JSON, which is
    YAML)."""
    import json

    if isinstance(value, Mapping) and value and all(isinstance(k, str) for k in value) and \
            prefix.count(".") < 1:
        out = []
        for k, v in value.items():
            out += _flatten(f"{prefix}.{k}" if prefix else k, v)
        return out
    return [f"{prefix}={json.dumps(value)}"]


def to_config(config: RunConfig | Mapping[str, Any] | str | os.PathLike | None = None,
              overrides: Iterable[str] | Mapping[str, Any] = (), **sections: Any) -> RunConfig:
    """A validated RunConfig from a RunConfig, a dict, a YAML path or None (defaults), with
    overrides applied: "section.key=value" strings, a {"section.key": value} mapping, or
    keyword sections (`quantize={"target_bits": 4}`, `store="runs/x"` for store.url)."""
    items: list[str] = []
    if isinstance(overrides, Mapping):
        import json

        items += [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    else:
        items += list(overrides)
    for name, value in sections.items():
        if name == "store" and isinstance(value, (str, os.PathLike)):
            items.append(f"store.url={os.fspath(value)}")
        elif isinstance(value, Mapping):
            items += _flatten(name, value)
        else:
            import json

            items.append(f"{name}={json.dumps(value)}")
    # Relative paths of a config given as an object are relative to the working folder.
    if isinstance(config, RunConfig):
        return from_dict(resolve_paths(apply_overrides(config.model_dump(mode="json"), items),
                                       os.getcwd()))
    if isinstance(config, Mapping):
        return from_dict(resolve_paths(apply_overrides(dict(config), items), os.getcwd()))
    if config is None or isinstance(config, (str, os.PathLike)):
        return load_config(config, items)
    raise ConfigError(f"config must be a RunConfig, a dict or a YAML path, got "
                      f"{type(config).__name__}")


def compress(config: RunConfig | Mapping[str, Any] | str | os.PathLike | None = None,
             overrides: Iterable[str] | Mapping[str, Any] = (), *,
             force: Iterable[str] = (), keep_ray: bool = False, out: str | None = None,
             hf_out: bool = False, **sections: Any) -> dict[str, Any]:
    """Run every stage of the config not already in its store; return the report.

    config: a RunConfig, a dict of sections, or a YAML path (None: the LeNet-5 defaults).
    overrides: "section.key=value" strings or a {"section.key": value} mapping.
    sections: keyword overrides by section, e.g. `quantize={"method": "ecsq"}`,
        `store="s3://bucket/prefix"`, `executor={"address": "auto"}`.
    force: stages to recompute with everything downstream of them.
    keep_ray: leave the Ray runtime this call started running (for several calls in a row).
    out: a folder or URL to copy the final model.hwq to (with hf_out, also the decoded
        Hugging Face folder, hf/); the report's `output` says where (pipeline/outputs.py).

    Returns the report: {"name", "config_digest", "model", "metric", "stages", "metrics",
    "seconds"} — what report.json holds; metrics are keyed `<stage>_<metric name>`
    (`baseline_perplexity`, `decoded_accuracy`, ...).
    """
    from pipeline import driver
    from pipeline.progress import default_log_handler

    default_log_handler()  # progress lines even where the caller configured no logging
    cfg = to_config(config, overrides, **sections)
    try:
        return driver.run(cfg, force=list(force), out=out, hf_out=hf_out)
    finally:
        if not keep_ray:
            from pipeline.executor import shutdown_ray

            shutdown_ray()
