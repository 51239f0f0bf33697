"""hwq: Hessian-weighted network quantization towards the limit (Choi et al., ICLR 2017)."""

__version__ = "0.1.0"

__all__ = ["compress"]


def __getattr__(name: str):
    # Imported on first use: `import pipeline` stays light (no torch, no Ray).
    if name == "compress":
        from pipeline.api import compress

        return compress
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
