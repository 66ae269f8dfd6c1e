"""Image datasets: folders, zip files and the built-in sets.

Built-in names: ``fashion-mnist`` and ``mnist`` (28x28 gray, 10 classes; ``:test`` for
the test split), read from MNIST-style IDX files, and ``emoji`` (3,786 Google emoji,
64x64 RGB, unlabelled, no test split), read from the npm tarball of
emoji-datasource-google@16.0.0. Each is looked for in ``$PATCH_DIFFUSION_DATA/<name>/``,
then ``default_cache_dir()/<name>/`` (the IDX sets also in ``/usr/share/datasets``), and
downloaded into the latter when missing.

Every dataset yields uint8 tensors ``[C, H, W]`` with C in {1, 3} plus an int label
(-1 when the source has no labels).

Folders and zips: images are the .png/.jpg/.jpeg/.webp files at any depth. Hidden
files and folders (names starting with '.', including macOS '._*' AppleDouble files)
and '__MACOSX' folders are ignored, also when finding a zip's common top folder.
Labels come from a ``dataset.json`` at the root (EDM format,
``{"labels": [["path", int], ...]}``); one with ``"labels": null`` (or no "labels")
marks the set unlabelled. Without a dataset.json, first-level subfolders are the
classes when every image sits in one and there are at least two.

Color rules, applied per image before any resizing:
  * palette ('P') images are expanded to RGB, or RGBA if they carry transparency;
  * alpha (RGBA, LA) is composited over white rather than dropped, so transparent
    pixels become white instead of whatever color happens to hide beneath them;
  * 16-bit grayscale keeps its top 8 bits; other modes (CMYK, YCbCr, ...) go to RGB;
  * grayscale -> 3 channels repeats the gray value; RGB -> 1 channel uses PIL's 'L'
    conversion (ITU-R 601-2 luma).
The channel count is ``channels`` if given, else 1 when the first image is
grayscale ('1', 'L', 'LA', 'I', ...) and 3 otherwise.

Size rules (``fit``): "none" keeps the images' own (shared) size; "resize" scales to
the resolution with Lanczos; "center-crop" cuts the largest centered region with the
target aspect ratio, then resizes; "pad" adds black (0) borders symmetrically.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from tqdm import tqdm

from patch_diffusion.devices import to_device
from patch_diffusion.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
FITS = ("none", "resize", "center-crop", "pad")
# Folder/zip sets whose decoded size stays under this are decoded once at open time.
MAX_IN_MEMORY_BYTES = 1 << 30

_IDX_URLS = {
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
}
_IDX_SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# emoji: the 64x64 PNGs of Google's emoji in the npm package emoji-datasource-google.
_EMOJI_SPEC = "emoji-datasource-google@16.0.0"
_EMOJI_TGZ = "emoji-datasource-google-16.0.0.tgz"
_EMOJI_URL = "https://registry.npmjs.org/emoji-datasource-google/-/" + _EMOJI_TGZ
_EMOJI_PREFIX = "package/img/google/64/"  # npm tarballs keep everything under package/
_EMOJI_COUNT = 3786  # PNGs in that folder of version 16.0.0; checked after a download
_EMOJI_SHAPE = (3, 64, 64)
_EMOJI_NPY = "emoji-datasource-google-16.0.0-64.npy"  # decoded uint8 [N, 3, 64, 64], beside the .tgz
_BUILTIN_NAMES = ", ".join(f"{n}, {n}:test" for n in _IDX_URLS) + ", emoji"


def has_test_split(spec: str) -> bool:
    """True for built-in names with a held-out split (fashion-mnist, mnist), not emoji."""
    return not Path(spec).exists() and spec.lower().partition(":")[0] in _IDX_URLS


class ImageDataset(torch.utils.data.Dataset):
    """Images as uint8 ``[C, H, W]`` tensors with int labels; see ``open_dataset``."""

    def __init__(self, *, name: str, labels: torch.Tensor, num_classes: int, resolution: tuple[int, int],
                 channels: int, images: torch.Tensor | None = None, source: _FileSource | None = None,
                 fit: str = "none") -> None:
        self.name = name
        self.resolution = resolution
        self.channels = channels
        self.num_classes = num_classes
        self._labels = labels
        self._images = images  # set for in-memory datasets, else decoded lazily from source
        self._source = source
        self._fit = fit

    @property
    def in_memory(self) -> bool:
        """True when ``get_batch`` is a single tensor index (no decoding)."""
        return self._images is not None

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._images is not None:
            return self._images[i], int(self._labels[i])
        assert self._source is not None
        return self._source.decode(int(i), self.channels, self.resolution, self._fit), int(self._labels[i])

    @property
    def nbytes(self) -> int | None:
        """Bytes held by in-memory images (None when decoded from files)."""
        return None if self._images is None else self._images.numel() * self._images.element_size()

    def to(self, device: torch.device | str) -> ImageDataset:
        """This in-memory dataset with its images and labels on ``device``; batches are
        then indexed there (indices stay on the host, so the order is the same everywhere)."""
        if self._images is None:
            raise ValueError("only in-memory datasets can move to a device")
        return ImageDataset(name=self.name, labels=self._labels.to(device), num_classes=self.num_classes,
                            resolution=self.resolution, channels=self.channels,
                            images=self._images.to(device), fit=self._fit)

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices = torch.as_tensor(indices, dtype=torch.int64)
        if self._images is not None:
            indices = to_device(indices, self._images.device)
            return self._images[indices], self._labels[indices]
        images = [self[int(i)][0] for i in indices]
        return torch.stack(images), self._labels[indices]

    def __repr__(self) -> str:
        h, w = self.resolution
        return f"ImageDataset({self.name!r}, {len(self)} images, {self.channels}x{h}x{w}, {self.num_classes} classes)"


class _FileSource:
    """Image files in a folder or zip. Zip handles are opened lazily per process so the
    object can be pickled into DataLoader workers."""

    def __init__(self, root: Path, names: list[str], zip_prefix: str | None = None) -> None:
        self.root = root
        self.names = names  # relative paths ('/'-separated), without zip_prefix
        self.zip_prefix = zip_prefix  # None for folders; common top folder inside a zip
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None, "_pid": -1}

    def where(self, i: int) -> str:
        return f"{self.root}:{self.names[i]}" if self.zip_prefix is not None else str(self.root / self.names[i])

    def open(self, i: int) -> PIL.Image.Image:
        try:
            if self.zip_prefix is None:
                return PIL.Image.open(self.root / self.names[i])
            if self._zip is None or self._pid != os.getpid():
                self._zip, self._pid = zipfile.ZipFile(self.root), os.getpid()
            return PIL.Image.open(self._zip.open(self.zip_prefix + self.names[i]))
        except (OSError, ValueError, SyntaxError, zipfile.BadZipFile, PIL.Image.DecompressionBombError) as e:
            raise UserError(f"cannot read image '{self.where(i)}' ({_why(e)}); remove or replace it") from None

    def decode(self, i: int, channels: int, resolution: tuple[int, int], fit: str) -> torch.Tensor:
        with self.open(i) as img:
            try:
                img.load()
                arr = _fit_image(_convert_color(img, channels), resolution, fit, self.where(i))
            except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
                raise UserError(f"cannot read image '{self.where(i)}' ({_why(e)}; truncated?); remove or replace it") from None
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _why(e: BaseException) -> str:
    """First line of an exception message, so UserError messages stay one line."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _convert_color(img: PIL.Image.Image, channels: int) -> PIL.Image.Image:
    """Returns an 'L' (channels=1) or 'RGB' (channels=3) image, following the module rules."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode.startswith("I;16"):
        img = PIL.Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8), "L")
    elif img.mode in ("I", "F"):
        img = PIL.Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    elif img.mode == "1":
        img = img.convert("L")
    elif img.mode in ("LA", "La", "RGBA", "RGBa"):
        arr = np.asarray(img.convert("LA" if img.mode.startswith("L") else "RGBA")).astype(np.uint32)
        color, alpha = arr[..., :-1], arr[..., -1:]
        # Composite over white with rounding: c*a/255 + 255*(1-a/255).
        out = ((color * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
        img = PIL.Image.fromarray(out[..., 0], "L") if out.shape[-1] == 1 else PIL.Image.fromarray(out, "RGB")
    elif img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    if channels == 1 and img.mode != "L":
        return img.convert("L")
    if channels == 3 and img.mode != "RGB":
        return img.convert("RGB")  # gray -> RGB repeats the value
    return img


def image_channels(img: PIL.Image.Image) -> int:
    """1 for grayscale modes (with or without alpha), 3 for everything else."""
    return 1 if img.mode in ("1", "L", "LA", "La", "I", "F") or img.mode.startswith("I;") else 3


def _crop_box(w: int, h: int, tw: int, th: int) -> tuple[int, int, int, int]:
    """Largest centered (left, top, right, bottom) box with aspect ratio tw:th."""
    cw, ch = (w, w * th // tw) if w * th <= h * tw else (h * tw // th, h)
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def _fit_image(img: PIL.Image.Image, resolution: tuple[int, int], fit: str, where: str) -> np.ndarray:
    """Applies ``fit`` to an 'L'/'RGB' image; returns uint8 [H, W, C]."""
    th, tw = resolution
    w, h = img.size
    if (h, w) != (th, tw):
        if fit == "center-crop":
            img = img.crop(_crop_box(w, h, tw, th))
        if fit in ("resize", "center-crop"):
            img = img.resize((tw, th), PIL.Image.Resampling.LANCZOS)
    arr = np.array(img)  # a writable copy, so torch.from_numpy is safe
    arr = arr[..., None] if arr.ndim == 2 else arr
    if (h, w) != (th, tw) and fit == "pad":
        if h > th or w > tw:
            raise UserError(f"image '{where}' is {h}x{w}, larger than --resolution {th}x{tw}; "
                            "use --fit resize or center-crop, or a larger resolution")
        top, left = (th - h) // 2, (tw - w) // 2
        arr = np.pad(arr, ((top, th - h - top), (left, tw - w - left), (0, 0)))
    if arr.shape[:2] != (th, tw):
        raise UserError(f"image '{where}' is {h}x{w}, not {th}x{tw}; pass --fit resize, center-crop or pad")
    return arr


def _fit_tensor(images: torch.Tensor, resolution: tuple[int, int], fit: str, name: str) -> torch.Tensor:
    """Applies ``fit`` to a whole uint8 [N, C, H, W] tensor (used for IDX data)."""
    th, tw = resolution
    h, w = images.shape[-2:]
    if (h, w) == (th, tw):
        return images
    if fit == "pad":
        if h > th or w > tw:
            raise UserError(f"{name} images are {h}x{w}, larger than --resolution {th}x{tw}; use --fit resize")
        top, left = (th - h) // 2, (tw - w) // 2
        return F.pad(images, (left, tw - w - left, top, th - h - top))
    if fit == "center-crop":
        left, top, right, bottom = _crop_box(w, h, tw, th)
        images = images[..., top:bottom, left:right]
    if fit in ("resize", "center-crop") and images.shape[-2:] != (th, tw):
        arr = images.numpy()
        out = np.stack([np.stack([np.asarray(PIL.Image.fromarray(c).resize((tw, th), PIL.Image.Resampling.LANCZOS))
                                  for c in img]) for img in arr])
        return torch.from_numpy(out)
    return images


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parses an (optionally gzip'd) IDX file of unsigned bytes with ``ndim`` dimensions."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read IDX file '{path}' ({_why(e)}); delete it so it is downloaded again") from None
    # Magic: two zero bytes, type 0x08 (unsigned byte), number of dimensions.
    if len(data) < 4 + 4 * ndim or data[:4] != bytes([0, 0, 8, ndim]):
        raise UserError(f"'{path}' is not an IDX file of {ndim}-D unsigned bytes; delete or replace it")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserError(f"IDX file '{path}' has {body.size} bytes of data, expected {int(np.prod(dims))} "
                        "(truncated?); delete it so it is downloaded again")
    return body.reshape(dims)


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _download(url: str, dest: Path, check: Callable[[Path], object]) -> None:
    """Downloads to a temp file, runs ``check`` on it (which raises if it is bad), then
    moves it into place atomically, so ``dest`` never holds a partial file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Keep dest's suffix last: _read_idx picks gzip by the '.gz' suffix.
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part" + dest.suffix)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}", leave=False) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        check(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared data folder should stay readable
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/patch-diffusion``, or ``~/.cache/patch-diffusion``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "patch-diffusion"


def _data_folders(name: str, cache_dir: Path) -> list[Path]:
    """Where a built-in set is looked for: $PATCH_DIFFUSION_DATA/<name>, then the cache."""
    env = os.environ.get("PATCH_DIFFUSION_DATA")
    return ([Path(env) / name] if env else []) + [cache_dir / name]


def _load_idx(name: str, split: str, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    stems = _IDX_SPLITS[split]
    folders = _data_folders(name, cache_dir) + [Path("/usr/share/datasets") / name]
    for folder in folders:
        found = [_find_idx_file(folder, s) for s in stems]
        if all(found):
            images, labels = _read_idx(found[0], 3), _read_idx(found[1], 1)
            break
    else:
        try:
            for stem, ndim in zip(stems, (3, 1)):
                if not (cache_dir / name / f"{stem}.gz").is_file():
                    _download(_IDX_URLS[name] + f"{stem}.gz", cache_dir / name / f"{stem}.gz",
                              lambda p, ndim=ndim: _read_idx(p, ndim))
        except (OSError, urllib.error.URLError, UserError) as e:
            raise UserError(
                f"{name} not found in {', '.join(map(str, folders))} and download failed ({_why(e)}); put the IDX files "
                f"({', '.join(stems)}, .gz ok) in {cache_dir / name} or run 'apt-get install dataset-{name}'"
            ) from None
        images = _read_idx(cache_dir / name / f"{stems[0]}.gz", 3)
        labels = _read_idx(cache_dir / name / f"{stems[1]}.gz", 1)
    if len(images) != len(labels):
        raise UserError(f"{name}:{split} has {len(images)} images but {len(labels)} labels; replace the IDX files")
    return images, labels


def _read_emoji_tgz(path: Path, expect: int | None = None) -> tuple[list[str], list[bytes]]:
    """The emoji PNGs' member names (sorted) and bytes, read straight from the tarball.
    With ``expect``, the PNG count must match (used to check a download)."""
    found: dict[str, bytes] = {}
    try:
        # One sequential pass: seeking back and forth in a .tgz would re-inflate it.
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                # Only files directly in img/google/64/ (not 32/, sheets-*/ or package.json).
                rel = m.name[len(_EMOJI_PREFIX):] if m.name.startswith(_EMOJI_PREFIX) else ""
                if m.isfile() and rel.lower().endswith(".png") and "/" not in rel and not _ignored(rel):
                    f = tf.extractfile(m)
                    assert f is not None  # regular files always have data
                    found[m.name] = f.read()
    except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
        raise UserError(f"cannot read '{path}' ({_why(e)}); delete it so it is downloaded again, "
                        f"or replace it with the output of 'npm pack {_EMOJI_SPEC}'") from None
    if not found or (expect is not None and len(found) != expect):
        raise UserError(f"'{path}' has {len(found)} PNGs under {_EMOJI_PREFIX}, expected {expect or 'some'}; "
                        f"replace it with the output of 'npm pack {_EMOJI_SPEC}'")
    names = sorted(found)
    return names, [found[n] for n in names]


def _decode_emoji(path: Path) -> np.ndarray:
    """Decodes the tarball's PNGs (sorted by name) with the color rules: uint8 [N, 3, 64, 64]."""
    names, blobs = _read_emoji_tgz(path)
    out = np.empty((len(names), *_EMOJI_SHAPE), np.uint8)
    for i in tqdm(range(len(names)), desc="decoding emoji", disable=len(names) <= 2000, leave=False):
        where = f"{path}:{names[i]}"
        try:
            with PIL.Image.open(io.BytesIO(blobs[i])) as img:
                img.load()
                arr = _fit_image(_convert_color(img, 3), _EMOJI_SHAPE[1:], "none", where)
        except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
            raise UserError(f"cannot read image '{where}' ({_why(e)}); replace the tarball with the output "
                            f"of 'npm pack {_EMOJI_SPEC}'") from None
        out[i] = arr.transpose(2, 0, 1)
    return out


def _load_emoji_cache(path: Path) -> np.ndarray | None:
    """The decoded array cached at ``path``, or None when missing, unreadable or of the wrong shape."""
    if not path.is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    ok = isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.ndim == 4 and len(arr) > 0
    return arr if ok and arr.shape[1:] == _EMOJI_SHAPE else None


def _save_emoji_cache(arr: np.ndarray, path: Path) -> None:
    """Writes the decoded array atomically; a read-only folder just means no cache."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except OSError:
        pass
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_emoji(cache_dir: Path) -> np.ndarray:
    """uint8 [N, 3, 64, 64]: from a cached .npy, else decoded from the tarball (found or
    downloaded), then cached beside it so later opens skip decoding."""
    folders = _data_folders("emoji", cache_dir)
    for folder in folders:
        cached = _load_emoji_cache(folder / _EMOJI_NPY)
        if cached is not None:
            return cached
        if (folder / _EMOJI_TGZ).is_file():
            tgz = folder / _EMOJI_TGZ
            break
    else:
        tgz = cache_dir / "emoji" / _EMOJI_TGZ
        try:
            _download(_EMOJI_URL, tgz, lambda p: _read_emoji_tgz(p, expect=_EMOJI_COUNT))
        except (OSError, urllib.error.URLError, UserError) as e:
            raise UserError(
                f"emoji not found in {', '.join(map(str, folders))} and download failed ({_why(e)}); "
                f"run 'make data' or 'npm pack {_EMOJI_SPEC}' and put the .tgz in {cache_dir / 'emoji'}"
            ) from None
    arr = _decode_emoji(tgz)
    _save_emoji_cache(arr, tgz.parent / _EMOJI_NPY)
    return arr


def subset_indices(n: int, max_images: int | None, subset_seed: int | None) -> np.ndarray:
    """Sorted indices of the images to keep: all, the first ``max_images``, or (with a
    seed) ``max_images`` distinct ones drawn at random, sorted so decoding order is stable."""
    if max_images is None or max_images >= n:
        return np.arange(n)
    if subset_seed is None:
        return np.arange(max_images)
    return np.sort(np.random.default_rng(subset_seed).choice(n, max_images, replace=False))


def _ignored(rel: str) -> bool:
    """True for hidden files/folders ('.x', macOS '._x') and macOS zip metadata ('__MACOSX/')."""
    return any(part == "__MACOSX" or (part.startswith(".") and part not in (".", ".."))
               for part in rel.split("/"))


def _list_images(path: Path) -> tuple[list[str], str | None, bytes | None]:
    """Sorted relative image paths, the zip prefix (None for folders) and dataset.json bytes if present."""
    if path.is_dir():
        rels = (p.relative_to(path).as_posix() for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        names = [r for r in rels if not _ignored(r)]
        meta = path / "dataset.json"
        return sorted(names), None, meta.read_bytes() if meta.is_file() else None
    try:
        with zipfile.ZipFile(path) as zf:
            # Skipped before the prefix check: Finder zips add '__MACOSX/<folder>/...' beside '<folder>/...'.
            members = [m for m in zf.namelist() if not m.endswith("/") and not _ignored(m)]
            # A zip of a folder keeps that folder as a common prefix; treat it as the root.
            tops = {m.split("/", 1)[0] for m in members}
            prefix = next(iter(tops)) + "/" if len(tops) == 1 and all("/" in m for m in members) else ""
            names = [m[len(prefix):] for m in members if Path(m).suffix.lower() in IMAGE_SUFFIXES]
            meta = zf.read(prefix + "dataset.json") if prefix + "dataset.json" in members else None
    except (OSError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read zip file '{path}' ({_why(e)}); check that it is a valid zip") from None
    return sorted(names), prefix, meta


def _labels_for(names: list[str], meta: bytes | None, where: str) -> tuple[list[int], int]:
    """Labels from dataset.json (none if its labels are null), else from first-level subfolders
    (if there are at least two), else -1."""
    if meta is not None:
        try:
            table = json.loads(meta).get("labels")
            table = None if table is None else {str(p).replace("\\", "/"): int(c) for p, c in table}
        except (ValueError, TypeError, AttributeError) as e:
            raise UserError(f"bad dataset.json in '{where}' ({_why(e)}); expected {{\"labels\": [[\"path\", int], ...]}}") from None
        if table is None:  # EDM's dataset_tool writes "labels": null for unlabelled sets
            return [-1] * len(names), 0
        missing = [n for n in names if n not in table]
        if missing:
            raise UserError(f"dataset.json in '{where}' has no label for '{missing[0]}'; add it or remove the image")
        labels = [table[n] for n in names]
        if min(labels) < 0:
            raise UserError(f"dataset.json in '{where}' has a negative label; use labels 0..K-1")
        return labels, max(labels) + 1
    folders = [n.split("/")[0] for n in names]
    classes = sorted(set(folders))
    if any(n.count("/") != 1 for n in names) or len(classes) < 2:
        return [-1] * len(names), 0
    index = {c: k for k, c in enumerate(classes)}
    return [index[f] for f in folders], len(classes)


def _open_files(path: Path, resolution: tuple[int, int] | None, fit: str, channels: int | None,
                max_images: int | None, subset_seed: int | None = None) -> ImageDataset:
    names, prefix, meta = _list_images(path)
    if not names:
        raise UserError(f"no images found in '{path}': put PNG/JPEG/WebP files there "
                        "or pass a zip or a built-in name like fashion-mnist")
    labels, num_classes = _labels_for(names, meta, str(path))  # from all names, so class ids are stable
    keep = subset_indices(len(names), max_images, subset_seed)  # chosen before any decoding
    names, labels = [names[i] for i in keep], [labels[i] for i in keep]
    source = _FileSource(path, names, prefix)
    # Read only headers up front: PIL decodes pixel data lazily.
    sizes: dict[tuple[int, int], str] = {}
    for i in range(len(names)):
        with source.open(i) as img:
            if i == 0 and channels is None:
                channels = image_channels(img)
            sizes.setdefault((img.height, img.width), names[i])
    assert channels is not None
    if resolution is None:
        if len(sizes) > 1:
            (a, b), (c, d) = list(sizes)[:2]
            raise UserError(f"images have different sizes ({a}x{b} and {c}x{d} in '{path}'); "
                            "pass --resolution HxW with --fit resize or center-crop")
        resolution = next(iter(sizes))
    elif fit == "none" and set(sizes) != {resolution}:
        (h, w), example = next((s, n) for s, n in sizes.items() if s != resolution)
        raise UserError(f"image '{example}' is {h}x{w}, not {resolution[0]}x{resolution[1]}; "
                        "pass --fit resize, center-crop or pad")
    name = f"{path} ({'zip' if prefix is not None else 'folder'})"
    images = None
    if len(names) * resolution[0] * resolution[1] * channels <= MAX_IN_MEMORY_BYTES:
        images = torch.empty(len(names), channels, *resolution, dtype=torch.uint8)
        for i in tqdm(range(len(names)), desc=f"decoding {path.name}", disable=len(names) <= 2000, leave=False):
            images[i] = source.decode(i, channels, resolution, fit)
    return ImageDataset(name=name, labels=torch.tensor(labels, dtype=torch.int64), num_classes=num_classes,
                        resolution=resolution, channels=channels, images=images,
                        source=None if images is not None else source, fit=fit)


def open_dataset(spec: str, *, resolution: tuple[int, int] | None = None, fit: str = "none",
                 channels: int | None = None, cache_dir: str | os.PathLike | None = None,
                 max_images: int | None = None, subset_seed: int | None = None) -> ImageDataset:
    """Opens a folder, a .zip, or a built-in name (fashion-mnist[:train|:test], mnist[:train|:test],
    emoji); tar shards ('shards/{000..099}.tar'), a Hugging Face dataset saved to disk
    ('folder' or 'folder:split') or a latents folder ('patch-diffusion encode'). ``max_images`` keeps the first N images in sorted order, or with ``subset_seed`` N
    distinct images drawn at random with that seed (kept in sorted order)."""
    if fit not in FITS:
        raise UserError(f"unknown --fit '{fit}'; use one of {', '.join(FITS)}")
    if fit != "none" and resolution is None:
        raise UserError(f"--fit {fit} needs a target size; pass --resolution HxW")
    if resolution is not None:
        if len(resolution) != 2 or not all(isinstance(r, (int, np.integer)) and r > 0 for r in resolution):
            raise UserError(f"bad resolution {resolution!r}; pass two positive integers HxW like 32x32")
        resolution = (int(resolution[0]), int(resolution[1]))
    if channels not in (None, 1, 3):
        raise UserError(f"bad channels {channels!r}; use 1 (grayscale) or 3 (RGB)")
    if max_images is not None and max_images < 1:
        raise UserError(f"bad max_images {max_images!r}; pass a positive number or leave it unset")
    if subset_seed is not None and (isinstance(subset_seed, bool) or not isinstance(subset_seed, (int, np.integer))
                                    or subset_seed < 0):
        raise UserError(f"bad subset_seed {subset_seed!r}; pass a non-negative integer or leave it unset")

    path = Path(spec).expanduser()
    from patch_diffusion.data import shards  # data sets larger than memory
    lazy = dict(resolution=resolution, fit=fit, channels=channels, max_images=max_images,
                subset_seed=subset_seed)
    if shards.is_tar_spec(spec) and not path.is_dir():
        return shards.open_tar_shards(spec, **lazy)
    folder, _, split = spec.rpartition(":")
    if folder and not path.exists() and shards.is_saved_hf_dataset(Path(folder).expanduser()):
        return shards.open_hf_dataset(Path(folder).expanduser(), split, **lazy)
    if shards.is_saved_hf_dataset(path):
        return shards.open_hf_dataset(path, None, **lazy)
    from patch_diffusion.data.latents import is_latent_folder, open_latents
    if is_latent_folder(path):  # written by 'patch-diffusion encode'
        if channels is not None:
            raise UserError(f"'{spec}' holds latents, whose channels are the VAE's; drop the channel option")
        return open_latents(path, resolution=resolution, fit=fit, max_images=max_images,
                            subset_seed=subset_seed)
    if path.is_dir() or (path.is_file() and zipfile.is_zipfile(path)):
        return _open_files(path, resolution, fit, channels, max_images, subset_seed)
    if path.exists():
        raise UserError(f"'{spec}' is neither a folder nor a zip file; pass a folder of images or a .zip")
    base, _, split = spec.lower().partition(":")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if base == "emoji" and split == "test":
        raise UserError("emoji has no test split; use 'emoji' (all images) and --max-images for a smaller set")
    if base == "emoji" and split in ("", "train"):
        arr = _load_emoji(cache)
        keep = subset_indices(len(arr), max_images, subset_seed)
        images = torch.from_numpy(arr[keep])  # fancy indexing copies, so the tensor owns its memory
        return _built_in("emoji", images, torch.full((len(images),), -1, dtype=torch.int64), 0,
                         resolution, fit, channels)
    if base not in _IDX_URLS or split not in ("", *_IDX_SPLITS):
        raise UserError(f"no such folder, zip or built-in dataset '{spec}'; built-in names: {_BUILTIN_NAMES} "
                        "(add :train for the train split explicitly)")
    split = split or "train"
    arr, labels = _load_idx(base, split, cache)
    keep = subset_indices(len(arr), max_images, subset_seed)
    images = torch.from_numpy(arr[keep]).unsqueeze(1)  # fancy indexing copies the read-only buffer
    return _built_in(f"{base}:{split}", images, torch.from_numpy(labels[keep].astype(np.int64)), 10,
                     resolution, fit, channels)


def _built_in(name: str, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
              resolution: tuple[int, int] | None, fit: str, channels: int | None) -> ImageDataset:
    """An in-memory built-in set from uint8 [N, C, H, W] images, brought to ``channels``
    (RGB -> gray by PIL's 'L' luma, before fitting, as for image files; gray -> RGB
    repeats) and to ``resolution`` by ``fit``."""
    if channels == 1 and images.shape[1] == 3:
        # One tall image through PIL, so the luma rounds exactly as for image files.
        n, _, h, w = images.shape
        tall = PIL.Image.fromarray(images.permute(0, 2, 3, 1).reshape(n * h, w, 3).numpy(), "RGB")
        images = torch.from_numpy(np.array(tall.convert("L"))).reshape(n, 1, h, w)
    if resolution is not None:
        base = name.partition(":")[0]
        if fit == "none" and tuple(images.shape[-2:]) != resolution:
            h, w = images.shape[-2:]
            raise UserError(f"{base} images are {h}x{w}, not {resolution[0]}x{resolution[1]}; "
                            "pass --fit pad, resize or center-crop")
        images = _fit_tensor(images, resolution, fit, base)
    if channels == 3 and images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return ImageDataset(name=name, labels=labels, num_classes=num_classes,
                        resolution=(images.shape[-2], images.shape[-1]), channels=images.shape[1],
                        images=images.contiguous())
