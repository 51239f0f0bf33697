"""The stage graph: what a stage is, and how a config becomes an ordered plan of keyed stages.

A stage's key is a digest of (its name, format version, the config sections that decide its
output, its inputs' keys), so a changed setting re-keys that stage and everything downstream,
and a sweep over one stage's settings shares every stage upstream of it.

This module imports no stage and nothing of the driver: stage modules import it to declare
themselves, `pipeline.stages` lists them in order, and the driver runs a plan.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import RunConfig, section_digest
from pipeline.store import StageDir, Store

__all__ = ["Stage", "StageContext", "StagePlan", "plan"]

log = logging.getLogger("hwq")


@dataclass
class StageContext:
    """What a stage's `run` receives: the config, its own folder, its inputs' folders."""

    cfg: RunConfig
    store: Store
    out: StageDir
    inputs: dict[str, StageDir]
    log: logging.Logger = field(default_factory=lambda: log)
    # The config sections hashed into the stage key (as planned; a stage may check that what
    # it reads still matches them).
    sections: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """One node of the graph.

    inputs(cfg): names of upstream stages (only enabled ones).
    sections(cfg): the JSON-able settings that decide this stage's output (hashed in its key).
    run(ctx): does the work (Ray tasks inside), writes files into ctx.out, returns metrics that
        go into report.json's `metrics` (flat keys, or a dict under the stage's name).
    headline: metric keys `hwq status` shows.
    outputs(cfg): files the stage always writes; a manifest that does not list them all does
        not make the stage complete (it may write more: every file is hashed).
    """

    name: str
    version: int
    inputs: Callable[[RunConfig], tuple[str, ...]]
    sections: Callable[[RunConfig], dict[str, Any]]
    run: Callable[[StageContext], dict[str, Any]]
    enabled: Callable[[RunConfig], bool] = lambda cfg: True
    headline: tuple[str, ...] = ()
    outputs: Callable[[RunConfig], tuple[str, ...]] = lambda cfg: ()


@dataclass
class StagePlan:
    stage: Stage
    key: str
    inputs: dict[str, str]  # upstream name -> key
    config: dict[str, Any]


def plan(cfg: RunConfig, stages: list[Stage]) -> list[StagePlan]:
    """The enabled stages of `stages` (in order: `pipeline.stages.default_stages()`, or a
    test's own), each with its key. This module imports no stage: the caller names them."""
    keys: dict[str, str] = {}
    out = []
    for st in stages:
        if not st.enabled(cfg):
            continue
        inputs = {}
        for name in st.inputs(cfg):
            if name not in keys:
                raise ValueError(f"stage {st.name} needs stage {name}, which is disabled")
            inputs[name] = keys[name]
        conf = st.sections(cfg)
        key = section_digest(
            {"stage": st.name, "version": st.version, "config": conf, "inputs": inputs}
        )
        keys[st.name] = key
        out.append(StagePlan(st, key, inputs, conf))
    return out
