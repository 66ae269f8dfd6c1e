"""Evaluation: NVIDIA's Inception-v3 features and FID, KID, precision/recall on them;
memorisation of training images (nearest-neighbour distance ratios)."""

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
from patch_diffusion.metrics.memorization import NearestTwo, memorization, memorization_from_distances, nearest_two

__all__ = ["FeatureStats", "InceptionV3", "NearestTwo", "compute_features", "dataset_batches",
           "frechet_distance", "kid", "load_inception", "load_reference", "memorization",
           "memorization_from_distances", "nearest_two", "precision_recall", "preprocess",
           "save_reference", "stats_from_features"]
