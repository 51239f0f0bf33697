"""Language-model Hessian diagonals against brute-force loops on tiny random Llamas."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from pipeline.hessian import HessianSums, lm
from pipeline.hessian.lm import activation_diag_lm, fisher_diag_lm, lm_param_groups

transformers = pytest.importorskip("transformers")

V, L = 101, 17  # vocabulary, window length


def _llama(seed: int = 0, layers: int = 2, **kw) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, **kw)
    return transformers.LlamaForCausalLM(cfg).eval()


def _windows(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n, L), generator=torch.Generator().manual_seed(seed))


def _brute_fisher(model: nn.Module, windows: torch.Tensor, names: list[str]) -> dict:
    """The definition: per window, the mean next-token NLL from the plain logits, its gradient,
    squared in float64 and summed."""
    ps = dict(model.named_parameters())
    acc = {n: torch.zeros(ps[n].shape, dtype=torch.float64) for n in names}
    for s in range(windows.shape[0]):
        ids = windows[s : s + 1]
        logits = model(input_ids=ids).logits[0, :-1].float()
        loss = nn.functional.cross_entropy(logits, ids[0, 1:])  # mean over the L-1 tokens
        for n, g in zip(names, torch.autograd.grad(loss, [ps[n] for n in names]), strict=True):
            acc[n] += g.double() ** 2
    return acc


def _close(got: dict, want: dict, rel: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for n in want:
        scale = float(want[n].abs().max())
        assert scale > 0, n
        torch.testing.assert_close(got[n], want[n], rtol=rel, atol=rel * scale, msg=n)


def _linears(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if "_proj." in n]


def _no_generic(monkeypatch) -> None:
    def fail(*a, **k):
        raise AssertionError("the batched (tapped) path should have been used")

    monkeypatch.setattr(lm, "_fisher_generic", fail)


# ---------------------------------------------------------------------------------- fisher


def test_fisher_linear_group_equals_brute_force_batched(monkeypatch):
    # Biases too (attention_bias, mlp_bias): the tap also gives per-window bias gradients.
    model = _llama(attention_bias=True, mlp_bias=True)
    w = _windows()
    names = [n for n in _linears(model) if "layers.0.self_attn" in n or "layers.1.mlp" in n]
    assert any(n.endswith(".bias") for n in names)
    want = _brute_fisher(model, w, names)
    _no_generic(monkeypatch)
    for bs in (1, 4, 6):
        got = fisher_diag_lm(model, w, names, batch_size=bs, chunk_tokens=5)
        assert isinstance(got, HessianSums) and got.n == 6
        assert all(v.dtype == torch.float64 and v.device.type == "cpu" for v in got.sums.values())
        _close(got.sums, want)


def test_fisher_other_params_use_generic_path_and_equal_brute_force():
    # Embedding, norms and the head (tied to the embedding here) are not per-call Linears.
    model = _llama(tie_word_embeddings=True)
    w = _windows(4)
    names = ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
             "model.layers.1.self_attn.v_proj.weight", "model.norm.weight"]
    _close(fisher_diag_lm(model, w, names, batch_size=3).sums, _brute_fisher(model, w, names))


@pytest.mark.parametrize("tied", [True, False])
def test_fisher_embedding_and_head_share_the_tapped_backward(monkeypatch, tied):
    # Quantized embeddings: the embedding (tied: also the head) and an untied head take their
    # per-window gradients from the tapped path's backward, one window at a time, exactly.
    model = _llama(tie_word_embeddings=tied)
    w = _windows(4)
    names = ["model.embed_tokens.weight", *([] if tied else ["lm_head.weight"]),
             "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    want = _brute_fisher(model, w, names)
    _no_generic(monkeypatch)
    got = fisher_diag_lm(model, w, names, batch_size=3, chunk_tokens=5)
    _close(got.sums, want)
    # Every row of a tied weight has a gradient through the head, seen tokens or not.
    if tied:
        assert bool((got.sums["model.embed_tokens.weight"].sum(1) > 0).all())
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_fisher_linear_called_twice_falls_back_and_sums_before_squaring(monkeypatch):
    model = _llama()
    mlp = model.model.layers[1].mlp

    def twice(x):  # gate_proj used twice: its per-window gradient is the sum over both calls
        return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x) + 0.5 * mlp.gate_proj(x))

    mlp.forward = twice
    generic = lm._fisher_generic
    used = []
    monkeypatch.setattr(lm, "_fisher_generic", lambda *a, **k: used.append(1) or generic(*a, **k))
    w = _windows(3)
    names = ["model.layers.1.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    _close(fisher_diag_lm(model, w, names, batch_size=3).sums, _brute_fisher(model, w, names))
    assert used == [1]


def test_fisher_partitions_add_up_exactly():
    model = _llama()
    w = _windows(6)
    names = _linears(model)[:5] + ["model.norm.weight"]
    for group in (names[:5], names):  # batched path, generic path
        whole = fisher_diag_lm(model, w, group, batch_size=2)
        parts = fisher_diag_lm(model, w[:2], group, batch_size=2).add(
            fisher_diag_lm(model, w[2:], group, batch_size=2))
        assert parts.n == whole.n == 6
        for n in group:
            torch.testing.assert_close(parts.sums[n], whole.sums[n], rtol=1e-12, atol=0)


def test_fisher_touches_only_its_group_and_restores_flags_and_modes():
    model = _llama()
    model.train()
    model.model.layers[0].eval()  # mixed modes come back as they were
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    for group in (names, names + ["model.norm.weight"]):
        got = fisher_diag_lm(model, _windows(2), group)
        assert list(got.sums) == [n for n, _ in model.named_parameters() if n in group]
        assert {n: m.training for n, m in model.named_modules()} == modes
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert all(p.grad is None for p in model.parameters())
        assert all(not m._forward_hooks for m in model.modules())


def test_fisher_is_deterministic_in_train_mode_with_dropout():
    model = _llama(attention_dropout=0.5).train()
    w = _windows(2)
    names = ["model.layers.0.self_attn.k_proj.weight"]
    a, b = fisher_diag_lm(model, w, names), fisher_diag_lm(model, w, names)
    assert torch.equal(a.sums[names[0]], b.sums[names[0]])
    assert model.training


def test_fisher_rejects_bad_input():
    model = _llama()
    with pytest.raises(ValueError, match="unknown parameter"):
        fisher_diag_lm(model, _windows(), ["nope.weight"])
    with pytest.raises(ValueError, match="empty"):
        fisher_diag_lm(model, _windows(), [])
    with pytest.raises(ValueError, match="int64"):
        fisher_diag_lm(model, _windows().float(), ["model.norm.weight"])
    with pytest.raises(ValueError, match="L ≥ 2"):
        fisher_diag_lm(model, _windows()[:, :1], ["model.norm.weight"])
    with pytest.raises(ValueError, match="batch_size"):
        fisher_diag_lm(model, _windows(), ["model.norm.weight"], batch_size=0)


# ------------------------------------------------------------------------------ activation


def _brute_activation(model: nn.Module, windows: torch.Tensor, names: list[str]) -> dict:
    """Capture each Linear's inputs over a plain full forward of one window at a time."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    for n in names:
        mod = model.get_submodule(n.rpartition(".")[0])
        handles.append(mod.register_forward_pre_hook(
            lambda m, args, n=n: seen[n].append(args[0].detach().reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        for s in range(windows.shape[0]):
            model(input_ids=windows[s : s + 1])
    for h in handles:
        h.remove()
    out = {}
    for n in names:
        x = torch.cat(seen[n]).double()
        out[n] = (x * x).sum(0).expand(model.get_submodule(n.rpartition(".")[0]).out_features, -1)
    return out


@pytest.mark.parametrize("which", ["first_block", "spread", "with_head"])
def test_activation_equals_brute_force(which):
    model = _llama(layers=3)
    lin = _linears(model)
    names = {"first_block": [n for n in lin if "layers.0." in n],  # forward stops at block 1
             "spread": [lin[0], lin[-1]],  # stops before the head
             "with_head": [lin[3], "lm_head.weight"]}[which]
    w = _windows(5)
    want = _brute_activation(model, w, names)
    got = activation_diag_lm(model, w, names, batch_size=2)
    assert got.n == 5 * L
    assert all(got.sums[n].shape == model.get_parameter(n).shape for n in names)
    _close(got.sums, want, rel=1e-10)
    flat = activation_diag_lm(model, w, names, batch_size=5, broadcast=False)
    _close(flat.sums, {n: v[0] for n, v in want.items()}, rel=1e-10)


def test_activation_stops_after_last_hooked_block():
    model = _llama(layers=3)
    ran = []
    model.model.layers[2].register_forward_hook(lambda *a: ran.append(2))
    activation_diag_lm(model, _windows(2), ["model.layers.1.mlp.up_proj.weight"])
    assert ran == []


def test_activation_partitions_add_up_exactly():
    model = _llama()
    w = _windows(6)
    names = _linears(model)
    whole = activation_diag_lm(model, w, names, batch_size=2)
    parts = activation_diag_lm(model, w[:4], names, batch_size=2).add(
        activation_diag_lm(model, w[4:], names, batch_size=2))
    assert parts.n == whole.n == 6 * L
    for n in names:
        torch.testing.assert_close(parts.sums[n], whole.sums[n], rtol=1e-12, atol=0)


def test_activation_dead_channel_is_zero():
    model = _llama()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[7] = 0.0  # q/k/v input channel 7 dead
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
    got = activation_diag_lm(model, _windows(3), names)
    for n in names:
        assert torch.all(got.sums[n][:, 7] == 0)
        assert torch.all(torch.cat([got.sums[n][:, :7], got.sums[n][:, 8:]], 1) > 0)


def test_activation_removes_hooks_and_restores_mode_when_forward_raises():
    model = _llama().train()
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    mods = [model.get_submodule(n.rpartition(".")[0]) for n in names] + [model.model.layers[1]]
    before = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in mods]

    def boom(*a):
        raise RuntimeError("boom")

    model.model.layers[1].mlp.up_proj.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        activation_diag_lm(model, _windows(2), names)
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in mods] == before
    assert model.training and model.model.layers[0].training


def test_activation_of_a_tied_embedding_is_the_heads_input_statistics():
    model = _llama(tie_word_embeddings=True)
    w = _windows(3)
    got = activation_diag_lm(model, w, ["model.embed_tokens.weight"])
    want = _brute_activation(model, w, ["lm_head.weight"])["lm_head.weight"]
    torch.testing.assert_close(got.sums["model.embed_tokens.weight"], want, rtol=1e-10, atol=0)


def test_activation_rejects_non_linear_names():
    model = _llama()
    for bad in ("model.layers.0.input_layernorm.weight", "model.embed_tokens.weight"):
        with pytest.raises(ValueError, match="nn.Linear"):
            activation_diag_lm(model, _windows(), [bad])


# ---------------------------------------------------------------------------------- groups


def _block(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:3]) if name.startswith("model.layers.") else name


