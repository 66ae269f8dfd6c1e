"""Several processes, one training run: PyTorch's own distributed stack (torchrun +
torch.distributed + DistributedDataParallel), and the agreements a run needs on top.

How a step is split so that N processes train exactly as one does (up to the order of
float sums):
- every process walks the same global index stream and loads only its slice of each
  loader batch (its shard of the data);
- every random draw of the step (patch size, offsets, flips, label dropout, sigma,
  noise) is made for the whole global batch from generators seeded alike in every
  process, and each process keeps the rows it holds;
- DDP averages the gradients, so Adam and the EMA take the same update everywhere.
So the data position and every generator are the same in all processes, a checkpoint
holds them once (rank 0 writes it), and it resumes on any number of processes with
the same global batch.

Decisions that must not diverge (stop on a signal or a time budget, skip a step whose
loss is not finite) are taken on values reduced over all processes.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from .devices import resolve_device
from .errors import UserError

# Rank 0 makes grids, FID and checkpoints while the others wait in their next
# collective; a periodic FID of many images can take long, so the wait may too.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or any launcher setting its variables)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def environment_rank() -> int:
    """This process's rank from the launcher's environment (0 without one)."""
    return int(os.environ.get("RANK", "0") or 0)


@dataclass
class Distributed:
    """Rank and world of this process; a single process has rank 0 in a world of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    started: bool = False  # whether this object opened the process group

    @classmethod
    def from_environment(cls) -> Distributed:
        if not launched_by_torchrun():
            return cls()
        env = os.environ
        world = int(env["WORLD_SIZE"])
        return cls(rank=int(env["RANK"]), world_size=world, local_rank=int(env["LOCAL_RANK"]),
                   local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)))

    @property
    def enabled(self) -> bool:
        """More than one process: gradients and decisions go through collectives."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, grids, FID and checkpoints."""
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The device this process trains on: each process of a CUDA job takes the GPU
        numbered by its local rank (torchrun's convention)."""
        device = resolve_device(name)
        if not launched_by_torchrun():
            return device
        if device.type == "cuda":
            if device.index is not None:  # an explicit cuda:N
                if self.world_size > 1:
                    raise UserError(f"under torchrun each process takes the GPU cuda:LOCAL_RANK; "
                                    f"use --device cuda (or auto) instead of '{name}'")
                torch.cuda.set_device(device)
                return device
            if self.local_rank >= torch.cuda.device_count():
                raise UserError(f"process {self.rank} has local rank {self.local_rank} but its machine "
                                f"has {torch.cuda.device_count()} GPUs; lower --nproc_per_node",
                                rank=self.rank)
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        elif device.type == "mps" and self.world_size > 1:
            raise UserError("several processes cannot share MPS; use --device cpu under torchrun, "
                            "or train in one process")
        return device

    def start(self, device: torch.device) -> None:
        """Open the process group (NCCL for CUDA, gloo otherwise) when torchrun started us."""
        if not launched_by_torchrun() or tdist.is_initialized():
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        tdist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, **kwargs)
        self.started = True

    def stop(self) -> None:
        if self.started and tdist.is_initialized():
            tdist.destroy_process_group()
        self.started = False

    def comm_device(self) -> torch.device:
        """Where tensors for collectives live: the GPU for NCCL, the host for gloo."""
        if tdist.is_initialized() and tdist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def agree_on_error(self, error: UserError | None) -> None:
        """Set-up is done in every process; if any of them failed, all stop with the
        first failure's message (printed once, by rank 0)."""
        if not self.enabled:
            if error is not None:
                raise error
            return
        with lost_peers(self):
            found: list[Any] = [None] * self.world_size
            tdist.all_gather_object(found, None if error is None else (str(error), error.rank))
        for rank, failure in enumerate(found):
            if failure is not None:
                message, origin = failure
                prefix = f"process {rank} of {self.world_size}: " if origin is None and rank != 0 else ""
                raise UserError(prefix + message)  # rank None: every process stops, rank 0 says why

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` in every process (a path, a small record)."""
        if not self.enabled:
            return value
        box = [value]
        with lost_peers(self):
            tdist.broadcast_object_list(box, src=0)
        return box[0]

    def max(self, values: list[float]) -> list[float]:
        """Each value's maximum over all processes."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.comm_device())
        with lost_peers(self):
            tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX)
        return tensor.tolist()

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of a (device) tensor over all processes; NaN anywhere is NaN everywhere."""
        if not self.enabled:
            return tensor
        tensor = tensor.detach().clone()
        with lost_peers(self):
            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor / self.world_size

    def rank_seed(self, seed: int, step: int) -> int:
        """A seed for this process's own random stream (dropout masks), distinct per rank."""
        return int(np.random.SeedSequence([seed, step, self.rank]).generate_state(1)[0])

    def local_user_error(self, error: UserError) -> UserError:
        """``error`` as the failure of this process alone (printed by it, naming it)."""
        if not self.enabled or error.rank is not None:
            return error
        return UserError(f"process {self.rank} of {self.world_size}: {error}", rank=self.rank)


class LostPeer(UserError):
    """A collective failed because another process of the job ended first."""


@contextlib.contextmanager
def lost_peers(dist: Distributed, only_collectives: bool = False) -> Iterator[None]:
    """Turn a failed collective (another process died or was stopped) into one line
    naming this process; the first process's own error says why. With
    ``only_collectives`` (code that also does other work, like a training step), only
    errors that come from the communication backend are turned."""
    try:
        yield
    except (RuntimeError, tdist.DistError) as exc:  # gloo raises RuntimeError, NCCL DistError
        if (not dist.enabled or isinstance(exc, torch.OutOfMemoryError)
                or (only_collectives and not _from_backend(exc))):
            raise
        raise LostPeer(f"process {dist.rank} of {dist.world_size} lost contact with the others "
                       f"({_first_sentence(exc)}); the first error of the job names the cause",
                       rank=dist.rank) from None


def _first_sentence(exc: BaseException) -> str:
    """The backend's message without its source location: '[.../pair.cc:553] Connection
    closed by peer [127.0.0.1]:21421. This ...' -> 'Connection closed by peer [127.0.0.1]:21421'."""
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", str(exc).strip())
    text = re.split(r"\.\s", text.splitlines()[0] if text else "", maxsplit=1)[0]
    return text[:160] or type(exc).__name__


def _from_backend(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, tdist.DistError) or any(
        word in text for word in ("gloo", "nccl", "connection", "broken pipe", "timed out", "peer"))


def keep_rows(drawn: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``drawn`` (made for the job's whole batch) that this process holds;
    all of them when ``rows`` is None (one process)."""
    return drawn if rows is None else drawn[rows.to(drawn.device)]


def per_process_batch(batch_size: int, world_size: int, batch_gpu: int | None) -> tuple[int, int]:
    """(images per process per loader batch, accumulation rounds) for a global base batch.

    global batch = per-device batch x accumulation rounds x processes, as in EDM."""
    if batch_size % world_size:
        raise UserError(f"--batch {batch_size} does not split over {world_size} processes; "
                        f"use a multiple of {world_size}")
    local = batch_size // world_size
    if batch_gpu is None or batch_gpu >= local:
        return local, 1
    if batch_gpu < 1 or local % batch_gpu:
        raise UserError(f"--batch-gpu {batch_gpu} does not divide the {local} images each of the "
                        f"{world_size} processes gets from --batch {batch_size}; use a divisor of {local}")
    return local, local // batch_gpu


def shard_rows(batch_size: int, world_size: int, rank: int, divisor: int, mode: str) -> torch.Tensor:
    """The positions in a step's global batch of crops that process ``rank`` holds.

    The global batch is d loader batches of ``batch_size`` images, concatenated
    ("distinct"), or one loader batch with each image repeated d times ("repeat");
    each process loads the same slice of every loader batch."""
    local = batch_size // world_size
    if mode == "repeat":
        return torch.arange(rank * local * divisor, (rank + 1) * local * divisor)
    starts = torch.arange(divisor) * batch_size + rank * local
    return (starts[:, None] + torch.arange(local)[None, :]).reshape(-1)
