"""Memorisation: nearest / second-nearest training image distance ratios (exact maths),
and `fid calc --memorization` end to end with a stand-in Inception network."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import patch_diffusion.evaluate as evaluate
import patch_diffusion.metrics as metrics
from patch_diffusion.checkpoint import list_checkpoints
from patch_diffusion.errors import UserError
from patch_diffusion.metrics import NearestTwo, memorization, nearest_two
from patch_diffusion.metrics.memorization import THRESHOLD

from conftest import write_images
from test_cli import only_run_dir, run


def column(*values):
    return torch.tensor(values, dtype=torch.float64)[:, None]


def test_one_dimensional_points_give_the_known_distances_and_ratios():
    keys = column(0, 4, 10)
    d1, d2, index = nearest_two(column(1, 4, 7, 12), keys)
    assert d1.tolist() == [1, 0, 3, 2]
    assert d2.tolist() == [3, 4, 3, 8]
    assert index.tolist() == [0, 1, 1, 2]  # 7 is 3 from both 4 and 10: the lower index wins
    result = memorization(column(1, 4, 7, 12), keys)
    # Ratios 1/3 (at the threshold: not memorised), 0, 1, 1/4.
    assert result == {"memorized": 0.5, "nn_distance": 1.5, "nn_ratio": (1 / 3 + 0 + 1 + 1 / 4) / 4,
                      "num": 4, "train_num": 3}


def test_the_threshold_is_strict():
    queries, keys = column(1), column(0, 4)  # d1 / d2 = 1/3 exactly
    assert THRESHOLD == 1 / 3
    assert memorization(queries, keys)["memorized"] == 0.0
    assert memorization(queries, keys, threshold=math.nextafter(1 / 3, 1))["memorized"] == 1.0
    with pytest.raises(UserError, match=r"\(0, 1\]"):
        memorization(queries, keys, threshold=0)


def test_two_dimensional_points_and_exact_copies():
    keys = torch.tensor([[3.0, 4.0], [5.0, 12.0], [-8.0, -15.0]], dtype=torch.float64)
    d1, d2, index = nearest_two(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), keys)
    assert d1.tolist() == [5.0, 0.0] and index.tolist() == [0, 0]
    assert d2.tolist() == [13.0, math.sqrt(68)]  # (3,4) to (5,12): sqrt(2^2 + 8^2)
    # A copy measures exactly 0 in many dimensions too (the expansion alone leaves rounding).
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(40, 3072, generator=gen, dtype=torch.float64)
    d1, d2, index = nearest_two(train[[5, 17]], train, batch=16)
    assert d1.tolist() == [0.0, 0.0] and index.tolist() == [5, 17] and (d2 > 50).all()


def test_duplicated_training_images_count_a_copy_as_memorised():
    keys = torch.tensor([[1.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    d1, d2, index = nearest_two(torch.tensor([[1.0, 1.0], [3.0, 3.0]]), keys)
    assert d1.tolist() == [0.0, math.sqrt(8)] and d2.tolist() == [0.0, math.sqrt(8)]
    assert index.tolist() == [0, 0]
    result = memorization(torch.tensor([[1.0, 1.0], [3.0, 3.0]]), keys)
    assert result["memorized"] == 0.5 and result["nn_ratio"] == 0.5  # 0/0 := 0, and 1


def test_chunks_and_streamed_keys_give_identical_results():
    gen = torch.Generator().manual_seed(1)
    queries = torch.randn(37, 6, generator=gen, dtype=torch.float64)
    keys = torch.randn(23, 6, generator=gen, dtype=torch.float64)
    whole = nearest_two(queries, keys, batch=1000)
    exact = torch.cdist(queries, keys, compute_mode="donot_use_mm_for_euclid_dist").sort(dim=1)
    assert torch.equal(whole[2], exact.indices[:, 0])
    assert torch.allclose(whole[0], exact.values[:, 0], rtol=0, atol=1e-12)
    assert torch.allclose(whole[1], exact.values[:, 1], rtol=0, atol=1e-12)
    for batch in (1, 2, 5, 22):
        assert all(torch.equal(a, b) for a, b in zip(nearest_two(queries, keys, batch=batch), whole))
    streamed = NearestTwo(queries, batch=4)
    for piece in (keys[:1], keys[1:9], keys[9:]):
        streamed.update(piece)
    assert all(torch.equal(a, b) for a, b in zip(streamed.result(), whole))


def test_uint8_pixels_are_measured_exactly_in_unit_range():
    train = torch.tensor([[0, 0, 0], [255, 255, 255], [10, 20, 30]], dtype=torch.uint8)
    gen = torch.tensor([[10, 20, 30], [250, 250, 250]], dtype=torch.uint8)
    result = memorization(gen, train, scale=1 / 255)
    assert result["memorized"] == 1.0  # a copy, and 5*sqrt(3) vs far more
    assert result["nn_distance"] == pytest.approx(math.sqrt(3 * 25) / 2 / 255, rel=1e-15)


def test_bad_inputs():
    with pytest.raises(UserError, match="at least 2 training images"):
        nearest_two(column(1), column(0))
    with pytest.raises(UserError, match="at least 2 training images"):
        nearest_two(column(1), torch.zeros(0, 1))
    with pytest.raises(UserError, match="at least one generated image"):
        memorization(torch.zeros(0, 1), column(0, 1))
    with pytest.raises(ValueError, match="dimensions"):
        nearest_two(column(1), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        nearest_two(torch.zeros(3), column(0, 1))


# --- fid calc --memorization, with a stand-in for Inception ---------------------------------

class PooledPixels(torch.nn.Module):
    """Stand-in for Inception: the preprocessed image, (x - 128) / 128, averaged over an
    8x8 grid (192 features). On flat images its distances are pixel distances x 255/128."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 8).flatten(1)


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(metrics, "load_inception", lambda path=None, device="cpu": PooledPixels())
    monkeypatch.setattr(evaluate, "load_inception", lambda path=None, device="cpu": PooledPixels())


