"""QuantizedTrainable: only the centres train, with the paper's gradient; nothing else moves."""

import numpy as np
import pytest
import torch
from torch.func import functional_call

from pipeline.finetune.transform import QuantizedTrainable, member_counts
from pipeline.models import build
from pipeline.quantize.artifacts import QuantizedModel, gather_weights
from pipeline.train import magnitude_masks

KEEP = {"conv1.weight": 0.66, "conv2.weight": 0.12, "fc1.weight": 0.08, "fc2.weight": 0.19}


def _network_scope(state, masks, k=16):
    """One codebook of k weighted-free quantiles of the kept weights; indices by nearest edge."""
    kept = torch.cat([state[n][masks[n]] for n in KEEP])
    cb = torch.quantile(kept, (torch.arange(k) + 0.5) / k).float()
    edges = ((cb[1:] + cb[:-1]) / 2).numpy()
    idx = {n: torch.from_numpy(np.searchsorted(edges, state[n].numpy()).astype(np.uint8))
           * masks[n] for n in KEEP}
    return QuantizedModel("network", "quantiles", {"network": cb}, idx,
                          {n: "network" for n in KEEP})


def _channel_scope(state, masks, k=4):
    """A [rows, k] codebook per tensor: per-row quantiles of that row's weights."""
    cbs, idx = {}, {}
    for n in KEEP:
        w = state[n].reshape(state[n].shape[0], -1)
        q = torch.quantile(w, (torch.arange(k) + 0.5) / k, dim=1).T.contiguous()  # [rows, k]
        edges = (q[:, 1:] + q[:, :-1]) / 2
        codes = torch.searchsorted(edges.contiguous(), w.contiguous())
        cbs[n] = q.float()
        idx[n] = (codes.to(torch.uint8) * masks[n].reshape_as(codes)).reshape(state[n].shape)
    return QuantizedModel("channel", "quantiles", cbs, idx, {n: n for n in KEEP})


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = build("lenet5")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    masks = magnitude_masks(state, KEEP)
    x = torch.randn(16, 1, 28, 28)
    y = torch.randint(0, 10, (16,))
    return state, masks, x, y


def _wrap(state, qm, masks, **kw):
    model = build("lenet5")
    model.load_state_dict(state)
    return QuantizedTrainable(model, qm, masks, **kw)


def _dense_grads(state, qm, masks, x, y):
    """Autograd on the dense weights W = where(mask, codebook[index], 0) themselves."""
    model = build("lenet5")
    model.load_state_dict(state)
    dense = qm.dense_state(state, masks)
    leaves = {n: dense[n].clone().requires_grad_(True) for n in qm.assignment}
    loss = torch.nn.functional.cross_entropy(functional_call(model, leaves, (x,)), y)
    loss.backward()
    return {n: t.grad for n, t in leaves.items()}


def _expected_centre_grads(qm, masks, grads):
    """Per codebook: sum over members (kept elements with index j) of their dense gradient."""
    out = {}
    for name, cb_name in qm.assignment.items():
        cb = qm.codebooks[cb_name]
        g = torch.where(masks[name], grads[name], 0.0).double()
        idx = qm.indices[name].long()
        acc = out.setdefault(cb_name, torch.zeros(cb.shape, dtype=torch.float64))
        if cb.dim() == 1:
            acc.index_add_(0, idx.flatten(), g.flatten())
        else:
            rows = cb.shape[0]
            acc.scatter_add_(1, idx.reshape(rows, -1), g.reshape(rows, -1))
    return out


@pytest.mark.parametrize("scope", ["network", "channel"])
@pytest.mark.parametrize("grad", ["sum", "mean"])
def test_centre_gradient_is_sum_or_mean_of_member_gradients(setup, scope, grad):
    state, masks, x, y = setup
    qm = (_network_scope if scope == "network" else _channel_scope)(state, masks)
    net = _wrap(state, qm, masks, grad=grad)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    expected = _expected_centre_grads(qm, masks, _dense_grads(state, qm, masks, x, y))
    counts = member_counts(qm, masks)
    for i, cb_name in enumerate(net.codebook_names):
        got = net.codebooks[f"c{i}"].grad.double()
        want = expected[cb_name]
        if grad == "mean":
            want = want / counts[cb_name].clamp(min=1)
        assert got.shape == qm.codebooks[cb_name].shape
        # float32 sums in another order: relative to the largest centre gradient.
        tol = 1e-5 * float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=0, atol=tol)
        assert float(want.abs().max()) > 0


def test_member_counts_count_kept_elements_only(setup):
    state, masks, _, _ = setup
    qm = _network_scope(state, masks)
    counts = member_counts(qm, masks)["network"]
    assert int(counts.sum()) == sum(int(masks[n].sum()) for n in KEEP)
    cqm = _channel_scope(state, masks)
    for n in KEEP:
        per_row = member_counts(cqm, masks)[n].sum(1)
        assert torch.equal(per_row, masks[n].reshape(masks[n].shape[0], -1).sum(1))


def test_only_codebooks_train(setup):
    state, masks, _, _ = setup
    qm = _network_scope(state, masks)
    net = _wrap(state, qm, masks)
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["codebooks.c0"]
    # The quantized tensors are no longer parameters of the wrapped model at all.
    assert not set(KEEP) & {n for n, _ in net.model.named_parameters()}
    both = _wrap(state, qm, masks, train_unquantized=True)
    assert sorted(n for n, p in both.named_parameters() if p.requires_grad) == [
        "codebooks.c0", "model.conv1.bias", "model.conv2.bias", "model.fc1.bias", "model.fc2.bias"]


