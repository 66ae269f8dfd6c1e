"""Several processes under torchrun (gloo on 127.0.0.1) train exactly as one process
at the same global batch; gradient accumulation likewise; splits and errors."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from patch_diffusion.checkpoint import list_checkpoints, load_checkpoint
from patch_diffusion.config import get_preset, replace, with_data
from patch_diffusion.data import InfiniteBatches, open_dataset
from patch_diffusion.distributed import per_process_batch, shard_rows
from patch_diffusion.errors import UserError
from patch_diffusion.patches import make_patches
from patch_diffusion.step import Trainer, drop_labels

from conftest import write_images

# fp32 and NCHW so that one and two processes differ only in the order of float sums;
# dropout 0: its masks are drawn per process.
COMMON = ["--preset", "tiny", "--device", "cpu", "--workers", "0", "--steps", "3", "--precision", "fp32",
          "--no-channels-last", "--dropout", "0", "--checkpoint-every", "100", "--sample-every", "100",
          "--batch", "8", "--seed", "3"]
IMG_PER_STEP = 8 * 1.9  # tiny preset: batch x expected multiplier of R/4, R/2, R


def kimg(steps):
    return f"{(steps - 0.5) * IMG_PER_STEP / 1000:.6f}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    # One thread per process: two processes share this machine's cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def torchrun(*args, nproc=2, nnodes=1, node_rank=0, port=None, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}",
           f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port or free_port()}",
           "-m", "patch_diffusion", *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    if not wait:
        return proc
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out, err


def single(*args):
    cmd = [sys.executable, "-m", "patch_diffusion", *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=240)
    return done.returncode, done.stdout, done.stderr


def last_checkpoint(outdir):
    (run_dir,) = [p for p in outdir.iterdir() if p.is_dir()]
    return load_checkpoint(list_checkpoints(run_dir)[-1])


def assert_same_training(a, b, atol=2e-5):
    assert a[1]["step"] == b[1]["step"] and a[1]["data_batches"] == b[1]["data_batches"]
    assert a[1]["images"] == b[1]["images"]
    keys = [k for k in a[0] if k.startswith(("net.", "ema."))]
    assert keys
    for key in keys:
        torch.testing.assert_close(a[0][key], b[0][key], atol=atol, rtol=1e-4, msg=key)
    assert torch.equal(a[0]["rng.patch"], b[0]["rng.patch"])  # the same draws were made
    assert torch.equal(a[0]["rng.noise"], b[0]["rng.noise"])


# --- how a step is split ----------------------------------------------------------------

def test_per_process_batch_is_global_over_devices_and_rounds():
    assert per_process_batch(64, 1, None) == (64, 1)
    assert per_process_batch(64, 4, None) == (16, 1)
    assert per_process_batch(64, 4, 4) == (16, 4)
    assert per_process_batch(64, 2, 64) == (32, 1)  # a device that holds its whole share
    with pytest.raises(UserError, match="multiple of 3"):
        per_process_batch(64, 3, None)
    with pytest.raises(UserError, match="divisor of 16"):
        per_process_batch(64, 4, 5)


def test_shard_rows_pick_each_process_its_slice_of_every_loader_batch():
    # d = 2 loader batches of 4 images, 2 processes: rank 1 holds images 2,3 of each.
    assert shard_rows(4, 2, 1, 2, "distinct").tolist() == [2, 3, 6, 7]
    assert shard_rows(4, 2, 0, 1, "distinct").tolist() == [0, 1]
    # repeat mode: one batch, each image repeated d times in a row.
    assert shard_rows(4, 2, 1, 2, "repeat").tolist() == [4, 5, 6, 7]
    together = torch.cat([shard_rows(6, 3, r, 4, "distinct") for r in range(3)])
    assert sorted(together.tolist()) == list(range(24))  # a partition of the global batch


def test_shards_of_the_loader_partition_every_global_batch(tmp_path):
    data = open_dataset(str(write_images(tmp_path / "d", count=10)))
    whole = iter(InfiniteBatches(data, 4, seed=1, start_batch=3))
    parts = [iter(InfiniteBatches(data, 4, seed=1, start_batch=3, shard=(r, 2))) for r in range(2)]
    for _ in range(5):
        images, labels = next(whole)
        shares = [next(p) for p in parts]
        assert torch.equal(torch.cat([s[0] for s in shares]), images)
    with pytest.raises(UserError, match="divisible by 3"):
        InfiniteBatches(data, 4, shard=(0, 3))


def test_draws_for_a_share_equal_the_same_rows_of_one_process_draws():
    images = torch.randn(8, 3, 16, 16)
    whole = make_patches(images, None, 2, torch.Generator().manual_seed(5))
    rows = torch.tensor([2, 3, 6, 7])
    part = make_patches(images[rows], None, 2, torch.Generator().manual_seed(5), rows=rows, total=8)
    assert torch.equal(part.images, whole.images[rows]) and torch.equal(part.pos, whole.pos[rows])
    labels = torch.ones(8, 4)
    kept = drop_labels(labels, 0.5, torch.Generator().manual_seed(1))
    share = drop_labels(labels[rows], 0.5, torch.Generator().manual_seed(1), rows=rows, total=8)
    assert torch.equal(share, kept[rows]) and 0 < kept[:, 0].sum() < 8


def test_gradient_accumulation_trains_as_the_whole_batch_at_once(tmp_path):
    data = str(write_images(tmp_path / "d", count=24))
    base = with_data(get_preset("tiny"), data)
    base = replace(base, precision="fp32", channels_last=False, batch_size=8, seed=2)
    results = []
    for batch_gpu in (None, 2):
        config = replace(base, batch_gpu=batch_gpu)
        from patch_diffusion.train import open_run_data, resolve_config
        dataset = open_run_data(config.data)
        config = resolve_config(config, dataset)
        trainer = Trainer(config, torch.device("cpu"))
        assert trainer.rounds == (4 if batch_gpu else 1)
        trainer.start_data(dataset, 0)
        divisors = []
        for _ in range(6):
            divisor = trainer.draw_divisor()
            divisors.append(divisor)
            assert trainer.optimise(trainer.patches(*trainer.load(divisor), divisor)) is not None
        results.append((trainer.net.state_dict(), divisors))
    assert results[0][1] == results[1][1] and len(set(results[0][1])) > 1  # patch steps included
    for key, value in results[0][0].items():
        torch.testing.assert_close(results[1][0][key], value, atol=2e-5, rtol=1e-4, msg=key)


def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    from patch_diffusion.distributed import Distributed
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert Distributed.from_environment() == Distributed()  # no torchrun: one process
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    dist = Distributed.from_environment()
    assert (dist.rank, dist.world_size, dist.local_rank, dist.local_world_size) == (3, 4, 1, 2)
    assert dist.device("cpu") == torch.device("cpu")
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dist.device("auto") == dist.device("cuda") == torch.device("cuda", 1) == chosen[-1]
    with pytest.raises(UserError, match="use --device cuda") as error:
        dist.device("cuda:0")
    assert error.value.rank is None  # every process meets it: rank 0 says it once
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="lower --nproc_per_node") as error:
        dist.device("cuda")
    assert error.value.rank == 3  # this process's own problem: it says it


# --- torchrun end to end ------------------------------------------------------------------

def test_two_processes_train_as_one(tmp_path):
    data = write_images(tmp_path / "data", count=24)
    args = ["train", "--data", data, *COMMON, "--duration", kimg(8)]
    code, out, err = single(*args, "--outdir", tmp_path / "one")
    assert code == 0, err
    code, out, err = torchrun(*args, "--outdir", tmp_path / "two")
    assert code == 0, err
    # rank 0 alone writes: one run folder, one log
    log = out + err
    assert log.count("new run in") == 1 and "2 processes (gloo)" in log
    one, two = last_checkpoint(tmp_path / "one"), last_checkpoint(tmp_path / "two")
    assert two[1]["world_size"] == 2 and one[1]["step"] == 8
    assert_same_training(one, two)


def test_two_nodes_then_resume_on_two_processes_continue_one_process_run(tmp_path):
    data = write_images(tmp_path / "data", count=24)
    args = ["train", "--data", data, *COMMON]
    code, _, err = single(*args, "--duration", kimg(8), "--outdir", tmp_path / "one")
    assert code == 0, err
    # Two "machines": two torchrun launches of one process each, rendezvous on localhost.
    port = free_port()
    nodes = [torchrun(*args, "--duration", kimg(4), "--outdir", tmp_path / "job", nproc=1, nnodes=2,
                      node_rank=rank, port=port, wait=False) for rank in (0, 1)]
    for node in nodes:
        out, err = node.communicate(timeout=240)
        assert node.returncode == 0, err
    half = last_checkpoint(tmp_path / "job")
    assert half[1]["step"] == 4 and half[1]["world_size"] == 2
    code, out, err = torchrun(*args, "--duration", kimg(8), "--outdir", tmp_path / "job", "--resume", "latest")
    assert code == 0, err
    assert (out + err).count("resuming from") == 1
    assert_same_training(last_checkpoint(tmp_path / "one"), last_checkpoint(tmp_path / "job"))


def test_a_batch_that_does_not_split_is_one_line_from_one_process(tmp_path):
    data = write_images(tmp_path / "data", count=24)
    code, out, err = torchrun("train", "--data", data, *COMMON, "--batch", "6", "--batch-gpu", "2",
                              "--duration", kimg(2), "--outdir", tmp_path / "out")
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == ["error: --batch-gpu 2 does not divide the 3 images each of the 2 processes gets "
                     "from --batch 6; use a divisor of 3"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _worker_pid(parent_pid, rank):
    """The torchrun worker with RANK=rank (Linux /proc)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if ppid == parent_pid and f"RANK={rank}".encode() in environ:
            return int(entry)
    return None


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the worker through /proc")
def test_a_process_that_dies_ends_the_job_with_intact_checkpoints(tmp_path):
    import signal
    import time
    data = write_images(tmp_path / "data", count=24)
    out = tmp_path / "out"
    proc = torchrun("train", "--data", data, *COMMON, "--duration", "50", "--checkpoint-every", "0.1",
                    "--outdir", out, wait=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(out.glob("*/checkpoint-*.safetensors")):
        time.sleep(0.2)
    victim = _worker_pid(proc.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "error: process 0 of 2 lost contact with the others (" in err
    (run_dir,) = out.iterdir()
    kept = list_checkpoints(run_dir)
    assert kept and all(load_checkpoint(path)[1]["world_size"] == 2 for path in kept)
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]
