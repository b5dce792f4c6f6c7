"""Feature interactions (SPEC §4): contributions of active features to MLP neurons, dominance
statistics, the compact-proof bound, the training penalty and pairwise interaction measures."""

from crossint.interactions.contributions import (
    SHARE_EPS,
    ActiveFeatures,
    Contributions,
    MLPFeatureBlock,
    NeuronStats,
    abs_stats,
    active_features,
    contributions,
    distinct_virtual_weights,
    dominant_slot,
    feature_blocks,
    iter_contributions,
    magnitude_stats,
    mlp_in_blocks,
    neuron_stats,
    reconstructed_mlp_in,
    resolve_chunk,
    slot_contributions,
    virtual_weights,
)
from crossint.interactions.mlp import (
    WEIGHTINGS,
    KeepDominantGap,
    MLPInteractionMeter,
    MLPInteractionReport,
    ShareSummary,
    analyse_mlp_interactions,
    interaction_penalty,
    interaction_score,
    keep_dominant_gap,
    token_interaction_scores,
)
from crossint.interactions.pairwise import (
    PairMeasureAccumulator,
    PairwiseAccumulator,
    PairwiseResult,
    average_ranks,
    cooccurring_pairs,
    hadamard_measure,
    interaction_mass,
    measure_correlations,
    ratio_measure,
    second_difference,
    spearman,
)

__all__ = [
    "SHARE_EPS", "WEIGHTINGS", "ActiveFeatures", "Contributions", "KeepDominantGap",
    "MLPFeatureBlock", "MLPInteractionMeter", "MLPInteractionReport", "NeuronStats",
    "PairMeasureAccumulator", "PairwiseAccumulator", "PairwiseResult", "ShareSummary", "abs_stats",
    "active_features", "analyse_mlp_interactions", "average_ranks",
    "contributions", "cooccurring_pairs", "distinct_virtual_weights", "dominant_slot",
    "feature_blocks",
    "hadamard_measure", "interaction_mass", "interaction_penalty", "interaction_score",
    "iter_contributions", "keep_dominant_gap", "magnitude_stats", "measure_correlations",
    "mlp_in_blocks", "neuron_stats", "ratio_measure",
    "reconstructed_mlp_in", "resolve_chunk", "second_difference", "slot_contributions", "spearman",
    "token_interaction_scores", "virtual_weights",
]
