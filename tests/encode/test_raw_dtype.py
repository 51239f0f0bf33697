"""encode.raw_dtype: tensors stored as is may be rounded to 16 bits; integers never are."""

import torch

from pipeline.encode.stage import raw_cast


def test_raw_cast_rounds_wide_floats_only():
    b = torch.tensor([0.1, -2.5, 3e-5], dtype=torch.float32)
    assert raw_cast(b, "keep") is b
    h = raw_cast(b, "float16")
    assert h.dtype == torch.float16 and torch.equal(h, b.half())
    assert raw_cast(b, "bfloat16").dtype == torch.bfloat16
    assert raw_cast(b.double(), "float16").dtype == torch.float16
    for t in (torch.arange(3), torch.ones(2, dtype=torch.bfloat16), torch.ones(2).half()):
        assert raw_cast(t, "float16") is t
