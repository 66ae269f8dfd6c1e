"""Data sets larger than memory: WebDataset-style tar shards and Hugging Face datasets
saved to disk. Both are read at random, one image at a time, in the DataLoader's worker
processes, so the data order is the same deterministic, resumable stream as for a folder
(``loader.py``): a run resumes at exactly the batch where it stopped.

Tar shards (``--data 'shards/{000..099}.tar'``): the WebDataset convention, where files
that share a key (the name up to the first dot) form one sample: an image
(``.png/.jpg/.jpeg/.webp``) and optionally a class label (``.cls``: a whole number as
text). Opening the shards reads their member headers (and the small ``.cls`` files) to
index every sample by shard and byte offset; images are read later by seeking there,
which needs uncompressed tars.

A folder written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``'s, with
``--data folder:split``): the first image column, and a ``label`` column of class labels
when there is one. Arrow files are memory-mapped, never loaded whole.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from patch_diffusion.data.datasets import (IMAGE_SUFFIXES, ImageDataset, _FileSource, _why, image_channels,
                                           subset_indices)
from patch_diffusion.errors import UserError

_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(spec: str) -> list[str]:
    """'a/{000..002}.tar' -> ['a/000.tar', 'a/001.tar', 'a/002.tar'], as a shell and
    WebDataset expand it (numeric ranges keep their zero padding; 'x,y' lists too)."""
    match = _BRACES.search(spec)
    if match is None:
        return [spec]
    body = match.group(1)
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        lo, hi = numbers.groups()
        width = len(lo) if lo.startswith("0") else 0
        options = [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    head, tail = spec[:match.start()], spec[match.end():]
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def is_tar_spec(spec: str) -> bool:
    return spec.lower().endswith(".tar") or (_BRACES.search(spec) is not None and ".tar" in spec.lower())


def is_saved_hf_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in
                                 ("dataset_info.json", "dataset_dict.json", "state.json"))


class _TarSource(_FileSource):
    """Images at known byte offsets of tar shards; file handles are opened lazily per
    process so the object pickles into DataLoader workers."""

    def __init__(self, shards: list[str], entries: list[tuple[int, int, int, str]]) -> None:
        self.shards = shards
        self.entries = entries  # (shard index, data offset, size, member name)
        self._files: dict[int, Any] = {}
        self._pid = -1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}, "_pid": -1}

    def where(self, i: int) -> str:
        shard, _, _, name = self.entries[i]
        return f"{self.shards[shard]}:{name}"

    def open(self, i: int) -> PIL.Image.Image:
        shard, offset, size, _ = self.entries[i]
        try:
            if self._pid != os.getpid():
                self._files, self._pid = {}, os.getpid()
            if shard not in self._files:
                self._files[shard] = open(self.shards[shard], "rb")
            handle = self._files[shard]
            handle.seek(offset)
            data = handle.read(size)
            if len(data) != size:
                raise OSError("the shard ends early")
            return PIL.Image.open(io.BytesIO(data))
        except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
            raise UserError(f"cannot read image '{self.where(i)}' ({_why(e)}); remove or replace it") from None


def _index_tar(path: str, shard: int) -> tuple[list[tuple[int, int, int, str]], list[int]]:
    """(image entries, labels) of one shard, in member order; label None where none."""
    samples: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise UserError(f"tar shard '{path}' is empty; remove it from the pattern or write it again")
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                if base.startswith("."):
                    continue
                stem, dot, ext = base.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                ext = "." + ext.lower() if dot else ""
                sample = samples.setdefault(key, {})
                if not sample:
                    order.append(key)
                if ext in IMAGE_SUFFIXES:
                    sample["image"] = (shard, member.offset_data, member.size, member.name)
                elif ext == ".cls":
                    text = tar.extractfile(member).read().decode().strip()  # type: ignore[union-attr]
                    try:
                        sample["label"] = int(text)
                    except ValueError:
                        raise UserError(f"'{path}:{member.name}' should hold a whole-number class label, "
                                        f"not '{text[:20]}'") from None
    except FileNotFoundError:
        raise UserError(f"tar shard '{path}' does not exist; check the --data pattern") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"cannot read tar shard '{path}' ({_why(e)}); shards must be uncompressed .tar "
                        "files (read at random offsets)") from None
    entries, labels = [], []
    for key in order:
        sample = samples[key]
        if "image" in sample:
            entries.append(sample["image"])
            labels.append(sample.get("label"))
    return entries, labels


def open_tar_shards(spec: str, *, resolution: tuple[int, int] | None, fit: str, channels: int | None,
                    max_images: int | None, subset_seed: int | None) -> ImageDataset:
    """An ImageDataset over the samples of the shards ``spec`` names (brace patterns)."""
    shards = expand_braces(spec)
    entries: list[tuple[int, int, int, str]] = []
    labels: list[int | None] = []
    for k, path in enumerate(shards):
        found, found_labels = _index_tar(path, k)
        if not found:
            raise UserError(f"tar shard '{path}' holds no images (.png/.jpg/.jpeg/.webp); "
                            "remove it from the pattern or fill it")
        entries += found
        labels += found_labels
    labelled = [x for x in labels if x is not None]
    if labelled and len(labelled) != len(labels):
        raise UserError(f"some samples of '{spec}' have a .cls label and some do not; label all or none")
    if labelled and min(labelled) < 0:
        raise UserError(f"'{spec}' has a negative class label; use labels 0..K-1")
    num_classes = max(labelled) + 1 if labelled else 0
    keep = subset_indices(len(entries), max_images, subset_seed)
    source = _TarSource(shards, [entries[i] for i in keep])
    kept_labels = [-1 if labels[i] is None else labels[i] for i in keep]  # -1: unlabelled, as for folders
    return _lazy_dataset(f"{spec} ({len(shards)} tar shards)", source,
                         torch.tensor(kept_labels, dtype=torch.int64), num_classes,
                         resolution, fit, channels)


class _ArrowSource(_FileSource):
    """One image column of a Hugging Face dataset saved to disk, opened lazily per process."""

    def __init__(self, path: str, split: str | None, column: str, rows: list[int]) -> None:
        self.path, self.split, self.column, self.rows = path, split, column, rows
        self._data: Any = None
        self._pid = -1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None, "_pid": -1}

    def where(self, i: int) -> str:
        return f"{self.path}{':' + self.split if self.split else ''} row {self.rows[i]}"

    def open(self, i: int) -> PIL.Image.Image:
        if self._data is None or self._pid != os.getpid():
            self._data, self._pid = _load_hf(self.path, self.split)[0], os.getpid()
        try:
            value = self._data[self.rows[i]][self.column]
            if isinstance(value, dict):  # an undecoded Image feature: {"bytes": ..., "path": ...}
                value = PIL.Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
            if not isinstance(value, PIL.Image.Image):
                raise ValueError(f"column '{self.column}' holds {type(value).__name__}, not images")
            return value
        except (OSError, ValueError, SyntaxError, KeyError, PIL.Image.DecompressionBombError) as e:
            raise UserError(f"cannot read image '{self.where(i)}' ({_why(e)}); remove or replace it") from None


def _load_hf(path: str, split: str | None) -> tuple[Any, Any]:
    """(the dataset, its datasets module) for a save_to_disk folder and optional split."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"'{path}' is a Hugging Face dataset folder; reading it needs the datasets "
                        "package: pip install datasets") from None
    try:
        data = datasets.load_from_disk(path)
    except (OSError, ValueError, FileNotFoundError) as e:
        raise UserError(f"cannot open the Hugging Face dataset '{path}' ({_why(e)}); pass a folder "
                        "written by save_to_disk") from None
    if isinstance(data, datasets.DatasetDict):
        if split is None:
            split = "train" if "train" in data else None
        if split not in data:
            raise UserError(f"'{path}' has the splits {', '.join(data)}; pick one with --data {path}:SPLIT")
        data = data[split]
    elif split is not None:
        raise UserError(f"'{path}' is a single dataset without splits; drop ':{split}'")
    return data, datasets


