"""Long runs: slices with --minutes, signals, faults, damaged checkpoints, resume rules,
odd canvases and non-finite losses. Each test fails on the behaviour it guards against."""

import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import patch_diffusion as pd
from patch_diffusion.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from patch_diffusion.config import replace
from patch_diffusion.train import advance, time_bar

from conftest import write_images
from test_cli import FAST, only_run_dir, run

train_module = importlib.import_module("patch_diffusion.train")  # the package exports train() by that name
IMG_PER_STEP = 8 * 1.9  # the tiny preset's batch x the stochastic schedule's expected multiplier


def kimg(steps: float) -> str:
    """A --duration that the tiny preset reaches in exactly ``steps`` steps."""
    return f"{(steps - 0.5) * IMG_PER_STEP / 1000:.6f}"


def tiny_config(data, **changes):
    config = pd.get_preset("tiny")
    return replace(config, data=replace(config.data, path=str(data), num_workers=0), device="cpu",
                   sample_kimg=1e9, **changes)


def stats_steps(run_dir):
    return [r["step"] for r in map(json.loads, (run_dir / "stats.jsonl").read_text().splitlines())
            if "loss" in r]


def assert_same_state(a_path, b_path):
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    assert a[1]["step"] == b[1]["step"] and a[1]["data_batches"] == b[1]["data_batches"]
    assert set(a[0]) == set(b[0])
    for key in a[0]:
        assert torch.equal(a[0][key], b[0][key]), key


# --- interruptions and resume ----------------------------------------------------------------

def test_minutes_apply_to_each_call(tiny_data, tmp_path):
    budget = 0.5  # seconds per call: several tiny steps
    config = tiny_config(tiny_data, duration_kimg=1e9, max_minutes=budget / 60, checkpoint_kimg=1e9)
    run_dir = pd.train(config, tmp_path, progress=False)
    first = list_checkpoints(run_dir)[-1]
    pd.train(config, tmp_path, resume_from=first, run_dir=run_dir, progress=False)
    second = list_checkpoints(run_dir)[-1]
    t1, t2 = (load_checkpoint(p, with_tensors=False)[1]["train_seconds"] for p in (first, second))
    steps1, steps2 = (load_checkpoint(p, with_tensors=False)[1]["step"] for p in (first, second))
    assert t1 >= budget and t2 - t1 >= budget  # the second call had a budget of its own
    assert steps2 - steps1 > 1


def test_lines_logged_after_the_resumed_checkpoint_are_dropped(tiny_data, tmp_path):
    config = tiny_config(tiny_data, duration_kimg=float(kimg(8)), checkpoint_kimg=4 * IMG_PER_STEP / 1000,
                         log_kimg=1e-6, keep_checkpoints=0)
    run_dir = pd.train(config, tmp_path, progress=False)
    reference = (run_dir / "stats.jsonl").read_text().splitlines()
    assert stats_steps(run_dir) == list(range(1, 9))
    # resume from step 4 in the same folder, as after a crash at step 8
    pd.train(config, tmp_path, resume_from=list_checkpoints(run_dir)[0], run_dir=run_dir, progress=False)
    assert stats_steps(run_dir) == list(range(1, 9))
    again = (run_dir / "stats.jsonl").read_text().splitlines()
    losses = [[json.loads(line).get("loss") for line in lines] for lines in (reference, again)]
    assert losses[0] == losses[1]  # the same steps, computed again exactly
    log = (run_dir / "log.txt").read_text()
    assert log.count(" step=8 ") == 1 and log.count(" step=3 ") == 1
    assert "resuming from" in log