def flat_images(folder, levels, size=(8, 8)):
    folder.mkdir()
    for i, level in enumerate(levels):
        Image.fromarray(np.full((*size, 3), level, np.uint8)).save(folder / f"img{i:03d}.png")
    return folder


TRAIN = (0, 50, 100, 150, 200, 250)
# Copies of 0, 100, 250 (second-nearest 50 away: ratio 0); the rest sit between two training
# levels: 70 and 130 (distances 20 and 30: ratio 2/3) and 225 (25 and 25: ratio 1).
GENERATED = (0, 100, 250, 70, 130, 225)


def test_fid_calc_reports_memorisation_in_pixels_and_features(stand_in, tmp_path):
    train = flat_images(tmp_path / "train", TRAIN)
    gen = flat_images(tmp_path / "gen", GENERATED)
    ref = tmp_path / "ref.npz"
    assert run("fid", "ref", "--data", train, "--out", ref, "--device", "cpu").exit_code == 0
    result = run("fid", "calc", "--images", gen, "--ref", ref, "--memorization", train, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output.strip().splitlines()[-1])
    assert scores["memorized_px"] == scores["memorized_inception"] == 0.5
    assert scores["nn_ratio_px"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 6, rel=1e-12)
    assert scores["nn_ratio_inception"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 6, rel=1e-5)
    # Flat 8x8x3 images: l2 = level difference x sqrt(192), over 255 (pixels) or 128 (features).
    assert scores["nn_distance_px"] == pytest.approx((20 + 20 + 25) / 6 * math.sqrt(192) / 255, rel=1e-12)
    assert scores["nn_distance_inception"] == pytest.approx((20 + 20 + 25) / 6 * math.sqrt(192) / 128, rel=1e-5)
    assert scores["num"] == 6 and scores["memorization_num"] == 6 and scores["memorization"] == str(train)

    # The first 4 training images only (0..150): 250 is no longer a copy (ratio 100/150),
    # 225 sits 75 from 150 and 125 from 100 (0.6); copies of 0 and 100 remain.
    result = run("fid", "calc", "--images", gen, "--ref", ref, "--memorization", train,
                 "--memorization-num", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    assert "pixels memorized 0.333 " in line and "Inception memorized 0.333 " in line, line
    assert line.endswith("(vs 4 training images)"), line


def test_fid_calc_memorisation_mistakes_fail_before_any_features(monkeypatch, tmp_path):
    train = flat_images(tmp_path / "train", TRAIN)
    gen = flat_images(tmp_path / "gen", GENERATED)
    bigger = flat_images(tmp_path / "bigger", TRAIN, size=(16, 16))
    ref = tmp_path / "ref.npz"
    evaluate.save_reference(ref, metrics.stats_from_features(np.eye(3, 192)), {"resolution": [8, 8]})

    def no_inception(*args, **kwargs):
        raise AssertionError("Inception loaded before the inputs were checked")

    monkeypatch.setattr(metrics, "load_inception", no_inception)
    cases = [
        (["--memorization-num", "4"], "--memorization-num needs --memorization"),
        (["--memorization", train, "--memorization-num", "7"], "only 6 images"),
        (["--memorization", bigger], "16x16"),
        (["--memorization", tmp_path / "missing"], "no such folder"),
    ]
    for args, expected in cases:
        result = run("fid", "calc", "--images", gen, "--ref", ref, *args, "--device", "cpu")
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and expected in result.output, result.output


def test_fid_calc_memorisation_of_a_checkpoint_sees_the_data_as_its_run_did(stand_in, tmp_path):
    data = write_images(tmp_path / "data", count=8, size=(12, 12))  # padded to 16x16 in training
    out = tmp_path / "runs"
    result = run("train", "--data", data, "--outdir", out, "--resolution", "16", "--fit", "pad",
                 "--duration", "0.02", "--preset", "tiny", "--device", "cpu", "--workers", "0",
                 "--steps", "2", "--channels", "8", "--max-images", "5")
    assert result.exit_code == 0, result.output
    ckpt = list_checkpoints(only_run_dir(out))[-1]
    ref = tmp_path / "ref.npz"
    assert run("fid", "ref", "--data", data, "--out", ref, "--resolution", "16", "--fit", "pad",
               "--device", "cpu").exit_code == 0
    result = run("fid", "calc", "--checkpoint", ckpt, "--ref", ref, "--num", "3", "--steps", "2",
                 "--memorization", data, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output.strip().splitlines()[-1])
    assert scores["num"] == 3 and scores["memorization_num"] == 5  # the run's own random subset
    for space in ("px", "inception"):
        assert 0 <= scores[f"memorized_{space}"] <= 1 and scores[f"nn_distance_{space}"] > 0
        assert 0 < scores[f"nn_ratio_{space}"] <= 1
