"""End-to-end runs of the command line on tiny synthetic images."""

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from patch_diffusion.checkpoint import list_checkpoints, load_checkpoint
from patch_diffusion.cli import main

from conftest import write_images

FAST = ["--preset", "tiny", "--device", "cpu", "--workers", "0", "--steps", "3"]


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def only_run_dir(outdir):
    dirs = [p for p in outdir.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_train_generate_reload(tiny_data, tmp_path):
    out = tmp_path / "runs"
    result = run("train", "--data", tiny_data, "--outdir", out, "--duration", "0.05", *FAST)
    assert result.exit_code == 0, result.output
    run_dir = only_run_dir(out)
    assert run_dir.name == "00000-tiny-stochastic-p0.5"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["resolution"] == [16, 16] and config["model"]["channels"] == 3
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["step"] == 4 and all(s["loss"] > 0 for s in stats)
    assert (run_dir / "reals.png").exists() and list(run_dir.glob("samples-*.png"))
    ckpt = list_checkpoints(run_dir)[-1]

    gen = tmp_path / "gen"
    result = run("generate", "--checkpoint", ckpt, "--outdir", gen, "--seeds", "0-4,9",
                 "--steps", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in gen.glob("seed*.png"))
    assert names == [f"seed{s:06d}.png" for s in (0, 1, 2, 3, 4, 9)]
    image = Image.open(gen / "seed000009.png")
    assert image.size == (16, 16) and image.mode == "RGB"
    assert (gen / "grid.png").exists()

    # same seed, same image, whatever else is in the batch
    again = tmp_path / "again"
    assert run("generate", "--checkpoint", ckpt, "--outdir", again, "--seeds", "9",
               "--steps", "4", "--device", "cpu", "--no-grid").exit_code == 0
    assert (again / "seed000009.png").read_bytes() == (gen / "seed000009.png").read_bytes()
    assert not (again / "grid.png").exists()


def test_non_square_grayscale_images_end_to_end(tmp_path):
    data = write_images(tmp_path / "wide", count=12, size=(16, 24), mode="L")
    out = tmp_path / "runs"
    result = run("train", "--data", data, "--outdir", out, "--duration", "0.03", *FAST)
    assert result.exit_code == 0, result.output
    assert "4x6 p=0.20, 8x12 p=0.30, 16x24 p=0.50" in result.output
    ckpt = list_checkpoints(only_run_dir(out))[-1]
    gen = tmp_path / "gen"
    assert run("generate", "--checkpoint", ckpt, "--outdir", gen, "--seeds", "0-1", "--steps", "3",
               "--device", "cpu").exit_code == 0
    image = Image.open(gen / "seed000001.png")
    assert image.size == (24, 16) and image.mode == "L"


def test_resume_is_bit_identical(tiny_data, tmp_path):
    img_per_step = 8 * 1.9  # tiny preset batch x expected multiplier
    half, full = [f"{(n - 0.5) * img_per_step / 1000:.6f}" for n in (4, 8)]
    common = ["--data", tiny_data, *FAST, "--checkpoint-every", "100", "--sample-every", "100",
              "--dropout", "0.1"]
    assert run("train", "--outdir", tmp_path / "a", "--duration", full, *common).exit_code == 0
    assert run("train", "--outdir", tmp_path / "b", "--duration", half, *common).exit_code == 0
    result = run("train", "--outdir", tmp_path / "b", "--duration", full, "--resume", "latest", *common)
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output
    a = load_checkpoint(list_checkpoints(only_run_dir(tmp_path / "a"))[-1])
    b = load_checkpoint(list_checkpoints(only_run_dir(tmp_path / "b"))[-1])
    assert a[1]["step"] == b[1]["step"] == 8
    assert a[1]["data_batches"] == b[1]["data_batches"]
    for key in a[0]:
        if key.startswith(("net.", "ema.", "optim.")):
            assert torch.equal(a[0][key], b[0][key]), key


def test_dry_run_prints_resolved_options(tmp_path):
    result = run("train", "--dry-run", "--preset", "tiny", "--real-p", "0.25",
                 "--schedule", "progressive", "--patch-sizes", "4,8", "--lr", "0.002")
    assert result.exit_code == 0, result.output
    config = json.loads(result.output)
    assert config["patch"] == {"schedule": "progressive", "real_p": 0.25, "patch_sizes": [4, 8], "probs": [],
                               "real_p_end": None, "patch_until": None, "batch_images": "distinct"}
    assert config["lr"] == 0.002 and config["preset"] == "tiny"


def test_recipes_and_variant_options_reach_the_config():
    paper = json.loads(run("train", "--dry-run", "--preset", "tiny", "--recipe", "paper").output)
    assert paper["patch"]["real_p"] == 0.5 and paper["loss"]["reduction"] == "sum"
    # options laid over a recipe win
    mixed = json.loads(run("train", "--dry-run", "--preset", "tiny", "--recipe", "paper",
                           "--loss-reduction", "mean", "--real-p", "1", "--real-p-end", "0.25",
                           "--batch-images", "repeat", "--patch-noise-shift", "0.5",
                           "--patch-lr-scale", "2", "--channels-last").output)
    assert mixed["loss"] == {**paper["loss"], "reduction": "mean", "patch_P_mean_shift": 0.5}
    assert mixed["patch"]["real_p_end"] == 0.25 and mixed["patch"]["batch_images"] == "repeat"
    assert mixed["patch_lr_scale"] == 2.0 and mixed["channels_last"] is True
    bad = run("train", "--dry-run", "--recipe", "nope")
    assert bad.exit_code == 2


def test_repeat_mode_reads_one_batch_per_step_and_trains_channels_last(tiny_data, tmp_path):
    out = tmp_path / "runs"
    result = run("train", "--data", tiny_data, "--outdir", out, "--duration", "0.08", *FAST,
                 "--batch-images", "repeat", "--channels-last", "--patch-noise-shift", "1")
    assert result.exit_code == 0, result.output
    meta = load_checkpoint(list_checkpoints(only_run_dir(out))[-1], with_tensors=False)[1]
    assert meta["data_batches"] == meta["step"] > 0  # one loader batch per step, any patch size


def test_user_data_does_not_inherit_the_presets_size(tiny_data):
    preset = json.loads(run("train", "--dry-run", "--preset", "fmnist-32").output)
    assert preset["data"]["resolution"] == [32, 32] and preset["data"]["fit"] == "pad"
    mine = json.loads(run("train", "--dry-run", "--preset", "fmnist-32", "--data", tiny_data).output)
    assert mine["data"]["path"] == str(tiny_data)
    assert mine["data"]["resolution"] is None and mine["data"]["fit"] == "none"


def test_help_explains_every_command():
    for args in ([], ["train"], ["generate"], ["demo"]):
        result = run(*args, "--help")
        assert result.exit_code == 0 and "Usage" in result.output
    assert "--real-p" in run("train", "--help").output


def corrupt_folder(tmp_path):
    folder = write_images(tmp_path / "corrupt", count=4)
    (folder / "broken.png").write_bytes(b"not really a png")
    return folder


def mixed_folder(tmp_path):
    folder = write_images(tmp_path / "mixed", count=3)
    write_images(folder / "big", count=3, size=(20, 24))
    return folder


def empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


BAD_TRAIN = {
    "missing data": (lambda t, d: ["--data", t / "nope"], "no such folder"),
    "empty folder": (lambda t, d: ["--data", empty_folder(t)], "no images"),
    "corrupt image": (lambda t, d: ["--data", corrupt_folder(t)], "broken.png"),
    "mixed sizes": (lambda t, d: ["--data", mixed_folder(t)], "--fit"),
    "indivisible patch": (lambda t, d: ["--data", d, "--patch-sizes", "5"], "does not divide"),
    "p out of range": (lambda t, d: ["--data", d, "--real-p", "1.5"], "[0, 1]"),
    "unknown preset": (lambda t, d: ["--data", d, "--preset", "huge"], "unknown preset"),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN))
