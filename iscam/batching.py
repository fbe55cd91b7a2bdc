"""The chunk loop shared by the methods and the metrics: a work list forwarded a chunk at a time.

:func:`run_chunks` walks ``range(total)`` in chunks and halves the chunk on CUDA out-of-memory;
:class:`ChunkBuffer` holds the inputs of one chunk, so that every chunk of a call fills the same memory
in place instead of allocating (and, on the CPU, page-faulting) a fresh batch (see :mod:`iscam.allocator`).
Neither synchronises with the device: a step leaves its results on the device, and the one host sync of a
call is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["ChunkBuffer", "run_chunks"]


def run_chunks(total: int, size: int, step: Callable[[slice], None]) -> int:
    """Call ``step(rows)`` for consecutive slices ``rows`` of ``range(total)``, ``size`` rows at a time.

    On ``torch.cuda.OutOfMemoryError`` the chunk size is halved and the same rows are retried, down to one
    row (then the error propagates). ``step`` must therefore keep nothing of a chunk that failed: it stores
    its results only once its forward has returned. Returns the chunk size that worked last (``size`` when
    nothing ran out of memory), for the caller to keep for its next call.
    """
    _check_count("total", total, minimum=0)
    _check_count("size", size, minimum=1)
    start = 0
    while start < total:
        rows = slice(start, min(start + size, total))
        try:
            step(rows)
        except torch.cuda.OutOfMemoryError:
            if size <= 1:
                raise
            torch.cuda.empty_cache()
            size //= 2
            continue
        start = rows.stop
    return size


class ChunkBuffer:
    """Scratch rows ``[capacity, *shape]`` that the chunks of one call fill in place.

    :meth:`take` returns the first ``rows`` rows as a view, allocating only when a chunk needs more rows
    than any chunk before it (so once per call: the first chunk is the largest). The contents are whatever
    the previous chunk left: the caller overwrites every element it reads. A forward must be done with a
    chunk before the next chunk is written, which holds for the sequential chunk loop of
    :func:`run_chunks` (on CUDA the writes are ordered on the same stream).

    Args:
        shape: the shape of one row (e.g. ``(3, H, W)`` for an input image).
        dtype, device: of the buffer.
        memory_format: ``torch.channels_last`` for 4-D rows laid out as the model wants them (a view of the
            first rows of a channels-last buffer is itself channels-last).
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        self.shape = tuple(shape)
        self.dtype = dtype
        self.device = torch.device(device)
        self.memory_format = memory_format
        self._rows: Tensor | None = None

    @property
    def capacity(self) -> int:
        """Rows allocated so far (0 before the first :meth:`take`)."""
        return 0 if self._rows is None else self._rows.shape[0]

    def take(self, rows: int) -> Tensor:
        """The first ``rows`` rows, ``[rows, *shape]``, with undefined contents."""
        _check_count("rows", rows, minimum=1)
        if rows > self.capacity:
            self._rows = None  # free the smaller buffer before allocating the larger one
            self._rows = torch.empty(
                (rows, *self.shape), dtype=self.dtype, device=self.device, memory_format=self.memory_format
            )
        assert self._rows is not None
        return self._rows[:rows]


def _check_count(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int number of rows, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
