"""Diagonal-Hessian estimators against dense references on tiny seeded float64 models."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pipeline.hessian import (
    HUTCHINSON_NONNEG,
    HessianSums,
    adam_diag,
    estimate_diag,
    persample,
)

K = 3  # classes: small, so the dense Jacobians stay tiny


class Reuse(nn.Module):
    """Calls one Linear twice: per-sample gradients must be summed over calls before squaring."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.mid = nn.Linear(5, 5)
        self.out = nn.Linear(5, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.mid(h))
        h = torch.tanh(self.mid(h))
        return self.out(h)


class Scale(nn.Module):
    """A parameter with no closed form here: per-sample gradients by torch.func on this module."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class PerPosition(nn.Module):
    """Logits [B, T, K]: a sample's loss is the sum over its T positions."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


class Tied(nn.Module):
    """Token ids [B, T] -> embedding -> mean -> head whose weight IS the embedding table."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(K, 4, padding_idx=0)
        self.head = nn.Linear(4, K)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)).mean(1))


class Gate(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1.0, 1.0, n))

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.w * other)


class Folded(nn.Module):
    """Layers that do not see one row per sample: batch folded into rows ([B*T, D]) and a module
    taking two tensors. Both must go through the whole-model torch.func fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = nn.Linear(4, 3)
        self.gate = Gate(6)
        self.out = nn.Linear(6, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = torch.tanh(self.rows(x.reshape(-1, 4))).reshape(b, 6)  # x: [B, 2, 4]
        return self.out(self.gate(h, h))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, K))


def _cnn() -> nn.Module:
    # Stride, dilation, padding and groups all go through the grouped-convolution path.
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 4, 2, stride=2, dilation=1, groups=2),
        nn.Tanh(),
        nn.Conv2d(4, 3, 2, padding=1, dilation=2, bias=False),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, K),
    )


def _inplace() -> nn.Module:
    # In-place activations right after the layers (torchvision style): the gradient taken must
    # be the one wrt the layer's output, not wrt the activated tensor that replaced it.
    return nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.ReLU(inplace=True),
        _randomize_bn(nn.BatchNorm2d(3)),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 5),
        nn.ReLU(inplace=True),
        nn.Linear(5, K),
    )


def _randomize_bn(bn: nn.modules.batchnorm._BatchNorm) -> nn.modules.batchnorm._BatchNorm:
    # Non-trivial running statistics and affine parameters, as after training.
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def _norms() -> nn.Module:
    # x [B, 3, 4]: LayerNorm over 3 positions per sample, then BatchNorm1d (eval) on features.
    ln = nn.LayerNorm(4)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
    return nn.Sequential(
        nn.Linear(4, 4),
        ln,
        nn.Flatten(),
        _randomize_bn(nn.BatchNorm1d(12)),
        nn.Tanh(),
        nn.Linear(12, K),
    )


def _mixed() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), Scale(5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, K))


def _randn(*shape: int):
    return lambda n: torch.randn(n, *shape, dtype=torch.float64)


MODELS = {
    "mlp": (_mlp, _randn(4)),
    "cnn": (_cnn, _randn(2, 4, 4)),
    "reuse": (Reuse, _randn(4)),
    "mixed": (_mixed, _randn(4)),
    "inplace": (_inplace, _randn(2, 4, 4)),
    "norms": (_norms, _randn(3, 4)),
    "tied": (Tied, lambda n: torch.randint(0, K, (n, 5))),
    "folded": (Folded, _randn(2, 4)),
}


