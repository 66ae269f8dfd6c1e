"""Tests for the built-in emoji set, on small synthetic npm-style tarballs (never the real one)."""

from __future__ import annotations

import io
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from patch_diffusion.data import datasets, open_dataset
from patch_diffusion.errors import UserError

TGZ = "emoji-datasource-google-16.0.0.tgz"
NPY = "emoji-datasource-google-16.0.0-64.npy"


def _png(arr: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(arr, mode).save(buf, "PNG")
    return buf.getvalue()


def _emoji(k: int) -> np.ndarray:
    """A 64x64 RGBA image: transparent background, a half-transparent red pixel at (0, 1)
    and an opaque marker (k, k, k) at (1, 1) that identifies it."""
    arr = np.zeros((64, 64, 4), np.uint8)
    arr[..., :3] = (0, 200, 0)  # hidden under alpha 0, so it must not show
    arr[0, 1] = (255, 0, 0, 128)
    arr[1, 1] = (k, k, k, 255)
    return arr


def _write_tgz(path: Path, count: int = 5, marker: int = 0) -> Path:
    """An npm-style tarball: ``count`` PNGs in package/img/google/64/, added in reverse name
    order, plus members that must be ignored."""
    path.parent.mkdir(parents=True, exist_ok=True)
    members = {f"package/img/google/64/{k:04x}.png": _png(_emoji(marker + 10 * k), "RGBA") for k in range(count)}
    members = dict(reversed(list(members.items())))
    members.update({
        "package/package.json": b'{"name": "emoji-datasource-google"}',
        "package/img/google/32/x.png": _png(np.zeros((32, 32, 4), np.uint8), "RGBA"),
        "package/img/google/64/sub/y.png": _png(np.zeros((64, 64, 4), np.uint8), "RGBA"),
        "package/img/google/64/._0000.png": b"\x00\x05\x16\x07 AppleDouble, not an image",
        "package/img/google/sheets/64.png": _png(np.zeros((8, 8, 4), np.uint8), "RGBA"),
    })
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$PATCH_DIFFUSION_DATA/emoji holding a 5-image tarball; returns that folder."""
    monkeypatch.setenv("PATCH_DIFFUSION_DATA", str(tmp_path / "env"))
    _write_tgz(tmp_path / "env" / "emoji" / TGZ)
    return tmp_path / "env" / "emoji"


def test_emoji_from_tarball(env: Path, tmp_path: Path) -> None:
    ds = open_dataset("emoji", cache_dir=tmp_path / "cache")
    assert len(ds) == 5 and ds.name == "emoji" and ds.num_classes == 0 and ds.in_memory
    assert ds.channels == 3 and ds.resolution == (64, 64)
    images, labels = ds.get_batch(torch.arange(5))
    assert images.shape == (5, 3, 64, 64) and images.dtype == torch.uint8 and labels.tolist() == [-1] * 5
    # Alpha over white: transparent -> white (not the hidden green), half red -> pink.
    assert images[0, :, 0, 0].tolist() == [255, 255, 255]
    assert images[0, :, 0, 1].tolist() == [255, 127, 127]
    # Sorted by member name although the tarball lists them in reverse.
    assert images[:, 0, 1, 1].tolist() == [0, 10, 20, 30, 40]
    assert open_dataset("emoji:train", cache_dir=tmp_path / "cache").get_batch(torch.arange(5))[0].equal(images)
    assert not (tmp_path / "cache").exists()  # found in $PATCH_DIFFUSION_DATA, nothing downloaded


def test_emoji_cache_is_written_and_used(env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = open_dataset("emoji", cache_dir=tmp_path / "cache").get_batch(torch.arange(5))[0]
    cached = np.load(env / NPY, allow_pickle=False)
    assert cached.shape == (5, 3, 64, 64) and cached.dtype == np.uint8 and np.array_equal(cached, first.numpy())
    assert [p.name for p in env.iterdir() if ".part" in p.name] == []  # no temp files left behind

    def no_decoding(path: Path) -> np.ndarray:
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(datasets, "_decode_emoji", no_decoding)
    (env / TGZ).write_bytes(b"corrupt")
    assert open_dataset("emoji", cache_dir=tmp_path / "cache").get_batch(torch.arange(5))[0].equal(first)
    monkeypatch.undo()

    # A cache of the wrong shape, or garbage, is ignored: decode again and rewrite it.
    monkeypatch.setenv("PATCH_DIFFUSION_DATA", str(tmp_path / "env"))
    _write_tgz(env / TGZ, count=3, marker=1)
    for bad in (lambda p: np.save(p, np.zeros((3, 3, 32, 32), np.uint8)), lambda p: p.write_bytes(b"not npy")):
        bad(env / NPY)
        again = open_dataset("emoji", cache_dir=tmp_path / "cache").get_batch(torch.arange(3))[0]
        assert again[:, 0, 1, 1].tolist() == [1, 11, 21]
        assert np.load(env / NPY, allow_pickle=False).shape == (3, 3, 64, 64)


def test_emoji_options(env: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    full = open_dataset("emoji", cache_dir=cache).get_batch(torch.arange(5))[0]
    assert open_dataset("emoji", cache_dir=cache, max_images=2).get_batch(torch.arange(2))[0].equal(full[:2])
    assert len(open_dataset("emoji", cache_dir=cache, max_images=50)) == 5
    seeded = open_dataset("emoji", cache_dir=cache, max_images=3, subset_seed=4)
    keep = np.sort(np.random.default_rng(4).choice(5, 3, replace=False))
    assert seeded.get_batch(torch.arange(3))[0].equal(full[keep])

    small = open_dataset("emoji", cache_dir=cache, resolution=(32, 32), fit="resize")
    assert small.resolution == (32, 32) and small.get_batch(torch.arange(5))[0].shape == (5, 3, 32, 32)
    expected = PIL.Image.fromarray(full[2].permute(1, 2, 0).numpy()).resize((32, 32), PIL.Image.Resampling.LANCZOS)
    assert np.array_equal(small[2][0].permute(1, 2, 0).numpy(), np.asarray(expected))

    gray = open_dataset("emoji", cache_dir=cache, channels=1)  # PIL 'L' luma of the composited RGB
    assert gray.channels == 1 and gray[3][0].shape == (1, 64, 64)
    assert np.array_equal(gray[3][0][0].numpy(), np.asarray(PIL.Image.fromarray(full[3].permute(1, 2, 0).numpy()).convert("L")))
    assert open_dataset("emoji", cache_dir=cache, resolution=(72, 80), fit="pad")[0][0].shape == (3, 72, 80)
    with pytest.raises(UserError, match="64x64, not 32x32; pass --fit"):
        open_dataset("emoji", cache_dir=cache, resolution=(32, 32))


def test_emoji_search_order_and_default_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PATCH_DIFFUSION_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    _write_tgz(tmp_path / "xdg" / "patch-diffusion" / "emoji" / TGZ, count=2, marker=2)
    assert open_dataset("emoji")[1][0][:, 1, 1].tolist() == [12] * 3  # default_cache_dir()/emoji
    monkeypatch.setenv("PATCH_DIFFUSION_DATA", str(tmp_path / "env"))
    _write_tgz(tmp_path / "env" / "emoji" / TGZ, count=2, marker=3)
    assert open_dataset("emoji")[1][0][:, 1, 1].tolist() == [13] * 3  # $PATCH_DIFFUSION_DATA first


def test_emoji_missing_and_download_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCH_DIFFUSION_DATA", str(tmp_path / "empty"))

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as info:
        open_dataset("emoji", cache_dir=cache)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"emoji not found in {tmp_path / 'empty' / 'emoji'}, {cache / 'emoji'}")
    assert "no network" in msg and "make data" in msg and "npm pack emoji-datasource-google@16.0.0" in msg
    assert msg.endswith(f"put the .tgz in {cache / 'emoji'}")
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_emoji_download_is_checked_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCH_DIFFUSION_DATA", str(tmp_path / "empty"))
    served = _write_tgz(tmp_path / "served" / TGZ, count=4).read_bytes()
    urls = []

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(served))}

    def fake_urlopen(url: str, timeout: float = 0) -> Response:
        urls.append(url)
        return Response(served)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    cache = tmp_path / "cache"
    # The real package has 3,786 PNGs; a download with another count is rejected and not kept.
    with pytest.raises(UserError, match="has 4 PNGs under package/img/google/64/, expected 3786"):
        open_dataset("emoji", cache_dir=cache)
    assert not [p for p in cache.rglob("*") if p.is_file()]

    monkeypatch.setattr(datasets, "_EMOJI_COUNT", 4)
    assert len(open_dataset("emoji", cache_dir=cache)) == 4
    assert urls == ["https://registry.npmjs.org/emoji-datasource-google/-/" + TGZ] * 2
    assert sorted(p.name for p in (cache / "emoji").iterdir()) == [NPY, TGZ]
    assert open_dataset("emoji", cache_dir=cache)[3][0][:, 1, 1].tolist() == [30] * 3 and len(urls) == 2


def test_emoji_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(match: str, spec: str) -> None:
        with pytest.raises(UserError, match=match) as info:
            open_dataset(spec, cache_dir=tmp_path / "cache")
        assert "\n" not in str(info.value)

    fails("emoji has no test split; use 'emoji'", "emoji:test")
    fails("built-in names: .*mnist:test, emoji", "emoji:valid")
    fails("built-in names: .*, emoji", "emojis")
    monkeypatch.setenv("PATCH_DIFFUSION_DATA", str(tmp_path / "env"))
    tgz = tmp_path / "env" / "emoji" / TGZ
    tgz.parent.mkdir(parents=True)
    tgz.write_bytes(b"truncated")
    fails(r"cannot read '.*\.tgz' .*delete it so it is downloaded again", "emoji")
    with tarfile.open(tgz, "w:gz") as tf:  # a tarball without the 64px folder
        info = tarfile.TarInfo("package/package.json")
        tf.addfile(info, io.BytesIO(b""))
    fails("has 0 PNGs under package/img/google/64/", "emoji")
