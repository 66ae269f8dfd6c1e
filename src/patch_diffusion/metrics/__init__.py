"""Evaluation: NVIDIA's Inception-v3 features and FID, KID, precision/recall on them."""

from patch_diffusion.metrics.fid import (
    FeatureStats,
    compute_features,
    dataset_batches,
    frechet_distance,
    kid,
    load_reference,
    precision_recall,
    save_reference,
    stats_from_features,
)
from patch_diffusion.metrics.inception import InceptionV3, load_inception, preprocess

__all__ = ["FeatureStats", "InceptionV3", "compute_features", "dataset_batches", "frechet_distance", "kid",
           "load_inception", "load_reference", "precision_recall", "preprocess", "save_reference",
           "stats_from_features"]
