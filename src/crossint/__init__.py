"""crossint: sparse crosscoders and the nonlinear interactions between their features."""

from crossint.errors import CrossintError

__version__ = "0.1.0"

# The heavy public API (torch, transformers) is loaded on first use so `import crossint` is cheap.
_LAZY = {
    # models and activations
    "load_model": "crossint.models.adapter",
    "ModelAdapter": "crossint.models.adapter",
    "harvest": "crossint.data.harvest",
    "ActivationCache": "crossint.data.cache",
    "TensorActivations": "crossint.data.cache",
    "StreamingActivations": "crossint.data.stream",
    # crosscoders and their training
    "Crosscoder": "crossint.crosscoder.model",
    "CrosscoderConfig": "crossint.crosscoder.model",
    "TrainConfig": "crossint.crosscoder.train",
    "train": "crossint.crosscoder.train",
    # interaction penalties
    "DominancePenalty": "crossint.interactions.penalty",
    "make_penalty": "crossint.interactions.penalty",
    "train_with_penalty": "crossint.interactions.penalty",
    # analyses of a trained run on held-out text
    "HeldoutRequest": "crossint.analysis.heldout",
    "evaluate": "crossint.analysis.evaluate",
    "analyse_interactions": "crossint.analysis.interactions",
    "fidelity": "crossint.analysis.fidelity",
    "cluster_run": "crossint.analysis.clustering",
    "run_sweep": "crossint.analysis.sweep",
}

__all__ = ["CrossintError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'crossint' has no attribute {name!r}")
