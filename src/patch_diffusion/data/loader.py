"""Infinite, deterministic, resumable batch loading.

The sample order is a stream made of consecutive epochs, each a permutation seeded
by (seed, epoch). Batch k is the slice [k*B, (k+1)*B) of that stream, so it depends
only on (seed, k): resuming with ``start_batch=k`` continues exactly where an
uninterrupted run would be, and batch size stays exact even across epoch ends.

In a job of several processes every process walks the same stream and loads only its
share of each batch (``shard``), so the data position is one number for the whole job.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import numpy as np
import torch

from patch_diffusion.data.datasets import ImageDataset
from patch_diffusion.errors import UserError


def default_num_workers(processes: int = 1) -> int:
    """A worker count that leaves one core to each training process on this machine:
    min(4, cores per process - 1)."""
    return max(0, min(4, (os.cpu_count() or 1) // max(processes, 1) - 1))


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The sample order of one epoch; a pure function of its arguments."""
    if not shuffle:
        return torch.arange(n)
    # SeedSequence mixes (seed, epoch) so that distinct pairs never share a stream.
    state = np.random.SeedSequence([seed % 2**64, epoch]).generate_state(1, np.uint64)[0]
    gen = torch.Generator().manual_seed(int(state) & (2**63 - 1))
    return torch.randperm(n, generator=gen)


def batch_index_stream(n: int, batch_size: int, seed: int, start_batch: int = 0,
                       shuffle: bool = True) -> Iterator[torch.Tensor]:
    """Yields int64 index tensors of length ``batch_size`` forever, from batch ``start_batch`` on."""
    epoch, offset = divmod(start_batch * batch_size, n)
    perm = epoch_permutation(n, seed, epoch, shuffle)
    while True:
        parts, need = [], batch_size
        while need > 0:
            take = min(need, n - offset)
            parts.append(perm[offset:offset + take])
            offset, need = offset + take, need - take
            if offset == n:
                epoch, offset = epoch + 1, 0
                perm = epoch_permutation(n, seed, epoch, shuffle)
        yield torch.cat(parts)


def shard_stream(stream: Iterator[torch.Tensor], rank: int, world_size: int) -> Iterator[torch.Tensor]:
    """Process ``rank``'s contiguous share of every batch of ``stream``."""
    for indices in stream:
        share = len(indices) // world_size
        yield indices[rank * share:(rank + 1) * share]


class _BatchSampler(torch.utils.data.Sampler):
    """Feeds the index stream to a DataLoader; each item is one whole batch of indices
    (this process's share of it)."""

    def __init__(self, n: int, batch_size: int, seed: int, start_batch: int, shuffle: bool,
                 shard: tuple[int, int]) -> None:
        self.args = (n, batch_size, seed, start_batch, shuffle)
        self.shard = shard

    def __iter__(self) -> Iterator[torch.Tensor]:
        return shard_stream(batch_index_stream(*self.args), *self.shard)


def _leave_signals_to_the_main_process(worker_id: int) -> None:
    """Ctrl-C and a cluster's SIGTERM reach every process of the job; a worker that died
    of them would make the training process fail mid-step instead of finishing the step
    and checkpointing. So workers ignore SIGINT, and obey SIGTERM only from their parent
    (the DataLoader ending them, or Python's exit) — told apart by the sender's pid."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS, Windows: keep the default
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait_for_parent() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(128 + signal.SIGTERM)

    threading.Thread(target=wait_for_parent, daemon=True, name="sigterm-from-parent").start()


class _WorkerUserError:
    """A UserError message sent back from a DataLoader worker in place of a batch.

    Raised there, torch would re-raise it here with a multi-line "Caught UserError in
    DataLoader worker process ..." message. A plain object (not a tuple or str) passes
    unchanged through pickling, the default conversion and pin_memory.
    """

    def __init__(self, message: str) -> None:
        self.message = message


class _BatchFetcher(torch.utils.data.Dataset):
    """Lets a DataLoader worker fetch a whole batch with one ``get_batch`` call."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __getitem__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | _WorkerUserError:
        try:
            return self.dataset.get_batch(indices)
        except UserError as e:
            return _WorkerUserError(str(e))

    def __len__(self) -> int:
        return len(self.dataset)


class InfiniteBatches:
    """Yields (images uint8 [B,C,H,W], labels int64 [B]) forever, epoch-shuffled, deterministic given (seed, position).

    Each call to ``iter()`` starts again at ``start_batch``. In-memory datasets with
    ``num_workers == 0`` are sliced in this process; otherwise a DataLoader with
    the same batch order does the decoding in worker processes. ``shard=(rank, world)``
    yields only that process's ``batch_size / world`` images of each batch.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, *, seed: int = 0, start_batch: int = 0,
                 num_workers: int = 0, pin_memory: bool = False, shuffle: bool = True,
                 shard: tuple[int, int] = (0, 1)) -> None:
        if len(dataset) == 0:
            raise UserError("the dataset is empty; point it at a folder, zip or built-in name with images")
        if batch_size < 1:
            raise UserError(f"bad batch size {batch_size}; pass a positive number")
        if start_batch < 0 or num_workers < 0:
            raise UserError("start_batch and num_workers must not be negative")
        if batch_size % shard[1] or not 0 <= shard[0] < shard[1]:
            raise UserError(f"a batch of {batch_size} does not split into {shard[1]} equal shares; "
                            f"use a batch size divisible by {shard[1]}")
        self.shard = shard
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.start_batch = start_batch
        self.num_workers = num_workers
        self.shuffle = shuffle
        # Pinning only helps (and only works) with an accelerator present.
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._loader: torch.utils.data.DataLoader | None = None

    def _make_loader(self) -> torch.utils.data.DataLoader:
        sampler = _BatchSampler(len(self.dataset), self.batch_size, self.seed, self.start_batch,
                                self.shuffle, self.shard)
        workers = self.num_workers > 0
        return torch.utils.data.DataLoader(
            _BatchFetcher(self.dataset), batch_size=None, sampler=sampler, num_workers=self.num_workers,
            pin_memory=self.pin_memory, persistent_workers=workers, prefetch_factor=2 if workers else None,
            worker_init_fn=_leave_signals_to_the_main_process if workers else None)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.num_workers == 0 and getattr(self.dataset, "in_memory", False):
            stream = batch_index_stream(len(self.dataset), self.batch_size, self.seed,
                                        self.start_batch, self.shuffle)
            for indices in shard_stream(stream, *self.shard):
                images, labels = self.dataset.get_batch(indices)
                if self.pin_memory and images.device.type == "cpu":  # not for data kept on a GPU
                    images, labels = images.pin_memory(), labels.pin_memory()
                yield images, labels
            return
        # Built once so persistent workers survive repeated iter() calls.
        if self._loader is None:
            self._loader = self._make_loader()
        for batch in self._loader:
            if isinstance(batch, _WorkerUserError):
                raise UserError(batch.message)
            yield batch
