"""Run folders (numbered, EDM-style: 00000-fmnist-32-stochastic-p0.5) and their logs."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .checkpoint import list_checkpoints, newest_good_checkpoint
from .errors import UserError

_RUN = re.compile(r"^(\d{5})-")


def run_dirs(outdir: Path) -> list[Path]:
    """Numbered run folders in ``outdir``, oldest first."""
    if not Path(outdir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(outdir).iterdir() if p.is_dir() and (m := _RUN.match(p.name))]
    return [p for _, p in sorted(found)]


def new_run_dir(outdir: Path, desc: str) -> Path:
    """Create the next numbered run folder; never reuses an existing one."""
    outdir.mkdir(parents=True, exist_ok=True)
    existing = run_dirs(outdir)
    number = int(existing[-1].name[:5]) + 1 if existing else 0
    while True:
        path = outdir / f"{number:05d}-{desc}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            number += 1


def latest_checkpoint(outdir: Path) -> Path | None:
    """The newest checkpoint of the newest run folder in ``outdir`` that has one."""
    for run in reversed(run_dirs(outdir)):
        checkpoints = list_checkpoints(run)
        if checkpoints:
            return checkpoints[-1]
    return None


def resumable_checkpoint(outdir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint of the newest run folder that has one, skipping files that
    are truncated or corrupt; also the skipped files with why. A run folder whose
    checkpoints are all damaged is an error rather than a silent fall-back to an older run."""
    for run in reversed(run_dirs(outdir)):
        if list_checkpoints(run):
            good, bad = newest_good_checkpoint(run)
            if good is None:
                raise UserError(f"no readable checkpoint in '{run}' ({bad[0][1]}); pass an older "
                                "run's checkpoint with --resume PATH, or start a new run")
            return good, bad
    return None, []


class RunLog:
    """Appends human lines to log.txt and JSON records to stats.jsonl."""

    FILES = ("log.txt", "stats.jsonl")

    def __init__(self, run_dir: Path, echo: bool = True, enabled: bool = True) -> None:
        self.run_dir = run_dir
        self.echo = echo
        self.enabled = enabled  # off in every process of a job but rank 0's

    def sizes(self) -> dict[str, int]:
        """Each log file's length in bytes (stored with a checkpoint)."""
        return {name: (self.run_dir / name).stat().st_size if (self.run_dir / name).exists() else 0
                for name in self.FILES}

    def rewind(self, sizes: dict[str, int]) -> None:
        """Cut each log back to the length it had when a checkpoint was saved, so a resumed
        run logs each step once."""
        for name in self.FILES if self.enabled else ():
            path = self.run_dir / name
            size = sizes.get(name)
            if size is not None and path.exists() and path.stat().st_size > size:
                with open(path, "r+b") as f:
                    f.truncate(size)

    def info(self, message: str, echo: bool = True) -> None:
        if not self.enabled:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        with open(self.run_dir / "log.txt", "a") as f:
            f.write(line + "\n")
        if self.echo and echo:
            tqdm.write(message)

    def stats(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.run_dir / "stats.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        with open(self.run_dir / "log.txt", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} " +
                    " ".join(f"{k}={v}" for k, v in record.items() if k != "time") + "\n")
