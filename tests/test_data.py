"""Tests for datasets (folder, zip, IDX, conversions, fits, errors) and the batch loader."""

from __future__ import annotations

import gzip
import io
import json
import re
import struct
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from patch_diffusion.data import InfiniteBatches, batch_index_stream, datasets, open_dataset
from patch_diffusion.errors import UserError


def _save(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(arr.astype(np.uint8), mode).save(path)


def _gray(value: int, h: int = 4, w: int = 4) -> np.ndarray:
    return np.full((h, w), value, np.uint8)


def _write_idx(path: Path, arr: np.ndarray, truncate: int = 0) -> None:
    data = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(data[:len(data) - truncate])


# --- folders and zips -------------------------------------------------------------------

def test_folder_recursive_suffixes_sorted(tmp_path: Path) -> None:
    _save(tmp_path / "b.png", _gray(20))
    _save(tmp_path / "a" / "z.PNG", _gray(10))
    _save(tmp_path / "a" / "deep" / "c.jpg", _gray(128))
    PIL.Image.fromarray(_gray(200)).save(tmp_path / "d.webp", lossless=True)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = open_dataset(str(tmp_path))
    assert len(ds) == 4 and ds.channels == 1 and ds.resolution == (4, 4) and ds.num_classes == 0
    # Sorted by relative path: a/deep/c.jpg, a/z.PNG, b.png, d.webp.
    values = [int(ds[i][0][0, 0, 0]) for i in range(4)]
    assert values[1:] == [10, 20, 200] and abs(values[0] - 128) <= 2  # JPEG is lossy
    assert ds[0][1] == -1 and ds.in_memory
    images, labels = ds.get_batch(torch.tensor([2, 1]))
    assert images.shape == (2, 1, 4, 4) and images.dtype == torch.uint8
    assert images[:, 0, 0, 0].tolist() == [20, 10] and labels.tolist() == [-1, -1]
    assert len(open_dataset(str(tmp_path), max_images=2)) == 2


def test_color_conversions_exact(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)      # fully transparent red -> white
    rgba[0, 1] = (255, 0, 0, 128)    # half transparent red -> pink
    rgba[1, 0] = (0, 0, 255, 255)    # opaque blue stays blue
    rgba[1, 1] = (10, 20, 30, 255)
    _save(tmp_path / "rgba" / "x.png", rgba, "RGBA")
    img = open_dataset(str(tmp_path / "rgba"))[0][0]
    assert img.shape == (3, 2, 2)
    assert img[:, 0, 0].tolist() == [255, 255, 255]
    assert img[:, 0, 1].tolist() == [255, 127, 127]
    assert img[:, 1, 0].tolist() == [0, 0, 255]
    # RGB -> 1 channel uses PIL's 'L' (ITU-R 601-2) after compositing over white.
    gray = open_dataset(str(tmp_path / "rgba"), channels=1)[0][0]
    expected = PIL.Image.fromarray(img.permute(1, 2, 0).numpy()).convert("L")
    assert gray.shape == (1, 2, 2) and gray[0].numpy().tolist() == np.asarray(expected).tolist()

    la = np.array([[[100, 0], [100, 255]]], np.uint8)  # transparent gray -> white; opaque stays
    _save(tmp_path / "la" / "x.png", la, "LA")
    ds = open_dataset(str(tmp_path / "la"))
    assert ds.channels == 1 and ds[0][0][0].tolist() == [[255, 100]]

    _save(tmp_path / "gray" / "x.png", np.array([[7, 250]], np.uint8))
    rgb = open_dataset(str(tmp_path / "gray"), channels=3)[0][0]
    assert rgb.shape == (3, 1, 2) and rgb[:, 0, 0].tolist() == [7, 7, 7] and rgb[:, 0, 1].tolist() == [250] * 3

    pal = PIL.Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    pal.putpixel((1, 0), 1)
    (tmp_path / "pal").mkdir()
    pal.save(tmp_path / "pal" / "x.png")
    ds = open_dataset(str(tmp_path / "pal"))
    assert ds.channels == 3 and ds[0][0][:, 0, 1].tolist() == [12, 34, 56] and ds[0][0][:, 0, 0].tolist() == [0, 0, 0]
    pal.info["transparency"] = 0  # palette index 0 transparent -> composited to white
    pal.save(tmp_path / "pal" / "x.png", transparency=0)
    assert open_dataset(str(tmp_path / "pal"))[0][0][:, 0, 0].tolist() == [255, 255, 255]


def test_labels_from_subfolders_and_json(tmp_path: Path) -> None:
    for cls, v in [("dog", 1), ("cat", 2), ("cat", 3), ("emu", 4)]:
        _save(tmp_path / "sub" / cls / f"{v}.png", _gray(v))
    ds = open_dataset(str(tmp_path / "sub"))
    assert ds.num_classes == 3
    assert [(int(ds[i][0][0, 0, 0]), ds[i][1]) for i in range(4)] == [(2, 0), (3, 0), (1, 1), (4, 2)]
    # max_images keeps class ids stable (computed from all images).
    assert open_dataset(str(tmp_path / "sub"), max_images=3).num_classes == 3

    for v in (5, 6):
        _save(tmp_path / "js" / "img" / f"{v}.png", _gray(v))
    meta = {"labels": [["img/5.png", 7], ["img/6.png", 2]]}
    (tmp_path / "js" / "dataset.json").write_text(json.dumps(meta))
    ds = open_dataset(str(tmp_path / "js"))
    assert ds.num_classes == 8 and [ds[0][1], ds[1][1]] == [7, 2]
    assert ds.get_batch(torch.tensor([1, 0]))[1].tolist() == [2, 7]

    (tmp_path / "js" / "dataset.json").write_text(json.dumps({"labels": [["img/5.png", 1]]}))
    with pytest.raises(UserError, match="no label for 'img/6.png'"):
        open_dataset(str(tmp_path / "js"))


def test_zip_matches_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for cls in ("a", "b"):
        for k in range(3):
            _save(root / cls / f"{k}.png", rng.integers(0, 256, (5, 6, 3)))
    for arcroot in ("", "data/"):  # a plain zip, and a zip of the folder itself
        zpath = tmp_path / f"data{len(arcroot)}.zip"
        with zipfile.ZipFile(zpath, "w") as zf:
            for p in sorted(root.rglob("*.png"), reverse=True):
                zf.write(p, arcroot + p.relative_to(root).as_posix())
        folder, zipped = open_dataset(str(root)), open_dataset(str(zpath))
        assert len(zipped) == 6 and zipped.resolution == (5, 6) and zipped.num_classes == 2
        idx = torch.arange(6)
        assert torch.equal(folder.get_batch(idx)[0], zipped.get_batch(idx)[0])
        assert torch.equal(folder.get_batch(idx)[1], zipped.get_batch(idx)[1])


@pytest.mark.parametrize("meta", [{"labels": None}, {}], ids=["null", "missing"])
def test_dataset_json_without_labels_means_unlabelled(tmp_path: Path, meta: dict) -> None:
    root = tmp_path / "set"
    for k, cls in enumerate(("a", "b")):
        _save(root / cls / f"{k}.png", _gray(k))
    (root / "dataset.json").write_text(json.dumps(meta))
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as zf:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                zf.write(p, "set/" + p.relative_to(root).as_posix())
    for spec in (root, tmp_path / "set.zip"):  # subfolders a/b must not become classes
        ds = open_dataset(str(spec))
        assert len(ds) == 2 and ds.num_classes == 0 and [ds[0][1], ds[1][1]] == [-1, -1]


def test_macos_and_hidden_files_are_ignored(tmp_path: Path) -> None:
    _save(tmp_path / "0.png", _gray(10))
    _save(tmp_path / "1.png", _gray(20))
    junk = b"\x00\x05\x16\x07 AppleDouble, not an image"
    entries = {"set/a/img0.png": (tmp_path / "0.png").read_bytes(), "set/b/img1.png": (tmp_path / "1.png").read_bytes(),
               "__MACOSX/set/a/._img0.png": junk, "set/.DS_Store": junk, "set/a/.hidden.png": junk}
    with zipfile.ZipFile(tmp_path / "mac.zip", "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    ds = open_dataset(str(tmp_path / "mac.zip"))
    assert len(ds) == 2 and ds.num_classes == 2
    assert [(int(ds[i][0][0, 0, 0]), ds[i][1]) for i in range(2)] == [(10, 0), (20, 1)]
    # dataset.json is still found under the common top folder.
    meta = {"labels": [["a/img0.png", 5], ["b/img1.png", 3]]}
    entries.update({"set/dataset.json": json.dumps(meta).encode(), "__MACOSX/set/._dataset.json": junk})
    with zipfile.ZipFile(tmp_path / "mac2.zip", "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    ds = open_dataset(str(tmp_path / "mac2.zip"))
    assert ds.num_classes == 6 and [ds[0][1], ds[1][1]] == [5, 3]

    root = tmp_path / ".parent" / "folder"  # a hidden folder above the dataset root is fine
    _save(root / "img.png", _gray(30))
    _save(root / ".hidden" / "x.png", _gray(40, 2, 2))
    (root / "._y.png").write_bytes(junk)
    ds = open_dataset(str(root))
    assert len(ds) == 1 and int(ds[0][0][0, 0, 0]) == 30


def test_lazy_dataset_matches_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in range(3):
        _save(tmp_path / f"{k}.png", _gray(k * 40, 3, 5))
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as zf:
        for k in range(3):
            zf.write(tmp_path / f"{k}.png", f"{k}.png")
    eager = open_dataset(str(tmp_path), resolution=(6, 6), fit="pad")
    monkeypatch.setattr(datasets, "MAX_IN_MEMORY_BYTES", 0)
    for spec in (str(tmp_path), str(tmp_path / "d.zip")):
        lazy = open_dataset(spec, resolution=(6, 6), fit="pad")
        assert not lazy.in_memory
        assert torch.equal(lazy.get_batch(torch.arange(3))[0], eager.get_batch(torch.arange(3))[0])


# --- fits ---------------------------------------------------------------------------------

def test_pad_fit_exact_border(tmp_path: Path) -> None:
    _save(tmp_path / "x.png", _gray(255, 2, 3))
    img = open_dataset(str(tmp_path), resolution=(5, 6), fit="pad")[0][0][0]
    expected = np.zeros((5, 6), np.uint8)
    expected[1:3, 1:4] = 255  # top 1 / bottom 2, left 1 / right 2
    assert img.numpy().tolist() == expected.tolist()
    with pytest.raises(UserError, match="larger than --resolution"):
        open_dataset(str(tmp_path), resolution=(1, 6), fit="pad")


def test_resize_and_center_crop_sizes(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", _gray(50, 8, 8))
    wide = np.zeros((4, 12), np.uint8)
    wide[:, 4:8] = 200  # the centered square of the wide image is all 200
    _save(tmp_path / "b.png", wide)
    with pytest.raises(UserError, match=r"different sizes \(8x8 and 4x12.*--fit resize"):
        open_dataset(str(tmp_path))
    with pytest.raises(UserError, match="pass --fit"):
        open_dataset(str(tmp_path), resolution=(8, 8))
    resized = open_dataset(str(tmp_path), resolution=(4, 6), fit="resize")
    assert resized.resolution == (4, 6) and resized.get_batch(torch.arange(2))[0].shape == (2, 1, 4, 6)
    cropped = open_dataset(str(tmp_path), resolution=(2, 2), fit="center-crop")
    batch = cropped.get_batch(torch.arange(2))[0]
    assert batch.shape == (2, 1, 2, 2)
    assert batch[0].unique().tolist() == [50] and batch[1].unique().tolist() == [200]


# --- IDX ----------------------------------------------------------------------------------

def _idx_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int = 5, truncate: int = 0) -> np.ndarray:
    folder = tmp_path / "env" / "mnist"
    folder.mkdir(parents=True)
    images = np.arange(n * 28 * 28, dtype=np.int64).reshape(n, 28, 28) % 251
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", images, truncate)
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.setenv("PATCH_DIFFUSION_DATA", str(tmp_path / "env"))
    return images


def test_idx_parsing_and_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = _idx_env(tmp_path, monkeypatch)
    ds = open_dataset("mnist:test", cache_dir=tmp_path / "cache")
    assert len(ds) == 5 and ds.num_classes == 10 and ds.channels == 1 and ds.resolution == (28, 28)
    assert ds.in_memory and ds[3][1] == 3
    batch, labels = ds.get_batch(torch.tensor([4, 1]))
    assert batch[:, 0].numpy().tolist() == images[[4, 1]].tolist() and labels.tolist() == [4, 1]
    padded = open_dataset("MNIST:test", resolution=(32, 32), fit="pad", channels=3, max_images=2)
    assert len(padded) == 2 and padded.get_batch(torch.arange(2))[0].shape == (2, 3, 32, 32)
    img = padded[1][0]
    assert img[:, 2:30, 2:30].numpy().tolist() == [images[1].tolist()] * 3
    assert img[:, :2].sum() == 0 and img[:, 30:].sum() == 0 and img[:, :, :2].sum() == 0 and img[:, :, 30:].sum() == 0
    assert open_dataset("mnist:test", resolution=(14, 20), fit="center-crop").resolution == (14, 20)
    assert open_dataset("mnist:test", resolution=(16, 16), fit="resize")[0][0].shape == (1, 16, 16)


def test_idx_truncated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _idx_env(tmp_path, monkeypatch, truncate=10)
    with pytest.raises(UserError, match="truncated"):
        open_dataset("mnist:test", cache_dir=tmp_path / "cache")


def test_idx_download_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if Path("/usr/share/datasets/mnist").exists():
        pytest.skip("system mnist present")
    monkeypatch.setenv("PATCH_DIFFUSION_DATA", str(tmp_path / "empty"))

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match="apt-get install dataset-mnist") as info:
        open_dataset("mnist", cache_dir=tmp_path / "cache")
    assert "\n" not in str(info.value) and not list((tmp_path / "cache").rglob("*.gz"))


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists(), reason="no system fashion-mnist")
def test_system_fashion_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PATCH_DIFFUSION_DATA", raising=False)
    ds = open_dataset("fashion-mnist:test", cache_dir=tmp_path)
    assert len(ds) == 10000 and ds.num_classes == 10 and ds[0][0].shape == (1, 28, 28)
    padded = open_dataset("fashion-mnist:test", resolution=(32, 32), fit="pad", cache_dir=tmp_path)
    batch = padded.get_batch(torch.arange(100))[0]
    assert batch.shape == (100, 1, 32, 32) and batch[0].shape == (1, 32, 32)
    inner = torch.zeros(32, 32, dtype=torch.bool)
    inner[2:30, 2:30] = True
    assert batch[..., ~inner].sum() == 0 and batch[..., inner].sum() > 0


# --- bad input ----------------------------------------------------------------------------

def test_user_errors(tmp_path: Path) -> None:
    def fails(match: str, spec: str, **kwargs: object) -> None:
        with pytest.raises(UserError, match=match) as info:
            open_dataset(spec, **kwargs)
        assert "\n" not in str(info.value)

    fails("no such folder, zip or built-in dataset.*fashion-mnist:test", str(tmp_path / "missing"))
    fails("built-in names", "cifar-10")
    fails("built-in names", "mnist:valid")
    (tmp_path / "empty").mkdir()
    fails("no images found in .*put PNG/JPEG/WebP", str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"this is not a png at all")
    fails(r"cannot read image '.*x\.png'.*remove or replace", str(tmp_path / "bad"))
    buf = tmp_path / "full.png"
    _save(buf, np.random.default_rng(0).integers(0, 256, (32, 32, 3)))
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "t.png").write_bytes(buf.read_bytes()[:200])
    fails(r"cannot read image '.*t\.png'.*truncated", str(tmp_path / "trunc"))
    fails("needs a target size; pass --resolution", str(tmp_path / "trunc"), fit="resize")
    fails("unknown --fit", str(tmp_path / "trunc"), fit="stretch", resolution=(4, 4))
    fails("bad channels", str(tmp_path / "trunc"), channels=2)
    (tmp_path / "notzip.txt").write_text("hello")
    fails("neither a folder nor a zip", str(tmp_path / "notzip.txt"))


