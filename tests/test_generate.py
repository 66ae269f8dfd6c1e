"""generate_to_folder: images stream to disk, and an interrupted --seeds range resumes."""

import weakref

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from patch_diffusion import generate as gen
from patch_diffusion.checkpoint import list_checkpoints
from patch_diffusion.cli import main

from conftest import write_images

FAST = ["--steps", "2", "--sampler", "euler", "--device", "cpu"]
SAMPLER = {"num_steps": 2, "name": "euler"}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One tiny trained checkpoint (16x16 RGB) shared by every test here."""
    root = tmp_path_factory.mktemp("gen")
    data = write_images(root / "data", count=12)
    result = run("train", "--data", data, "--outdir", root / "runs", "--preset", "tiny", "--duration",
                 "0.02", "--device", "cpu", "--workers", "0", "--steps", "2")
    assert result.exit_code == 0, result.output
    (run_dir,) = [p for p in (root / "runs").iterdir() if p.is_dir()]
    return list_checkpoints(run_dir)[-1]


def pngs(folder, seeds):
    return [(folder / f"seed{s:06d}.png").read_bytes() for s in seeds]


def decoded(path):
    return torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)


def test_only_the_grids_images_are_kept(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(gen, "GRID_MAX", 4)
    batches = []  # weak references to every batch that sample() returned
    real_sample = gen.sample

    def tracked_sample(*args, **kwargs):
        images = real_sample(*args, **kwargs)
        batches.append(weakref.ref(images))
        return images

    shown = {}

    def fake_save_grid(images, path, scale=1):
        shown["images"] = images.clone()
        shown["alive"] = sum(ref() is not None for ref in batches)
        return path

    monkeypatch.setattr(gen, "sample", tracked_sample)
    monkeypatch.setattr(gen, "save_grid", fake_save_grid)
    out = tmp_path / "out"
    done = gen.generate_to_folder(checkpoint, out, list(range(6)), sampler_changes=SAMPLER,
                                  batch_size=2, device="cpu", progress=False)
    assert len(batches) == 3 and done.sampled == 6
    # earlier batches were freed once written: at most the last one is still referenced
    assert shown["alive"] <= 1
    grid = shown["images"]
    assert grid.shape == (4, 3, 16, 16) and grid.dtype == torch.uint8
    for k in range(4):  # the first seeds, in order, exactly as saved
        assert torch.equal(grid[k], decoded(out / f"seed{k:06d}.png"))


def test_an_interrupted_range_resumes_to_the_same_files(checkpoint, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    first = run("generate", "--checkpoint", checkpoint, "--outdir", whole, "--seeds", "0-5", "--batch", "4", *FAST)
    assert first.exit_code == 0, first.output
    assert "skipped" not in first.output and "wrote 6 images" in first.output

    assert run("generate", "--checkpoint", checkpoint, "--outdir", resumed, "--seeds", "0-2", *FAST).exit_code == 0
    again = run("generate", "--checkpoint", checkpoint, "--outdir", resumed, "--seeds", "0-5", "--batch", "4", *FAST)
    assert again.exit_code == 0, again.output
    assert "skipped 3 seeds whose PNGs exist" in again.output and "wrote 3 images" in again.output
    assert pngs(resumed, range(6)) == pngs(whole, range(6))
    # the grid reads the skipped seeds back from their PNGs
    assert (resumed / "grid.png").read_bytes() == (whole / "grid.png").read_bytes()

    # a truncated PNG or one of another size is sampled again; complete ones are skipped
    (resumed / "seed000004.png").write_bytes((whole / "seed000004.png").read_bytes()[:-30])
    Image.new("RGB", (8, 8)).save(resumed / "seed000001.png")
    repaired = gen.generate_to_folder(checkpoint, resumed, list(range(6)), sampler_changes=SAMPLER,
                                      device="cpu", progress=False)
    assert (repaired.sampled, repaired.skipped) == (2, 4)
    assert pngs(resumed, range(6)) == pngs(whole, range(6))

    # nothing left to sample: no division by zero, and the same NFE as the sampling run
    finished = gen.generate_to_folder(checkpoint, resumed, list(range(6)), sampler_changes=SAMPLER,
                                      device="cpu", progress=False)
    assert (finished.sampled, finished.skipped) == (0, 6)
    assert finished.nfe == repaired.nfe == 2
    assert finished.paths == [resumed / f"seed{s:06d}.png" for s in range(6)]


def test_existing_pngs_are_reused_unless_overwrite(checkpoint, tmp_path):
    out = tmp_path / "out"
    args = ["generate", "--checkpoint", checkpoint, "--outdir", out, "--seeds", "0-1", *FAST]
    assert run(*args).exit_code == 0
    original = pngs(out, [0])
    # a valid stand-in of the right size is kept as it is (proof that the seed was not
    # sampled again) and is what the grid shows
    Image.new("RGB", (16, 16), (255, 0, 0)).save(out / "seed000000.png")
    stand_in = pngs(out, [0])
    kept = run(*args)
    assert kept.exit_code == 0 and "skipped 2 seeds" in kept.output and "wrote 0 images" in kept.output
    assert "2 network evaluations per image" in kept.output
    assert pngs(out, [0]) == stand_in
    grid = Image.open(out / "grid.png").convert("RGB")
    assert grid.getpixel((2 * 4 + 1, 2 * 4 + 1)) == (255, 0, 0)  # first cell (pad 2, scale 4)

    fresh = run(*args, "--overwrite")
    assert fresh.exit_code == 0 and "skipped" not in fresh.output and "wrote 2 images" in fresh.output
    assert pngs(out, [0]) == original


def test_read_png_accepts_only_complete_images_of_the_expected_shape(tmp_path):
    image = torch.randint(0, 256, (1, 5, 7), dtype=torch.uint8)
    path = tmp_path / "a.png"
    path.write_bytes(gen.encode_png(image))
    assert torch.equal(gen.read_png(path, (1, 5, 7)), image)
    assert gen.read_png(path, (3, 5, 7)) is None  # grayscale where RGB is expected
    assert gen.read_png(path, (1, 7, 5)) is None
    assert gen.read_png(tmp_path / "missing.png", (1, 5, 7)) is None
    path.write_bytes(path.read_bytes()[:40])
    assert gen.read_png(path, (1, 5, 7)) is None


def test_a_folder_made_with_other_settings_is_not_completed(checkpoint, tmp_path):
    out = tmp_path / "out"
    assert run("generate", "--checkpoint", checkpoint, "--outdir", out, "--seeds", "0-1", *FAST).exit_code == 0
    other = run("generate", "--checkpoint", checkpoint, "--outdir", out, "--seeds", "0-3", "--sampler", "euler",
                "--steps", "3", "--device", "cpu")
    assert other.exit_code == 2 and "made with another sampler" in other.output
    assert not (out / "seed000002.png").exists()
    replaced = run("generate", "--checkpoint", checkpoint, "--outdir", out, "--seeds", "0-3", "--sampler", "euler",
                   "--steps", "3", "--device", "cpu", "--overwrite")
    assert replaced.exit_code == 0 and "wrote 4 images" in replaced.output
