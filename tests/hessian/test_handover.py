"""The streamed Hessian's handover units (pipeline/hessian/handover.py): chained through the
work folder, a partition's units give every group's sums bit for bit as one task that computes
the group's input itself — tied and untied embeddings and heads, any number of groups — and a
rerun plans only the units whose records are missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.hessian.handover import (
    activation_unit,
    fisher_backward_unit,
    fisher_forward_unit,
    forward_outputs,
    partial_rel,
    plan_partition,
    segments,
    x_rel,
)
from pipeline.hessian.shards import block_counts, block_groups
from pipeline.hessian.stream import activation_streamed, fisher_streamed
from pipeline.hessian.table import TensorTable
from pipeline.models.stream import StreamedLM
from pipeline.models.weights import WeightsFolder
from pipeline.store import ArtifactError, StageDir, Store
from testkit.models import tiny_sharded_bf16_folder

LAYERS = 4
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model(request, tmp_path_factory):
    tied = request.param
    path = str(tiny_sharded_bf16_folder(tmp_path_factory.mktemp("m") / "model", layers=LAYERS,
                                        hidden=32, tied=tied))
    blocks = [n for n in WeightsFolder(path).names if ".layers." in n and n.endswith("proj.weight")]
    return path, tied, blocks


def _windows(n=4, L=10):
    return torch.randint(0, 300, (n, L), generator=torch.Generator().manual_seed(3))


def _groups(path, blocks, G, first=(), last=()):
    """(range, names) per group as the stage plans them (`embedding_placement`): the
    Fisher's embedding to the first group, the head (and the activation statistics of a tied
    embedding) to the last."""
    ranges = block_groups(block_counts(WeightsFolder(path), blocks), G)
    out = []
    for k, rng in enumerate(ranges):
        own = [n for n in blocks if int(n.split(".")[2]) in rng]
        if k == 0:
            own = list(first) + own
        if k == len(ranges) - 1:
            own += list(last)
        out.append((rng, own))
    return out


def _reference(kind, path, windows, names, rng):
    got = {}
    fn = activation_streamed if kind == "activation" else fisher_streamed
    fn(StreamedLM(path, dtype=torch.float32 if kind == "fisher" else "stored",
                  stored_linears=kind == "fisher"), windows, names,
       lambda k, v, c: got.__setitem__(k, np.asarray(v, dtype=np.float32 if kind == "fisher"
                                                     else np.float64)), blocks=rng)
    return got


def _chain(kind, path, out, windows, groups, p=0):
    """One partition's units in the order the stage runs them; returns {tensor: sums}."""
    G = len(groups)
    segs = segments(groups, top=LAYERS if kind == "fisher" else None)
    shas: dict[str, dict] = {}

    def keep(r):
        for rec in r["records"].values():
            shas.update(rec["outputs"])

    if kind == "activation":
        for g, (rng, names) in enumerate(groups):
            keep(activation_unit(None, out, path, None, windows, p, g, segs[g], rng, names, True,
                                 g == G - 1, dict(shas)))
    else:
        for g in range(G):
            keep(fisher_forward_unit(None, out, path, None, windows, p, g, segs[g], g == G - 1,
                                     dict(shas)))
        for g in reversed(range(G)):
            rng, names = groups[g]
            keep(fisher_backward_unit(None, out, path, None, windows, p, g, segs[g], rng, names,
                                      True, g == G - 1, dict(shas)))
    got = {}
    for g, (_, names) in enumerate(groups):
        t = TensorTable(out.url(partial_rel(p, g)))
        for n in names:
            got[n] = t.read(n)
        t.close()
    return got


@pytest.mark.parametrize("kind", ["fisher", "activation"])
@pytest.mark.parametrize("G", [1, 2, 3])
def test_handed_over_groups_equal_the_recomputing_task(model, tmp_path, kind, G):
    path, tied, blocks = model
    if kind == "activation":  # an untied input embedding has no activation statistics
        first, last = [], [EMB] if tied else [HEAD]
    else:
        first, last = [EMB], [] if tied else [HEAD]
    groups = _groups(path, blocks, G, first, last)
    w = _windows()
    out = StageDir(Store(str(tmp_path / "store")), "hessian", "k")
    got = _chain(kind, path, out, w, groups)
    assert set(got) == set(blocks) | set(first) | set(last)
    for rng, names in groups:
        ref = _reference(kind, path, w, names, rng)
        for n in names:
            np.testing.assert_array_equal(got[n].reshape(ref[n].shape),
                                          ref[n].astype(got[n].dtype), err_msg=n)


def test_a_tampered_handover_file_is_refused(model, tmp_path):
    path, _, blocks = model
    groups = _groups(path, blocks, 2)
    out = StageDir(Store(str(tmp_path / "store")), "hessian", "k")
    segs = segments(groups, top=LAYERS)
    r = fisher_forward_unit(None, out, path, None, _windows(), 0, 0, segs[0], False, {})
    (rec,) = r["records"].values()
    assert set(rec["outputs"]) == set(forward_outputs(0, segs[0], False, True))
    shas = dict(rec["outputs"])
    rel = x_rel(0, segs[1].start)
    data = bytearray(out.store.read_bytes(out.rel(rel), None))
    data[-1] ^= 1
    out.store.write_bytes(out.rel(rel), bytes(data))
    with pytest.raises(ArtifactError, match="sha256 differs"):
        fisher_forward_unit(None, out, path, None, _windows(), 0, 1, segs[1], True, shas)
    with pytest.raises(RuntimeError, match="before a unit recorded it"):
        fisher_forward_unit(None, out, path, None, _windows(), 0, 1, segs[1], True, {})


def test_a_rerun_plans_only_what_its_records_miss():
    T, F = True, False
    # a fresh run: everything
    assert plan_partition([T, T, T], [F] * 3, [F] * 3, fisher=True) == ([T] * 3, [T] * 3)
    assert plan_partition([T, T, T], [F] * 3, [F] * 3, fisher=False) == ([T] * 3, [F] * 3)
    # killed in the backward sweep: groups 2 and 1 recorded their sums and group 1 its
    # cotangent: only group 0's backward runs, from the recorded files
    assert plan_partition([T, F, F], [T] * 3, [F, T, T], fisher=True) == ([F] * 3, [T, F, F])
    # the same, but the cotangent at group 1's input was lost: group 1's backward runs again
    # (for the cotangent only; its sums are recorded) and needs the forward files it reads
    assert plan_partition([T, F, F], [T, F, T], [F, F, T], fisher=True) == \
        ([F, T, F], [T, T, F])
    # the top group's sums alone are missing: its forward files, and the inputs below them
    assert plan_partition([F, F, T], [F] * 3, [F] * 3, fisher=True) == ([T] * 3, [F, F, T])
    # a tied embedding's group 0 reads the top's input too
    assert plan_partition([T, F, F], [T, T, F], [F, T, T], fisher=True, top_below=True) == \
        ([F, F, T], [T, F, F])
    # activation: a group above needs the output of the group below it
    assert plan_partition([F, F, T], [F, T, F], [F] * 3, fisher=False) == ([F, F, T], [F] * 3)
    assert plan_partition([F, F, T], [F, F, F], [F] * 3, fisher=False) == ([T, T, T], [F] * 3)
