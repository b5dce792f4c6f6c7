"""Model diffing with a two-model crosscoder (SPEC §9.3): which features belong to one model.

A crosscoder over (base, fine-tuned) activations decodes every feature into both models. A
feature's relative decoder norm r = ‖W_dec[h, ft]‖ / (‖W_dec[h, base]‖ + ‖W_dec[h, ft]‖) (each
norm over all of that model's hookpoints, raw units) is ½ for a shared feature, 0 for a
base-only and 1 for a fine-tuned-only one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from crossint.errors import CrossintError

MODEL_ONLY = 0.1  # r below this: first model only; above 1 − this: second model only


def relative_decoder_norms(crosscoder: Any) -> Tensor:
    """r_H of SPEC §9.3 for a two-model crosscoder (float64; 0/0 counts as ½)."""
    models = list(crosscoder.config.models)
    if len(models) != 2:
        raise CrossintError(
            f"model diffing needs a crosscoder over two models, this one spans {models}"
        )
    hookpoints = list(crosscoder.config.hookpoints)
    with torch.no_grad():
        norms = [torch.stack(crosscoder.decoders(hookpoints, model), dim=1).double()
                 .pow(2).sum(dim=(1, 2)).sqrt() for model in models]
    total_H = norms[0] + norms[1]
    return torch.where(total_H > 0, norms[1] / total_H.clamp_min(1e-300),
                       torch.full_like(total_H, 0.5))


def model_specific_features(r_H: Tensor, threshold: float = MODEL_ONLY) -> dict[str, list[int]]:
    """Feature ids with r < threshold (first model only) and r > 1 − threshold (second only)."""
    if not 0 < threshold < 0.5:
        raise CrossintError(f"threshold must be in (0, 0.5), got {threshold}")
    return {"first_only": (r_H < threshold).nonzero().squeeze(1).tolist(),
            "second_only": (r_H > 1 - threshold).nonzero().squeeze(1).tolist()}


def relative_norm_histogram(r_H: Tensor, bins: int = 20) -> dict[str, list[float]]:
    """Counts of r over ``bins`` equal bins of [0, 1]."""
    counts = torch.histc(r_H.double(), bins=bins, min=0.0, max=1.0)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    return {"bin_edges": edges.tolist(), "counts": counts.tolist()}
