import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)


def write_images(folder, count=24, size=(16, 16), seed=0, mode="RGB"):
    """Tiny synthetic images: a coloured square on black, different per image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    for i in range(count):
        a = np.zeros((h, w, 3), np.uint8)
        top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
        a[top:top + h // 2, left:left + w // 2] = rng.integers(60, 255, 3)
        Image.fromarray(a).convert(mode).save(folder / f"img{i:03d}.png")
    return folder


@pytest.fixture
def tiny_data(tmp_path):
    return write_images(tmp_path / "data")
