"""Datasets (folders, zips, built-in MNIST-style IDX and emoji sets) and infinite deterministic batch loading."""

from patch_diffusion.data.datasets import FITS, ImageDataset, default_cache_dir, has_test_split, open_dataset
from patch_diffusion.data.loader import InfiniteBatches, batch_index_stream, default_num_workers

__all__ = ["FITS", "ImageDataset", "InfiniteBatches", "batch_index_stream", "default_cache_dir",
           "default_num_workers", "has_test_split", "open_dataset"]