def test_bad_train_input_is_one_clear_line(case, tiny_data, tmp_path):
    make_args, expected = BAD_TRAIN[case]
    args = make_args(tmp_path, tiny_data)
    out = tmp_path / "runs"
    preset = [] if "--preset" in args else ["--preset", "tiny"]
    result = run("train", "--outdir", out, "--device", "cpu", *preset, *args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output
    assert not out.exists() or not any(out.iterdir())  # no half-made run folder


def test_bad_checkpoints_are_clear(tiny_data, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    for path, expected in ((junk, "truncated"), (tmp_path / "missing.safetensors", "does not exist")):
        gen = tmp_path / "gen"
        result = run("generate", "--checkpoint", path, "--outdir", gen)
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert result.output.startswith("error: ") and expected in result.output
        assert not gen.exists()
    result = run("train", "--outdir", tmp_path / "r", "--resume", junk)
    assert result.exit_code == 2 and "truncated" in result.output
    result = run("generate", "--checkpoint", junk, "--outdir", tmp_path / "g", "--seeds", "x-y")
    assert result.exit_code == 2 and "seeds" in result.output


def test_console_script_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "patch_diffusion.cli", "train", "--data",
                           str(tmp_path / "nowhere"), "--outdir", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "no such folder" in proc.stderr


def test_subset_seed_option_is_recorded():
    def data_of(*args):
        result = run("train", "--dry-run", "--preset", "tiny", "--max-images", "8", *args)
        assert result.exit_code == 0, result.output
        return json.loads(result.output)["data"]

    assert data_of()["subset_seed"] == 0  # a random subset, drawn with a recorded seed
    assert data_of("--subset-seed", "7")["subset_seed"] == 7
    assert data_of("--subset-seed", "first")["subset_seed"] is None  # the first 8 files, as before
    bad = run("train", "--dry-run", "--subset-seed", "many")
    assert bad.exit_code == 2 and "--subset-seed takes a whole number or 'first'" in bad.output
