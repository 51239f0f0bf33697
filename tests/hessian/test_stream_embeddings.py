"""The streamed Hessian of the input embedding and the output head (quantize.embeddings:
quantize) equals the resident estimators' (`fisher_diag_lm`, `activation_diag_lm`) on the same
windows, tied and untied, when the windows are cut into P partitions and the blocks into G
groups exactly as the hessian stage plans them (`group_names`, `embedding_placement`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.hessian.lm import activation_diag_lm, fisher_diag_lm
from pipeline.hessian.shards import reduce_partials, window_slices
from pipeline.hessian.stream import activation_streamed, fisher_streamed
from pipeline.hessian.streamed_stage import embedding_placement, group_names
from pipeline.models.hf_causal import embedding_names
from pipeline.models.stream import StreamedLM
from pipeline.models.weights import write_folder
from testkit.models import tiny_llama

LAYERS = 3
BLOCK = ["model.layers.0.mlp.up_proj.weight", "model.layers.2.self_attn.q_proj.weight"]


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def folder(request, tmp_path_factory):
    """(folder, in-memory model, {tensor: role} as the load stage records it)."""
    tied = request.param
    path = tmp_path_factory.mktemp("emb") / "model"
    model = tiny_llama(
        layers=LAYERS, hidden=32, attn_implementation="eager", tie_word_embeddings=tied
    )
    model.config.save_pretrained(path)
    sd = model.state_dict()
    if tied:
        sd.pop("lm_head.weight")
    write_folder(
        path, sd, [(n, t.dtype, tuple(t.shape)) for n, t in sd.items()], max_shard_bytes=40_000
    )
    emb = embedding_names(model)
    roles = {emb[0]: "tied"} if tied else {emb[0]: "input", emb[1]: "head"}
    return str(path), model, roles


def _windows(n=4, L=10):
    return torch.randint(0, 300, (n, L), generator=torch.Generator().manual_seed(7))


def _staged(kind: str, path: str, windows, names, roles, P: int, G: int) -> dict:
    """The stage's plan run unit by unit, then reduced: {tensor: mean float64}."""
    shapes = {n: list(StreamedLM(path).weights.info(n).shape) for n in names}
    first, last = embedding_placement(kind, roles)
    groups = group_names(names, shapes, G, first=first, last=last, blocks=LAYERS)
    fn = activation_streamed if kind == "activation" else fisher_streamed
    partials = []
    for part in window_slices(windows.shape[0], P):
        seen: list[str] = []
        for rng, own in groups:
            got: dict = {}
            fn(
                StreamedLM(path),
                windows[part],
                own,
                lambda k, v, c, got=got: got.__setitem__(k, (v.copy(), c)),
                blocks=rng,
                batch=1,
            )
            assert set(got) == set(own), (rng, own, sorted(got))  # the unit emits its own
            seen += own
            partials.append(got)
        assert sorted(seen) == sorted(names)  # every tensor by exactly one unit
    return reduce_partials(partials)


@pytest.mark.parametrize("P,G", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_streamed_fisher_of_embeddings_equals_resident(folder, P, G):
    path, model, roles = folder
    w = _windows()
    names = list(roles) + BLOCK
    ref = fisher_diag_lm(model, w, names, batch_size=1)
    got = _staged("fisher", path, w, names, roles, P, G)
    for n in names:
        torch.testing.assert_close(
            torch.from_numpy(got[n]), ref.sums[n] / ref.n, rtol=2e-4, atol=1e-12
        )
    if "tied" in roles.values():
        # the tied weight's gradient is the sum of both uses per window, squared: neither
        # use alone (nor the sum of their squares) gives the resident value
        emb = next(iter(roles))
        assert not torch.allclose(torch.from_numpy(got[emb]), _head_only(model, w, emb), rtol=1e-3)


def _head_only(model, w, emb: str) -> torch.Tensor:
    """The Fisher of the head's use alone (the embedding's use cut off), for contrast."""
    from pipeline.hessian.lm import _fisher_generic

    head = model.get_output_embeddings()
    saved = head.weight
    head.weight = torch.nn.Parameter(saved.detach().clone())
    try:
        sums = _fisher_generic(model, w, [("lm_head.weight", head.weight)], 128, None)
    finally:
        head.weight = saved
    return sums["lm_head.weight"].double() / w.shape[0]


@pytest.mark.parametrize("P,G", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_streamed_activation_of_embeddings_equals_resident(folder, P, G):
    path, model, roles = folder
    w = _windows()
    covered = {n: r for n, r in roles.items() if r != "input"}  # the head's inputs
    names = list(covered) + BLOCK
    ref = activation_diag_lm(model, w, names, broadcast=False)
    got = _staged("activation", path, w, names, covered, P, G)
    for n in names:
        torch.testing.assert_close(
            torch.from_numpy(got[n]), ref.sums[n] / ref.n, rtol=1e-5, atol=1e-9
        )


def test_untied_input_embedding_has_no_activation_statistics(folder):
    path, _, roles = folder
    inputs = [n for n, r in roles.items() if r == "input"]
    if not inputs:
        pytest.skip("tied: the embedding is the head's weight")
    with pytest.raises(ValueError, match="not tied to the head"):
        activation_streamed(StreamedLM(path), _windows(), inputs, lambda *a: None)


def test_embedding_placement_and_groups():
    shapes = {"e": [10, 4], "h": [10, 4], "model.layers.0.w": [4, 4], "model.layers.3.w": [4, 4]}
    names = ["e", "model.layers.0.w", "model.layers.3.w", "h"]
    assert embedding_placement("fisher", {"e": "input", "h": "head"}) == (["e"], ["h"])
    assert embedding_placement("fisher", {"e": "tied"}) == (["e"], [])
    assert embedding_placement("activation", {"e": "tied"}) == ([], ["e"])
    got = group_names(names, shapes, 2, first=["e"], last=["h"], blocks=6)
    # the last group reaches the top block (the head needs the final hidden states)
    assert got == [
        (range(0, 1), ["e", "model.layers.0.w"]),
        (range(1, 6), ["model.layers.3.w", "h"]),
    ]
    # without block tensors the embeddings still get a unit over the whole stack
    assert group_names(["e", "h"], shapes, 2, first=["e"], last=["h"], blocks=6) == [
        (range(0, 6), ["e", "h"])
    ]
    assert np.prod(shapes["e"]) == 40