# --- loader -------------------------------------------------------------------------------

def _tiny_folder(root: Path, n: int) -> None:
    for k in range(n):
        _save(root / f"{k:02d}.png", _gray(k, 2, 2))


def test_stream_epochs_and_resume(tmp_path: Path) -> None:
    n, b = 7, 3
    stream = batch_index_stream(n, b, seed=5)
    flat = torch.cat([next(stream) for _ in range(14)])  # 42 samples = 6 epochs exactly
    for e in range(6):
        assert sorted(flat[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(flat[:n], flat[n:2 * n])  # epochs are reshuffled
    assert not torch.equal(flat[:n], torch.cat([next(batch_index_stream(n, n, seed=6))]))
    unshuffled = batch_index_stream(n, b, seed=5, shuffle=False)
    assert torch.cat([next(unshuffled) for _ in range(3)]).tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1]

    _tiny_folder(tmp_path, n)
    ds = open_dataset(str(tmp_path))
    full = iter(InfiniteBatches(ds, b, seed=5))
    batches = [next(full) for _ in range(10)]
    assert all(x.shape == (b, 1, 2, 2) and y.dtype == torch.int64 for x, y in batches)
    assert torch.cat([x[:, 0, 0, 0] for x, _ in batches]).tolist() == flat[:30].tolist()
    resumed = iter(InfiniteBatches(ds, b, seed=5, start_batch=4))
    for k in range(4, 10):
        assert torch.equal(next(resumed)[0], batches[k][0])
    # Batch size larger than the dataset still gives exact-size batches.
    big = next(iter(InfiniteBatches(ds, 10, seed=0)))[0]
    assert big.shape[0] == 10


def test_workers_match_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tiny_folder(tmp_path / "imgs", 5)
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as zf:
        for p in sorted((tmp_path / "imgs").iterdir()):
            zf.write(p, p.name)
    monkeypatch.setattr(datasets, "MAX_IN_MEMORY_BYTES", 0)  # force lazy decoding in the workers
    ds = open_dataset(str(tmp_path / "d.zip"))
    assert not ds.in_memory
    ref = iter(InfiniteBatches(ds, 4, seed=3, start_batch=2))
    expected = [next(ref) for _ in range(6)]
    loader = InfiniteBatches(ds, 4, seed=3, start_batch=2, num_workers=2)
    for _ in range(2):  # a second iter() restarts at start_batch on the persistent workers
        it = iter(loader)
        for x, y in expected:
            got_x, got_y = next(it)
            assert torch.equal(got_x, x) and torch.equal(got_y, y)
        del it


def test_worker_errors_are_one_line_user_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tiny_folder(tmp_path, 4)
    monkeypatch.setattr(datasets, "MAX_IN_MEMORY_BYTES", 0)  # decode lazily, in the workers
    ds = open_dataset(str(tmp_path))
    assert not ds.in_memory
    (tmp_path / "02.png").write_bytes(b"garbage, not a png")  # corrupted after the header check at open time
    messages = []
    for workers in (0, 1):
        loader = InfiniteBatches(ds, 4, num_workers=workers, pin_memory=True)  # pinning only acts with CUDA
        with pytest.raises(UserError) as info:
            next(iter(loader))
        messages.append(str(info.value))
        del loader
    assert re.fullmatch(r"cannot read image '.*02\.png' \(.*\); remove or replace it", messages[1])
    assert "\n" not in messages[1] and messages[0] == messages[1]


def test_idx_download_is_parsed_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if Path("/usr/share/datasets/mnist").exists():
        pytest.skip("system mnist present")
    monkeypatch.setenv("PATCH_DIFFUSION_DATA", str(tmp_path / "empty"))
    served = {}
    for stem, arr in [("t10k-images-idx3-ubyte", np.full((2, 28, 28), 9)), ("t10k-labels-idx1-ubyte", np.array([3, 4]))]:
        _write_idx(tmp_path / "x.gz", arr)
        served[stem + ".gz"] = (tmp_path / "x.gz").read_bytes()
    urls = []

    class Response(io.BytesIO):
        headers: dict[str, str] = {}

    def fake_urlopen(url: str, timeout: float = 0) -> Response:
        urls.append(url)
        return Response(served[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    ds = open_dataset("mnist:test", cache_dir=tmp_path / "cache")
    assert len(ds) == 2 and ds.get_batch(torch.arange(2))[1].tolist() == [3, 4] and ds[0][0].max() == 9
    assert len(urls) == 2 and all(u.startswith("https://ossci-datasets.s3.amazonaws.com/mnist/") for u in urls)
    assert sorted(p.name for p in (tmp_path / "cache" / "mnist").iterdir()) == sorted(served)
    open_dataset("mnist:test", cache_dir=tmp_path / "cache")  # now served from the cache
    assert len(urls) == 2


def test_dataset_on_a_device_gives_the_same_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from patch_diffusion.config import DataConfig, TrainConfig
    from patch_diffusion.train import data_on_device

    _tiny_folder(tmp_path / "imgs", 5)
    ds = open_dataset(str(tmp_path / "imgs"))
    assert ds.in_memory and ds.nbytes == 5 * ds.channels * ds.resolution[0] * ds.resolution[1]
    target = "cuda" if torch.cuda.is_available() else "cpu"
    moved = ds.to(target)
    ref, got = iter(InfiniteBatches(ds, 3, seed=1)), iter(InfiniteBatches(moved, 3, seed=1, pin_memory=True))
    for _ in range(4):  # same order and pixels, across an epoch boundary
        (x, y), (gx, gy) = next(ref), next(got)
        assert gx.device.type == target and torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y)
    monkeypatch.setattr(datasets, "MAX_IN_MEMORY_BYTES", 0)
    with pytest.raises(ValueError, match="in-memory"):
        open_dataset(str(tmp_path / "imgs")).to(target)

    # the rule for training: CUDA only, in-memory only, when allowed and under a quarter of free memory
    moves = []
    monkeypatch.setattr(datasets.ImageDataset, "to", lambda self, device: moves.append(device) or self)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * ds.nbytes, 8 * ds.nbytes))
    config = TrainConfig()
    data_on_device(ds, config, torch.device("cpu"))
    data_on_device(ds, TrainConfig(data=DataConfig(on_device=False)), torch.device("cuda"))
    assert moves == []
    data_on_device(ds, config, torch.device("cuda"))
    assert moves == [torch.device("cuda")]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * ds.nbytes - 1, 8 * ds.nbytes))
    data_on_device(ds, config, torch.device("cuda"))
    assert len(moves) == 1


