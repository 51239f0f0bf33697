"""The GPU kernel (pipeline/runtime/triton_lut.py) run by Triton's interpreter on the CPU:
the same kernel code a CUDA device compiles, against the float64 product of the decoded
matrix on the awkward shapes the CPU kernels are tested on, every packed width, one and
several tables a row, batch 1 (the decode path) and batches (the tl.dot path)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel is first decorated

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton is installed by make setup on Linux")

from pipeline.runtime.modules import LutLinear  # noqa: E402
from pipeline.runtime.triton_lut import lut_matmul_triton  # noqa: E402
from tests.runtime.test_runtime_kernels import SHAPES, _dense, _packed  # noqa: E402

LEVELS = {4: 2, 8: 3, 16: 4, 40: 8}  # levels a row -> packed width


def _check(p, codes, cb, groups, b, seed=1):
    cols = p.cols
    x = np.random.default_rng(seed).normal(size=(b, cols)).astype(np.float32)
    w = _dense(codes, cb, groups)
    exact = x.astype(np.float64) @ w.T
    bound = (cols + 1) * 2.0**-23 * (np.abs(x) @ np.abs(w).T) + 1e-30
    y = lut_matmul_triton(torch.from_numpy(x), p).numpy()
    assert y.shape == (b, p.rows)
    assert np.all(np.abs(y - exact) <= bound), np.abs(y - exact).max()


@pytest.mark.parametrize("k", LEVELS)
@pytest.mark.parametrize("b", [1, 5, 17])
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_triton_kernel_matches_the_float64_product(rows, cols, b, k):
    p, codes, cb = _packed(rows, cols, k)
    assert p.bits == LEVELS[k]
    _check(p, codes, cb, 1, b)


@pytest.mark.parametrize("k", [4, 8, 16])
@pytest.mark.parametrize("groups,cols", [(2, 64), (3, 96), (2, 40), (4, 1024)])
@pytest.mark.parametrize("b", [1, 5])
def test_triton_kernel_with_group_tables(groups, cols, b, k):
    """Several tables a row, on 32-column blocks and not (20-column groups)."""
    p, codes, cb = _packed(11, cols, k, groups=groups)
    assert p.groups == groups
    _check(p, codes, cb, groups, b, seed=3)


def test_triton_kernel_refuses_mismatched_inputs():
    p, _, _ = _packed(5, 33, 16)
    with pytest.raises(ValueError, match="33"):
        lut_matmul_triton(torch.zeros(1, 32), p)
    with pytest.raises(ValueError, match="precision"):
        lut_matmul_triton(torch.zeros(1, 33), p, precision="fp8")
    assert lut_matmul_triton(torch.zeros(0, 33), p).shape == (0, 5)


@pytest.mark.parametrize("b", [1, 3])
def test_lut_linear_on_the_triton_backend_equals_the_cpu_reference(b):
    """The module's wiring (bias, leading dimensions, the input's dtype back): backend
    "triton" forced on CPU tensors computes what the CPU reference path computes."""
    p, _, _ = _packed(40, 95, 16)
    bias = torch.randn(40)
    cpu = LutLinear(p, bias, mode="reference")
    gpu = LutLinear(p, bias, mode="reference", backend="triton")
    x = torch.randn(2, b, 95, dtype=torch.bfloat16)
    want, got = cpu(x), gpu(x)
    assert got.dtype == torch.bfloat16 and got.shape == (2, b, 40)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    xf = torch.randn(b, 95)
    torch.testing.assert_close(gpu(xf), cpu(xf), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        LutLinear(p, mode="reference", backend="metal")


def test_a_device_the_runtime_cannot_use_is_a_clear_error():
    from pipeline.runtime.loader import _device

    assert _device(None) is None and _device("cpu") is None
    with pytest.raises(ValueError, match="not a torch device"):
        _device("gpu0")
    with pytest.raises(ValueError, match="CPU or a CUDA device"):
        _device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            _device("cuda")
