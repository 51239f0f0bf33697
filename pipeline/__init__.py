"""hwq: Hessian-weighted network quantization towards the limit (Choi et al., ICLR 2017)."""

__version__ = "0.1.0"