@pytest.mark.parametrize("g", [1, 2, 3, 4, 7, 100])
@pytest.mark.parametrize("subset", ["all", "linears"])
def test_groups_follow_blocks_cover_once_and_are_balanced(g, subset):
    model = _llama(layers=5)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    names = list(sizes) if subset == "all" else _linears(model)
    groups = lm_param_groups(model, names, g)
    flat = [n for grp in groups for n in grp]
    assert flat == names  # every name once, model order, contiguous runs
    units = list(dict.fromkeys(_block(n) for n in names))
    assert len(groups) == min(g, len(units)) and all(groups)
    for a, b in itertools.pairwise(groups):  # a block never straddles two groups
        assert _block(a[-1]) != _block(b[0])
    # Optimal: no contiguous cut of the units into as many runs has a lighter heaviest run.
    load = {u: sum(sizes[n] for n in names if _block(n) == u) for u in units}
    w = [load[u] for u in units]
    k = len(groups)
    best = min(
        max(sum(w[a:b]) for a, b in itertools.pairwise((0, *cuts, len(w))))
        for cuts in itertools.combinations(range(1, len(w)), k - 1)
    )
    assert max(sum(sizes[n] for n in grp) for grp in groups) == best


def test_groups_reject_bad_input():
    model = _llama()
    with pytest.raises(ValueError, match="groups"):
        lm_param_groups(model, _linears(model), 0)
    with pytest.raises(ValueError, match="duplicate"):
        lm_param_groups(model, ["model.norm.weight", "model.norm.weight"], 2)
