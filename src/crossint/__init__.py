"""crossint: sparse crosscoders and the nonlinear interactions between their features."""

from crossint.errors import CrossintError

__version__ = "0.1.0"

# The heavy public API (torch, transformers) is loaded on first use so `import crossint` is cheap.
_LAZY = {
    "load_model": "crossint.models.adapter",
    "ModelAdapter": "crossint.models.adapter",
    "Crosscoder": "crossint.crosscoder.model",
    "CrosscoderConfig": "crossint.crosscoder.model",
    "ActivationCache": "crossint.data.cache",
    "harvest": "crossint.data.harvest",
    "train": "crossint.crosscoder.train",
    "TrainConfig": "crossint.crosscoder.train",
    "evaluate": "crossint.analysis.evaluate",
}

__all__ = ["CrossintError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'crossint' has no attribute {name!r}")