def open_hf_dataset(path: Path, split: str | None, *, resolution: tuple[int, int] | None, fit: str,
                    channels: int | None, max_images: int | None, subset_seed: int | None) -> ImageDataset:
    data, datasets = _load_hf(str(path), split)
    features = data.features
    images = [name for name, kind in features.items() if isinstance(kind, datasets.Image)]
    if not images:
        raise UserError(f"'{path}' has no image column (columns: {', '.join(features)}); cast one with "
                        "dataset.cast_column(name, datasets.Image()) before save_to_disk")
    label_column = next((n for n in ("label", "labels") if isinstance(features.get(n), datasets.ClassLabel)), None)
    if label_column is not None:
        labels = torch.tensor(data[label_column], dtype=torch.int64)
        num_classes = features[label_column].num_classes
    else:
        labels, num_classes = torch.full((len(data),), -1, dtype=torch.int64), 0
    if len(data) == 0:
        raise UserError(f"the Hugging Face dataset '{path}' is empty")
    keep = subset_indices(len(data), max_images, subset_seed)
    source = _ArrowSource(str(path), split, images[0], [int(i) for i in keep])
    return _lazy_dataset(f"{path} (Hugging Face dataset, column '{images[0]}')", source,
                         labels[torch.from_numpy(keep)], num_classes, resolution, fit, channels)


def _lazy_dataset(name: str, source: _FileSource, labels: torch.Tensor, num_classes: int,
                  resolution: tuple[int, int] | None, fit: str, channels: int | None) -> ImageDataset:
    """A data set decoded image by image from ``source``; its size and channels come from
    the first image unless given (a differently sized image later is then an error that
    names it, unless --fit brings it to size)."""
    with source.open(0) as first:
        if channels is None:
            channels = image_channels(first)
        if resolution is None:
            resolution = (first.height, first.width)
    return ImageDataset(name=name, labels=labels, num_classes=num_classes, resolution=resolution,
                        channels=channels, source=source, fit=fit)