@pytest.mark.parametrize("scope", ["network", "channel"])
def test_forward_equals_dense_model_of_the_artifact(setup, scope):
    state, masks, x, _ = setup
    qm = (_network_scope if scope == "network" else _channel_scope)(state, masks)
    net = _wrap(state, qm, masks)
    ref = build("lenet5")
    ref.load_state_dict(qm.dense_state(state, masks))
    with torch.no_grad():
        assert torch.equal(net(x), ref(x))
    dense = net.dense_state()
    assert set(dense) == set(state)
    for n in state:
        assert torch.equal(dense[n], qm.dense_state(state, masks)[n])


@pytest.mark.parametrize("scope", ["network", "channel"])
@pytest.mark.parametrize("train_unquantized", [False, True])
def test_optimizer_steps_move_only_centres(setup, scope, train_unquantized):
    state, masks, x, y = setup
    qm = (_network_scope if scope == "network" else _channel_scope)(state, masks)
    net = _wrap(state, qm, masks, train_unquantized=train_unquantized)
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    before = net.codebook_state()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    after = net.codebook_state()
    assert all(not torch.equal(before[n], after[n]) for n in before)
    for k, v in net.named_buffers():  # indices, masks: never touched
        assert torch.equal(v, buffers[k]), k
    dense = net.dense_state()
    for n in KEEP:
        assert torch.equal(dense[n][~masks[n]], torch.zeros(int((~masks[n]).sum())))
        # Every kept weight is still one of its codebook's (new) shared values.
        rebuilt = gather_weights(after[qm.assignment[n]], qm.indices[n]) * masks[n]
        assert torch.equal(dense[n], rebuilt)
    for n in state:
        if n not in KEEP:
            assert torch.equal(dense[n], state[n]) != train_unquantized, n


def test_rejects_mismatched_artifacts(setup):
    state, masks, _, _ = setup
    qm = _network_scope(state, masks)
    qm.indices["fc2.weight"] = qm.indices["fc2.weight"][:, :10]
    with pytest.raises(ValueError, match="fc2.weight"):
        _wrap(state, qm, masks)
    with pytest.raises(ValueError, match="grad"):
        _wrap(state, _network_scope(state, masks), masks, grad="median")


def test_tied_embedding_and_head_read_the_rebuilt_weight():
    """A quantized embedding tied to the head: both uses read codebook[codes] (the head does
    not keep the dense weight), and the codebook's gradient is the sum over both uses."""
    pytest.importorskip("transformers")
    from testkit.models import tiny_llama

    model = tiny_llama(vocab=50, hidden=32, layers=1, tie_word_embeddings=True)
    name = "model.embed_tokens.weight"
    W = model.get_parameter(name).detach()
    g = torch.Generator().manual_seed(0)
    cb = torch.randn(W.shape[0], 4, generator=g) * 0.02
    idx = torch.randint(0, 4, W.shape, generator=g)
    qm = QuantizedModel("channel", "ecsq", {name: cb}, {name: idx}, {name: name})
    ids = torch.randint(0, 50, (2, 9), generator=g)
    dense = tiny_llama(vocab=50, hidden=32, layers=1, tie_word_embeddings=True)
    dense.load_state_dict(model.state_dict())
    with torch.no_grad():
        dense.get_parameter(name).copy_(gather_weights(cb, idx))
    assert dense.lm_head.weight.data_ptr() == dense.model.embed_tokens.weight.data_ptr()
    net = QuantizedTrainable(model, qm)
    assert "lm_head.weight" not in dict(model.named_parameters())
    out = net(input_ids=ids).logits
    torch.testing.assert_close(out, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    # The head's share of the gradient reaches the codebook of every row, also those of
    # tokens the input never holds.
    unseen = sorted(set(range(50)) - set(ids.flatten().tolist()))
    assert bool((net.codebooks["c0"].grad[unseen].abs().sum(1) > 0).all())
    # The adapter's loss recomputes the head's chunks in the backward (activation
    # checkpointing), after functional_call has put the weights back: same loss, and the
    # backward runs on the rebuilt head.
    from pipeline.models.lm_loss import next_token_nll

    def loss_fn(m, x):
        return next_token_nll(m, x, chunk_tokens=4).sum()

    net.codebooks["c0"].grad = None
    loss = net(ids, loss_fn=loss_fn)
    torch.testing.assert_close(loss, loss_fn(dense, ids), rtol=1e-5, atol=1e-5)
    loss.backward()
    assert bool((net.codebooks["c0"].grad[unseen].abs().sum(1) > 0).all())


def test_a_bf16_model_trains_fp32_codebooks():
    """A model loaded in bfloat16 (a bf16 checkpoint) with float32 codebooks: the rebuilt
    weights take the model's dtype (a Linear fails on a bf16 input and an fp32 weight), and
    the gradient reaches the fp32 codebooks."""
    pytest.importorskip("transformers")
    from testkit.models import tiny_llama

    model = tiny_llama(vocab=50, hidden=32, layers=1).to(torch.bfloat16)
    name = "model.layers.0.mlp.up_proj.weight"
    W = model.get_parameter(name).detach()
    g = torch.Generator().manual_seed(0)
    cb = torch.randn(W.shape[0], 4, generator=g) * 0.02
    idx = torch.randint(0, 4, W.shape, generator=g)
    net = QuantizedTrainable(model, QuantizedModel("channel", "ecsq", {name: cb}, {name: idx},
                                                   {name: name}))
    out = net(input_ids=torch.randint(0, 50, (2, 9), generator=g)).logits
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    grad = net.codebooks["c0"].grad
    assert grad is not None and grad.dtype == torch.float32 and bool(grad.abs().sum() > 0)
