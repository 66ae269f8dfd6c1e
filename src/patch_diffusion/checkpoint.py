"""Checkpoints: one safetensors file holding tensors plus a JSON header.

A checkpoint stores the EMA and raw weights, the optimiser's moments, the random
generators' states and the training position as tensors, and the resolved run config
and counters as JSON in the safetensors metadata. Loading never unpickles anything.
Files are written to a temporary name, flushed to disk, renamed, and the folder entry
flushed too: a crash or a full disk leaves either the old file or the complete new
one, never a torn one. A SHA-256 of the tensors in the header catches files damaged
after writing; the header itself is size-limited and must be a JSON object.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from .errors import UserError

FORMAT = "patch-diffusion-checkpoint"
VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d+)\.safetensors$")
MAX_HEADER_BYTES = 16 << 20  # ours are a few kB; refuse to parse anything absurd


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}.safetensors"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new file, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries, so a rename survives a power cut (no-op where the OS
    cannot open folders, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files of writes that a crash interrupted (never renamed)."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():  # hashed in place through the buffer protocol, not copied to bytes
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Atomically save ``tensors`` with ``meta`` (JSON-serialisable) as its header."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {"format": FORMAT, "version": str(VERSION), "meta": json.dumps(meta),
              "sha256": tensors_digest(flat)}
    atomic_write_bytes(path, safetensors_save(flat, metadata=header))


def load_checkpoint(path: str | os.PathLike, *, with_tensors: bool = True
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and meta of a checkpoint; a UserError for anything that is not one of ours.

    ``with_tensors=False`` reads only the JSON header (config, counters), leaving the
    tensors dict empty: what callers that need the config alone should use.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist; pass a checkpoint-*.safetensors file from a run folder")
    _check_header_size(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise UserError(
                    f"'{path}' is not a patch-diffusion checkpoint; pass a checkpoint-*.safetensors "
                    "file written by 'patch-diffusion train'"
                )
            tensors = {key: f.get_tensor(key) for key in f.keys()} if with_tensors else {}
    except UserError:
        raise
    except Exception as exc:  # safetensors raises several types for torn or foreign files
        raise UserError(
            f"cannot read checkpoint '{path}' ({type(exc).__name__}: it is truncated or not a "
            "safetensors file); use an earlier checkpoint from the same run folder"
        ) from None
    try:
        meta = json.loads(header["meta"])
    except (KeyError, ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise UserError(f"checkpoint '{path}' has a damaged header (its meta is not a JSON object); "
                        "use an earlier checkpoint from the same run folder")
    if with_tensors and "sha256" in header and tensors_digest(tensors) != header["sha256"]:
        raise UserError(f"checkpoint '{path}' is corrupt (its tensors do not match their SHA-256); "
                        "use an earlier checkpoint from the same run folder")
    return tensors, meta


def _check_header_size(path: Path) -> None:
    """Refuse a header longer than the file or than any checkpoint of ours could have,
    before a parser allocates for it."""
    with open(path, "rb") as f:
        prefix = f.read(8)
    size = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if size < 0 or size > MAX_HEADER_BYTES or 8 + size > path.stat().st_size:
        raise UserError(f"cannot read checkpoint '{path}' (its header length {size} is impossible: it is "
                        "truncated or not a safetensors file); use an earlier checkpoint from the same run folder")


def newest_good_checkpoint(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint in ``run_dir`` that loads and passes its checksum, and the
    newer ones that did not (with why)."""
    bad: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            load_checkpoint(path)
        except UserError as exc:
            bad.append((path, str(exc)))
            continue
        return path, bad
    return None, bad


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run folder's checkpoints, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("checkpoint-*.safetensors")
             if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (keep = 0 keeps everything)."""
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = len(prefix) + 1
    return {k[start:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state_dict into tensors and JSON (no pickling of either)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           info: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, entries in info["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    # Saved state is contiguous; give it back each parameter's memory layout (channels-last
    # weights), as fused Adam pairs elements by storage order and would mix them otherwise.
    for group in optimizer.param_groups:
        for param in group["params"]:
            entries = optimizer.state.get(param, {})
            for name, value in entries.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    entries[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)
