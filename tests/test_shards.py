"""Data larger than memory: WebDataset-style tar shards and Hugging Face datasets saved
to disk, read lazily, resumable exactly, with clear errors."""

import gzip
import io
import tarfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from patch_diffusion.checkpoint import list_checkpoints, load_checkpoint
from patch_diffusion.cli import main
from patch_diffusion.data import InfiniteBatches, open_dataset
from patch_diffusion.data.shards import expand_braces

from conftest import write_images


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, shards=3, per_shard=5, size=(16, 16), labels=True, seed=0):
    """Shards shard-0.tar..; sample k is key 'sample{k:04d}' with .png (and .cls = k % 2)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = []
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s}.tar", "w") as tar:
            for j in range(per_shard):
                k = s * per_shard + j
                array = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                arrays.append(array)
                add(tar, f"sample{k:04d}.png", png_bytes(array))
                if labels:
                    add(tar, f"sample{k:04d}.cls", str(k % 2).encode())
    return arrays


def test_brace_patterns_expand_like_the_shell():
    assert expand_braces("a/{000..002}.tar") == ["a/000.tar", "a/001.tar", "a/002.tar"]
    assert expand_braces("{8..10}-{a,b}.tar") == ["8-a.tar", "8-b.tar", "9-a.tar", "9-b.tar", "10-a.tar", "10-b.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_tar_shards_are_indexed_in_order_and_read_lazily(tmp_path):
    arrays = write_shards(tmp_path / "s")
    data = open_dataset(str(tmp_path / "s" / "shard-{0..2}.tar"))
    assert len(data) == 15 and not data.in_memory and data.num_classes == 2
    assert data.resolution == (16, 16) and data.channels == 3
    images, labels = data.get_batch(torch.tensor([0, 7, 14]))
    for got, k in zip(images, (0, 7, 14)):
        assert torch.equal(got, torch.from_numpy(arrays[k]).permute(2, 0, 1))
    assert labels.tolist() == [0, 1, 0]
    subset = open_dataset(str(tmp_path / "s" / "shard-{0..2}.tar"), max_images=4, subset_seed=3)
    assert len(subset) == 4


def test_lazy_sets_resume_exactly_through_worker_processes(tmp_path):
    write_shards(tmp_path / "s")
    data = open_dataset(str(tmp_path / "s" / "shard-{0..2}.tar"))
    whole = iter(InfiniteBatches(data, 4, seed=5, num_workers=0))
    expected = [next(whole) for _ in range(7)]
    resumed = iter(InfiniteBatches(data, 4, seed=5, start_batch=3, num_workers=2))
    for images, labels in expected[3:]:
        got_images, got_labels = next(resumed)
        assert torch.equal(got_images, images) and torch.equal(got_labels, labels)


def test_training_on_shards_resumes_bit_identically(tmp_path):
    write_shards(tmp_path / "s")
    spec = str(tmp_path / "s" / "shard-{0..2}.tar")
    common = ["--data", spec, "--preset", "tiny", "--device", "cpu", "--workers", "1", "--steps", "2",
              "--checkpoint-every", "100", "--sample-every", "100", "--cond"]
    half, full = [f"{(n - 0.5) * 8 * 1.9 / 1000:.6f}" for n in (3, 6)]
    assert run("train", "--outdir", tmp_path / "a", "--duration", full, *common).exit_code == 0
    assert run("train", "--outdir", tmp_path / "b", "--duration", half, *common).exit_code == 0
    result = run("train", "--outdir", tmp_path / "b", "--duration", full, "--resume", "latest", *common)
    assert result.exit_code == 0, result.output
    assert "3 tar shards" in result.output
    a, b = [load_checkpoint(list_checkpoints(next((tmp_path / x).iterdir()))[-1]) for x in "ab"]
    assert a[1]["step"] == b[1]["step"] == 6
    for key in a[0]:
        if key.startswith(("net.", "ema.")):
            assert torch.equal(a[0][key], b[0][key]), key


def one_error_line(result, expected):
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output


@pytest.mark.parametrize("case, expected", [
    ("empty", "is empty"),
    ("gzip", "must be uncompressed .tar"),
    ("missing", "does not exist"),
    ("no-images", "holds no images"),
    ("bad-label", "whole-number class label"),
    ("negative-label", "negative class label"),
])
def test_bad_shards_are_one_clear_line(case, expected, tmp_path):
    folder = tmp_path / "s"
    write_shards(folder, shards=2, per_shard=2)
    bad = folder / "shard-1.tar"
    if case == "empty":
        bad.write_bytes(b"")
    elif case == "gzip":
        bad.write_bytes(gzip.compress(bad.read_bytes()))
    elif case == "missing":
        bad.unlink()
    else:
        with tarfile.open(bad, "w") as tar:
            if case == "no-images":
                add(tar, "a.txt", b"hello")
            else:
                add(tar, "x.png", png_bytes(np.zeros((16, 16, 3), np.uint8)))
                add(tar, "x.cls", b"cat" if case == "bad-label" else b"-2")
    out = tmp_path / "runs"
    one_error_line(run("train", "--data", folder / "shard-{0..1}.tar", "--outdir", out, "--preset", "tiny",
                       "--device", "cpu", "--duration", "0.01"), expected)
    assert not out.exists() or not any(out.iterdir())


def test_saved_hugging_face_datasets_open_by_folder_and_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = write_images(tmp_path / "imgs", count=6)
    pictures = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    table = datasets.Dataset.from_dict({"image": pictures, "label": [0, 1, 2, 0, 1, 2]}, features=features)
    table.save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": table, "test": table.select([0, 1])}).save_to_disk(str(tmp_path / "hfd"))

    data = open_dataset(str(tmp_path / "hf"))
    assert len(data) == 6 and data.num_classes == 3 and data.resolution == (16, 16)
    images, labels = data.get_batch(torch.arange(6))
    expected = open_dataset(str(folder)).get_batch(torch.arange(6))[0]
    assert torch.equal(images, expected) and labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert len(open_dataset(str(tmp_path / "hfd"))) == 6  # a DatasetDict's train split by default
    assert len(open_dataset(f"{tmp_path / 'hfd'}:test")) == 2
    workers = iter(InfiniteBatches(data, 3, seed=1, num_workers=1))  # pickles into a worker
    assert next(workers)[0].shape == (3, 3, 16, 16)

    out = tmp_path / "runs"
    result = run("train", "--data", tmp_path / "hf", "--outdir", out, "--preset", "tiny", "--device", "cpu",
                 "--duration", "0.02", "--workers", "0", "--steps", "2", "--cond")
    assert result.exit_code == 0, result.output
    one_error_line(run("train", "--data", f"{tmp_path / 'hfd'}:valid", "--outdir", out, "--preset", "tiny",
                       "--device", "cpu"), "pick one with --data")
    datasets.Dataset.from_dict({"text": ["x", "y"]}).save_to_disk(str(tmp_path / "text"))
    one_error_line(run("train", "--data", tmp_path / "text", "--outdir", out, "--preset", "tiny",
                       "--device", "cpu"), "has no image column")