def test_a_process_exits_while_its_persistent_workers_are_alive(tiny_data):
    """Workers that ignore a group's SIGTERM must still end when their own process exits."""
    code = ("import sys; from patch_diffusion.data import open_dataset, InfiniteBatches; "
            f"it = iter(InfiniteBatches(open_dataset({str(tiny_data)!r}), 4, num_workers=1)); next(it); "
            "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# --- seeded subsets -----------------------------------------------------------------------

def test_subset_seed_draws_across_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "classes"
    for c in range(4):
        for k in range(10):
            _save(root / f"c{c}" / f"{k}.png", _gray(10 * c + k, 2, 2))  # value = 10 * class + k

    def pick(**kwargs: object) -> tuple[list[int], list[int]]:
        ds = open_dataset(str(root), max_images=8, **kwargs)
        images, labels = ds.get_batch(torch.arange(len(ds)))
        return images[:, 0, 0, 0].tolist(), labels.tolist()

    values, labels = pick()  # no seed: the first 8 in sorted order, as before
    assert values == list(range(8)) and labels == [0] * 8
    values, labels = pick(subset_seed=0)
    expected = np.sort(np.random.default_rng(0).choice(40, 8, replace=False))
    assert values == expected.tolist() and values == sorted(values)
    assert labels == [v // 10 for v in values] and len(set(labels)) > 2
    assert pick(subset_seed=0) == (values, labels)
    assert pick(subset_seed=1)[0] != values
    assert open_dataset(str(root), max_images=40, subset_seed=3).get_batch(torch.arange(40))[0][:, 0, 0, 0].tolist() \
        == list(range(40))

    # Only the chosen files are read: a broken file outside the subset does no harm.
    unchosen = next(v for v in range(40) if v not in values)
    (root / f"c{unchosen // 10}" / f"{unchosen % 10}.png").write_bytes(b"not a png")
    assert pick(subset_seed=0) == (values, labels)
    monkeypatch.setattr(datasets, "MAX_IN_MEMORY_BYTES", 0)  # the lazy path picks the same files
    assert pick(subset_seed=0) == (values, labels)


def test_subset_seed_idx_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = _idx_env(tmp_path, monkeypatch, n=20)
    ds = open_dataset("mnist:test", cache_dir=tmp_path / "cache", max_images=5, subset_seed=7)
    keep = np.sort(np.random.default_rng(7).choice(20, 5, replace=False))
    batch, labels = ds.get_batch(torch.arange(5))
    assert batch[:, 0].numpy().tolist() == images[keep].tolist() and labels.tolist() == (keep % 10).tolist()
    first = open_dataset("mnist:test", cache_dir=tmp_path / "cache", max_images=5)
    assert first.get_batch(torch.arange(5))[1].tolist() == [0, 1, 2, 3, 4]
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(UserError, match="bad subset_seed"):
            open_dataset("mnist:test", cache_dir=tmp_path / "cache", max_images=5, subset_seed=bad)