def test_signal_handler_stops_at_the_step_boundary_and_a_second_ctrl_c_quits():
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when started in the background
    with train_module.StopSignals() as signals:
        signal.raise_signal(signal.SIGTERM)
        assert signals.received == signal.SIGTERM  # noted, not acted on yet
        signal.raise_signal(signal.SIGTERM)  # repeated SIGTERM: still just a stop request
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def _start(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "patch_diffusion.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_step(out: Path, step: int, proc, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        stats = list(out.glob("*/stats.jsonl"))
        if stats:
            lines = stats[0].read_text().splitlines()
            if lines and lines[-1].endswith("}") and json.loads(lines[-1])["step"] >= step:
                return
        time.sleep(0.01)


@pytest.mark.parametrize("signum, workers", [(signal.SIGTERM, 1), (signal.SIGINT, 0)])
def test_sigterm_and_ctrl_c_save_a_checkpoint_and_exit_cleanly(signum, workers, tiny_data, tmp_path):
    out = tmp_path / "runs"
    args = ["train", "--data", tiny_data, "--outdir", out, *FAST, "--workers", workers,
            "--duration", "1000", "--checkpoint-every", "1000", "--sample-every", "1000"]
    proc = _start(args, start_new_session=True)
    _wait_for_step(out, 3, proc)
    os.killpg(proc.pid, signum)  # as a terminal or a cluster does: to the whole process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    assert f"stopped by {signal.Signals(signum).name}" in err and "--resume latest" in err
    run_dir = only_run_dir(out)
    saved = load_checkpoint(list_checkpoints(run_dir)[-1], with_tensors=False)[1]
    assert saved["step"] >= 3 and stats_steps(run_dir)[-1] == saved["step"]


def test_sigkill_at_random_points_then_resume_is_bit_identical(tiny_data, tmp_path):
    """Fault injection: kill -9 three times at seeded random steps, resume each time."""
    steps, every = 40, 3
    common = ["--data", tiny_data, *FAST, "--duration", kimg(steps), "--checkpoint-every",
              f"{every * IMG_PER_STEP / 1000:.6f}", "--sample-every", "1000", "--dropout", "0.1"]
    assert run("train", "--outdir", tmp_path / "ref", *common).exit_code == 0
    reference = only_run_dir(tmp_path / "ref")

    out = tmp_path / "killed"
    rng = random.Random(1234)
    kills = sorted(rng.sample(range(4, steps - 4), 3))
    resumed = []
    for target in kills:
        proc = _start(["train", "--outdir", out, "--resume", "latest", *common])
        _wait_for_step(out, target, proc)
        time.sleep(rng.uniform(0, 0.05))  # anywhere inside a step or a checkpoint write
        proc.kill()
        proc.wait(timeout=60)
        if proc.returncode == -signal.SIGKILL:
            resumed.append(target)
    assert resumed, "the run finished before any kill landed"
    assert run("train", "--outdir", out, "--resume", "latest", *common).exit_code == 0

    run_dir = only_run_dir(out)
    assert_same_state(list_checkpoints(reference)[-1], list_checkpoints(run_dir)[-1])
    assert stats_steps(run_dir) == stats_steps(reference)  # each step logged once
    assert not list(run_dir.glob(".*.tmp"))


def test_damaged_newest_checkpoint_falls_back_to_the_newest_good_one(tiny_data, tmp_path):
    out = tmp_path / "runs"
    common = ["--data", tiny_data, *FAST, "--checkpoint-every", f"{4 * IMG_PER_STEP / 1000:.6f}",
              "--sample-every", "1000", "--keep", "0"]
    assert run("train", "--outdir", out, "--duration", kimg(12), *common).exit_code == 0
    run_dir = only_run_dir(out)
    four, eight, twelve = list_checkpoints(run_dir)
    data = bytearray(twelve.read_bytes())
    data[-100] ^= 0xFF  # one flipped bit in a weight: only the checksum can tell
    twelve.write_bytes(bytes(data))
    eight.write_bytes(eight.read_bytes()[:1000])  # truncated
    result = run("train", "--outdir", out, "--duration", kimg(12), "--resume", "latest", *common)
    assert result.exit_code == 0, result.output
    assert "is corrupt" in result.output and "truncated" in result.output
    assert f"newest good checkpoint, {four.name}" in result.output
    assert "resuming from" in (run_dir / "log.txt").read_text()
    assert load_checkpoint(list_checkpoints(run_dir)[-1], with_tensors=False)[1]["step"] == 12

    torn = tmp_path / "checkpoint-00000008.safetensors"
    torn.write_bytes(eight.read_bytes()[:1000])
    named = run("train", "--outdir", tmp_path / "other", "--resume", torn, *common)
    assert named.exit_code == 2 and "truncated" in named.output and "Traceback" not in named.output


def test_a_failed_checkpoint_write_keeps_the_previous_one(tiny_data, tmp_path, monkeypatch):
    from patch_diffusion import checkpoint

    config = tiny_config(tiny_data, duration_kimg=float(kimg(8)), checkpoint_kimg=4 * IMG_PER_STEP / 1000)
    real_write, writes = checkpoint.atomic_write_bytes, []

    def disk_full_on_second(path, data):
        writes.append(path)
        if len(writes) == 2:
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", disk_full_on_second)
    with pytest.raises(pd.UserError, match="No space left on device.*previous checkpoints are intact"):
        pd.train(config, tmp_path / "runs", progress=False)
    run_dir = only_run_dir(tmp_path / "runs")
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-00000004.safetensors"]
    load_checkpoint(list_checkpoints(run_dir)[0])  # intact


def test_resume_refuses_changes_that_would_remap_the_data(tiny_data, tmp_path):
    out = tmp_path / "runs"
    assert run("train", "--data", tiny_data, "--outdir", out, "--duration", kimg(2), *FAST).exit_code == 0
    result = run("train", "--outdir", out, "--resume", "latest", "--batch", "16", "--duration", kimg(4), *FAST)
    assert result.exit_code == 2 and "--batch" in result.output and "batch_size is 16" in result.output
    result = run("train", "--outdir", out, "--resume", "latest", "--channels", "32", *FAST)
    assert result.exit_code == 2 and "network options" in result.output and "model_channels" in result.output
    write_images(tiny_data, count=30)  # six more images in the same folder
    result = run("train", "--outdir", out, "--resume", "latest", "--duration", kimg(4), *FAST)
    assert result.exit_code == 2 and "now has 30 images" in result.output and "24" in result.output
    # what may change: the duration, the learning rate, the intervals
    (tiny_data / "img024.png").unlink()
    for k in range(25, 30):
        (tiny_data / f"img{k:03d}.png").unlink()
    result = run("train", "--outdir", out, "--resume", "latest", "--duration", kimg(4), "--lr", "0.0005", *FAST)
    assert result.exit_code == 0, result.output


def test_a_checkpoint_from_another_device_resumes_with_a_note(tiny_data, tmp_path):
    out = tmp_path / "runs"
    assert run("train", "--data", tiny_data, "--outdir", out, "--duration", kimg(2), *FAST).exit_code == 0
    path = list_checkpoints(only_run_dir(out))[-1]
    tensors, meta = load_checkpoint(path)
    # what a CUDA run writes: a Philox generator state (16 bytes) and the device's own state
    tensors["rng.noise"] = torch.zeros(16, dtype=torch.uint8)
    tensors["rng.cuda"] = torch.zeros(16, dtype=torch.uint8)
    save_checkpoint(path, tensors, {**meta, "device": "cuda"})
    result = run("train", "--outdir", out, "--resume", "latest", "--duration", kimg(4), *FAST)
    assert result.exit_code == 0, result.output
    assert "written on cuda, resumed on cpu" in result.output
    assert load_checkpoint(list_checkpoints(only_run_dir(out))[-1], with_tensors=False)[1]["step"] == 4


def test_the_rng_state_saved_and_restored_is_the_runs_own_gpus(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda index: calls.append(("get", index)) or torch.zeros(16, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: calls.append(("set", index)))
    trainer = SimpleNamespace(device=torch.device("cuda", 3), patch_gen=torch.Generator(),
                              noise_gen=torch.Generator(), config=pd.get_preset("tiny"))
    tensors = train_module._rng_tensors(trainer)
    train_module._restore_rng(trainer, tensors, {"device": "cuda", "step": 1})
    assert calls == [("get", 3), ("set", 3)]


class NaNAfter(nn.Module):
    """A tiny backbone whose training calls give NaN for the steps listed in ``bad``."""

    bad: set = set()
    calls = 0

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(5, 3, 3, padding=1)

    def forward(self, x, noise_labels, class_labels=None):
        out = self.conv(x)
        if self.training:
            type(self).calls += 1
            if type(self).calls in self.bad:
                return out * float("nan")
        return out


def test_non_finite_losses_skip_their_steps(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(NaNAfter, "bad", {3, 4})
    monkeypatch.setattr(NaNAfter, "calls", 0)
    config = tiny_config(tiny_data, duration_kimg=float(kimg(6)), log_kimg=1e-6)
    run_dir = pd.train(config, tmp_path, backbone=NaNAfter(), progress=False)
    tensors, meta = load_checkpoint(list_checkpoints(run_dir)[-1])
    assert meta["step"] == 6 and meta["skipped_steps"] == 2
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith(("net.", "ema.")))
    assert "loss not finite at step 3: step skipped" in (run_dir / "log.txt").read_text()


def test_non_finite_losses_in_a_row_stop_the_run_keeping_the_last_checkpoint(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(NaNAfter, "bad", set(range(5, 100)))
    monkeypatch.setattr(NaNAfter, "calls", 0)
    config = tiny_config(tiny_data, duration_kimg=float(kimg(20)), checkpoint_kimg=2 * IMG_PER_STEP / 1000)
    with pytest.raises(pd.UserError, match=r"not finite for 5 steps in a row.*checkpoint-00000004"):
        pd.train(config, tmp_path / "runs", backbone=NaNAfter(), progress=False)
    run_dir = only_run_dir(tmp_path / "runs")
    assert list_checkpoints(run_dir)[-1].name == "checkpoint-00000004.safetensors"


# --- odd canvases ---------------------------------------------------------------------------

def test_28px_images_get_the_default_patch_sizes_that_fit(tmp_path):
    data = write_images(tmp_path / "mnist-size", count=8, size=(28, 28), mode="L")
    out = tmp_path / "runs"
    result = run("train", "--data", data, "--outdir", out, "--duration", kimg(2), *FAST)
    assert result.exit_code == 0, result.output
    assert "patch sizes: 14x14 (default 7x7 left out" in result.output
    assert "14x14 p=0.50, 28x28 p=0.50" in result.output
    # a three-level network takes neither 7 nor 14: the error names a canvas that fits
    result = run("train", "--data", data, "--outdir", out, "--channel-mult", "1,2,2", *FAST)
    assert result.exit_code == 2 and "--resolution 32 --fit pad" in result.output


def test_time_bar_draws_when_a_slice_starts_past_its_budget():
    # a resumed slice whose previous step overran its FID point starts beyond its pause;
    # the bar must still draw (tqdm drops a total it is already past and cannot format it)
    bar = time_bar(1.0, 3.0)
    assert "1/1 s of training" in str(bar)
    advance(bar, 0.5)
    assert bar.n == bar.total == 1.0
    bar.close()
