"""Run folders (numbered, EDM-style: 00000-fmnist-32-stochastic-p0.5) and their logs."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .checkpoint import list_checkpoints

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


class RunLog:
    """Appends human lines to log.txt and JSON records to stats.jsonl."""

    def __init__(self, run_dir: Path, echo: bool = True) -> None:
        self.run_dir = run_dir
        self.echo = echo

    def info(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        with open(self.run_dir / "log.txt", "a") as f:
            f.write(line + "\n")
        if self.echo:
            tqdm.write(message)

    def stats(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        with open(self.run_dir / "stats.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        with open(self.run_dir / "log.txt", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} " +
                    " ".join(f"{k}={v}" for k, v in record.items() if k != "time") + "\n")