def _setup(kind: str, n: int = 12, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    factory, inputs = MODELS[kind]
    model = factory().double().eval()
    x = inputs(n)
    y = torch.randint(0, K, (n,))
    return model, x, y


def _batches(x: torch.Tensor, y: torch.Tensor, size: int = 5) -> list[tuple[torch.Tensor, ...]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def _flat(model: nn.Module, d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([d[name].reshape(-1) for name, _ in model.named_parameters()])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@functools.cache
def _dense(kind: str) -> dict[str, torch.Tensor]:
    """Dense references for the mean loss: GGN diagonal from full Jacobians, Hessian diagonal."""
    model, x, y = _setup(kind)
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def unflatten(t: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            out[name] = t[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return out

    def logits(t: torch.Tensor) -> torch.Tensor:
        return functional_call(model, unflatten(t), (x,))

    def loss(t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits(t), y, reduction="mean")

    jac = torch.autograd.functional.jacobian(logits, theta)  # [B, K, N]
    p = torch.softmax(logits(theta).detach(), -1)
    h_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # [B, K, K]
    ggn = torch.einsum("bki,bkl,bli->i", jac, h_out, jac) / len(x)
    hess = torch.autograd.functional.hessian(loss, theta).diagonal()
    return {"ggn": ggn, "hessian": hess}


@pytest.mark.parametrize("kind", list(MODELS))
def test_ggn_exact_matches_dense_jacobian_ggn(kind: str) -> None:
    model, x, y = _setup(kind)
    res = estimate_diag(model, _batches(x, y), "ggn", mode="exact")
    assert res.n == len(x)
    assert list(res.sums) == [name for name, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        assert res.sums[name].dtype == torch.float64 and res.sums[name].shape == p.shape
    got = _flat(model, res.sums) / res.n
    torch.testing.assert_close(got, _dense(kind)["ggn"], rtol=1e-5, atol=1e-12)
    assert (got >= 0).all()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ggn_mc_converges_to_exact(kind: str) -> None:
    model, x, y = _setup(kind)
    exact = _flat(model, estimate_diag(model, _batches(x, y), "ggn", mode="exact").mean())
    errs = {}
    for n_samples in (1, 300):
        mc = estimate_diag(model, _batches(x, y), "ggn", mode="mc", n_samples=n_samples, seed=3)
        errs[n_samples] = _rel(_flat(model, mc.mean()).double(), exact.double())
    # Error of an average of R draws shrinks like 1/sqrt(R): ~17x here, assert a safe 5x.
    assert errs[300] < errs[1] / 5
    assert errs[300] < 0.05


def test_ggn_mc_is_seeded() -> None:
    model, x, y = _setup("mlp")
    a = estimate_diag(model, _batches(x, y), "ggn", seed=7)
    b = estimate_diag(model, _batches(x, y), "ggn", seed=7)
    c = estimate_diag(model, _batches(x, y), "ggn", seed=8)
    assert all(torch.equal(a.sums[k], b.sums[k]) for k in a.sums)
    assert any(not torch.equal(a.sums[k], c.sums[k]) for k in a.sums)


# the CNN's 2,000 Hessian-vector probes take ~21 s; the MLP's check the same estimator
@pytest.mark.parametrize("kind", ["mlp", pytest.param("cnn", marks=pytest.mark.slow)])
def test_hutchinson_converges_to_hessian_diagonal(kind: str) -> None:
    model, x, y = _setup(kind)
    hess = _dense(kind)["hessian"]
    errs = {}
    for n_samples in (2, 2000):
        res = estimate_diag(model, [(x, y)], "hutchinson", n_samples=n_samples, seed=1)
        errs[n_samples] = _rel(_flat(model, res.sums) / res.n, hess)
    # Probe noise ~ sqrt(Σ_j≠i H_ij² / R): about 0.08 at R=2000 on these models.
    assert errs[2000] < errs[2] / 5
    assert errs[2000] < 0.15
    assert HUTCHINSON_NONNEG == "abs"


def _naive_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    total = None
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(
            model(x[i : i + 1]).reshape(-1, K), y[i : i + 1].reshape(-1), reduction="sum"
        ).backward()
        sq = torch.cat([p.grad.reshape(-1) ** 2 for p in model.parameters()])
        total = sq if total is None else total + sq
    return total


@pytest.mark.parametrize("kind", list(MODELS))
def test_fisher_matches_per_sample_loop(kind: str) -> None:
    model, x, y = _setup(kind)
    res = estimate_diag(model, _batches(x, y), "fisher")
    torch.testing.assert_close(
        _flat(model, res.sums), _naive_fisher(model, x, y), rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("kind", ["cnn", "reuse", "tied", "mixed", "norms"])
def test_chunked_materialization_matches(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny element budget forces several batch chunks (one sample each for the larger layers).
    model, x, y = _setup(kind)
    whole = estimate_diag(model, _batches(x, y), "fisher")
    monkeypatch.setattr(persample, "_CHUNK_ELEMENTS_CPU", 40)
    chunked = estimate_diag(model, _batches(x, y), "fisher")
    for name in whole.sums:
        torch.testing.assert_close(chunked.sums[name], whole.sums[name], rtol=1e-12, atol=1e-300)


def test_per_position_logits() -> None:
    torch.manual_seed(0)
    model = PerPosition().double().eval()
    x = torch.randn(6, 7, 4, dtype=torch.float64)
    y = torch.randint(0, K, (6, 7))
    res = estimate_diag(model, _batches(x, y, 4), "fisher")
    assert res.n == 6  # samples are inputs, not positions
    torch.testing.assert_close(
        _flat(model, res.sums), _naive_fisher(model, x, y), rtol=1e-6, atol=0
    )
    with pytest.raises(ValueError, match="exact"):
        estimate_diag(model, _batches(x, y), "ggn", mode="exact")


@pytest.mark.parametrize(
    "estimator,mode",
    [("ggn", "exact"), ("ggn", "mc"), ("fisher", "mc")],
)
@pytest.mark.parametrize("kind", ["cnn", "mixed", "norms", "tied", "folded"])
def test_parameter_group_matches_full_pass(kind: str, estimator: str, mode: str) -> None:
    model, x, y = _setup(kind)
    names = [name for name, _ in model.named_parameters()]
    group = names[1::2]  # every other tensor: a weight without its bias, etc.
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    full = estimate_diag(model, _batches(x, y), estimator, mode=mode, n_samples=2, seed=5)
    part = estimate_diag(
        model, _batches(x, y), estimator, params=group, mode=mode, n_samples=2, seed=5
    )
    assert list(part.sums) == group and part.n == full.n
    for name in group:
        torch.testing.assert_close(part.sums[name], full.sums[name], rtol=1e-12, atol=0)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


def test_hutchinson_parameter_group() -> None:
    # Probes then span only the group: same expectation, not the same draws.
    model, x, y = _setup("mlp")
    names = [name for name, _ in model.named_parameters()]
    res = estimate_diag(model, [(x, y)], "hutchinson", params=names[2:], n_samples=2000)
    hess = _dense("mlp")["hessian"][-sum(p.numel() for p in list(model.parameters())[2:]) :]
    assert _rel(torch.cat([v.reshape(-1) for v in res.mean().values()]).double(), hess) < 0.1


@pytest.mark.parametrize("estimator,mode", [("ggn", "exact"), ("fisher", "mc")])
def test_partition_sums_reduce_to_one_pass(estimator: str, mode: str) -> None:
    model, x, y = _setup("cnn", n=15)
    whole = estimate_diag(model, _batches(x, y, 4), estimator, mode=mode)
    parts = [
        estimate_diag(model, _batches(x[a:b], y[a:b], 4), estimator, mode=mode, seed=i)
        for i, (a, b) in enumerate([(0, 4), (4, 11), (11, 15)])
    ]
    total = parts[0].add(parts[1]).add(parts[2])
    assert total.n == whole.n == 15
    for name in whole.sums:
        torch.testing.assert_close(total.sums[name], whole.sums[name], rtol=1e-6, atol=0)
    mean = total.mean()
    assert all(v.dtype == torch.float32 for v in mean.values())
    # add() leaves its operands alone
    assert parts[0].n == 4


def test_hessian_sums_add_checks_names_and_shapes() -> None:
    a = HessianSums({"w": torch.ones(2, dtype=torch.float64)}, 1)
    with pytest.raises(ValueError, match="different parameters"):
        a.add(HessianSums({"v": torch.ones(2, dtype=torch.float64)}, 1))
    with pytest.raises(ValueError, match="shape"):
        a.add(HessianSums({"w": torch.ones(3, dtype=torch.float64)}, 1))
    with pytest.raises(ValueError, match="n > 0"):
        HessianSums({"w": torch.ones(2, dtype=torch.float64)}, 0).mean()


def test_float32_model_gives_float64_finite_sums() -> None:
    torch.manual_seed(0)
    model = _cnn().eval()
    x, y = torch.randn(8, 2, 4, 4), torch.randint(0, K, (8,))
    for est in ("ggn", "fisher", "hutchinson"):
        res = estimate_diag(model, [(x, y)], est)
        assert all(s.dtype == torch.float64 and torch.isfinite(s).all() for s in res.sums.values())


def test_bad_arguments_raise_clear_errors() -> None:
    model, x, y = _setup("mlp")
    data = _batches(x, y)
    with pytest.raises(ValueError, match="unknown estimator 'nope'"):
        estimate_diag(model, data, "nope")
    with pytest.raises(ValueError, match="adam_diag"):
        estimate_diag(model, data, "adam")
    with pytest.raises(ValueError, match="unknown ggn mode"):
        estimate_diag(model, data, "ggn", mode="approx")
    with pytest.raises(ValueError, match="unknown parameter names"):
        estimate_diag(model, data, "fisher", params=["0.weight", "nope.weight"])
    with pytest.raises(ValueError, match="empty parameter group"):
        estimate_diag(model, data, "fisher", params=[])
    with pytest.raises(ValueError, match="no samples"):
        estimate_diag(model, [], "fisher")
    with pytest.raises(ValueError, match="n_samples"):
        estimate_diag(model, data, "ggn", n_samples=0)


def test_non_finite_result_raises() -> None:
    model, x, y = _setup("mlp")
    x[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        estimate_diag(model, _batches(x, y), "fisher")


def test_adam_diag_bias_correction() -> None:
    v = {"w": torch.tensor([4.0, 9.0]), "b": torch.tensor([0.0])}
    out = adam_diag(v, step=10, beta2=0.999, params=["w", "b"])
    corr = 1 - 0.999**10
    torch.testing.assert_close(out["w"], torch.sqrt(torch.tensor([4.0, 9.0]) / corr))
    assert out["b"].item() == 0.0 and out["w"].dtype == torch.float32
    # Long training: the correction vanishes.
    torch.testing.assert_close(adam_diag(v, step=10**7, beta2=0.999)["w"], torch.tensor([2.0, 3.0]))


def test_adam_diag_without_state_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="without Adam state; use estimator ggn/fisher"):
        adam_diag({}, step=1, beta2=0.999)
    with pytest.raises(ValueError, match=r"without Adam state.*'b'"):
        adam_diag({"w": torch.ones(1)}, step=1, beta2=0.999, params=["w", "b"])
    with pytest.raises(ValueError, match="step"):
        adam_diag({"w": torch.ones(1)}, step=0, beta2=0.999)
    with pytest.raises(ValueError, match="beta2"):
        adam_diag({"w": torch.ones(1)}, step=1, beta2=1.0)


def test_adam_diag_from_a_real_optimizer() -> None:
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), betas=(0.9, 0.99))
    x, y = torch.randn(8, 4), torch.randint(0, K, (8,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    state = {name: opt.state[p]["exp_avg_sq"] for name, p in model.named_parameters()}
    out = adam_diag(state, step=3, beta2=0.99, params=[n for n, _ in model.named_parameters()])
    assert set(out) == set(state) and all((v > 0).all() for v in out.values())
