"""iscam.batching: the chunk loop (order, out-of-memory halving) and the reusable chunk buffer."""

from __future__ import annotations

import pytest
import torch

from iscam.batching import ChunkBuffer, run_chunks


def test_chunks_cover_the_rows_in_order() -> None:
    seen: list[tuple[int, int]] = []
    assert run_chunks(10, 4, lambda rows: seen.append((rows.start, rows.stop))) == 4
    assert seen == [(0, 4), (4, 8), (8, 10)]
    assert run_chunks(0, 4, lambda rows: seen.append((rows.start, rows.stop))) == 4
    assert len(seen) == 3  # nothing to do: no call
    seen.clear()
    assert run_chunks(3, 100, lambda rows: seen.append((rows.start, rows.stop))) == 100
    assert seen == [(0, 3)]


def test_out_of_memory_halves_and_retries_the_same_rows() -> None:
    tried: list[tuple[int, int]] = []
    done: list[tuple[int, int]] = []

    def step(rows: slice) -> None:
        tried.append((rows.start, rows.stop))
        if rows.stop - rows.start > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        done.append((rows.start, rows.stop))

    assert run_chunks(7, 16, step) == 2  # 16 -> 8 -> 4 -> 2
    assert tried[:3] == [(0, 7), (0, 7), (0, 4)]
    assert done == [(0, 2), (2, 4), (4, 6), (6, 7)]


def test_out_of_memory_on_one_row_propagates() -> None:
    def step(rows: slice) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_chunks(5, 4, step)


def test_other_errors_are_not_retried() -> None:
    calls = []

    def step(rows: slice) -> None:
        calls.append(rows)
        raise RuntimeError("a bug in the step")

    with pytest.raises(RuntimeError, match="a bug"):
        run_chunks(5, 4, step)
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("total", "size", "error", "message"),
    [
        (-1, 4, ValueError, "total must be >= 0"),
        (2.0, 4, TypeError, "total must be an int"),
        (True, 4, TypeError, "total must be an int"),
        (5, 0, ValueError, "size must be >= 1"),
        (5, None, TypeError, "size must be an int"),
    ],
)
def test_run_chunks_rejects_bad_counts(total, size, error, message) -> None:
    with pytest.raises(error, match=message):
        run_chunks(total, size, lambda rows: None)


def test_buffer_allocates_once_for_the_largest_chunk() -> None:
    buffer = ChunkBuffer((3, 2, 2), torch.float64, "cpu")
    assert buffer.capacity == 0
    first = buffer.take(4)
    assert first.shape == (4, 3, 2, 2) and first.dtype == torch.float64 and first.is_contiguous()
    first.fill_(1.0)
    last = buffer.take(2)  # the shorter last chunk: a view of the same memory
    assert last.shape == (2, 3, 2, 2) and last.data_ptr() == first.data_ptr() and buffer.capacity == 4
    assert torch.equal(last, torch.ones(2, 3, 2, 2, dtype=torch.float64))  # contents are left as they were
    grown = buffer.take(6)
    assert grown.shape == (6, 3, 2, 2) and buffer.capacity == 6


def test_channels_last_buffer_gives_channels_last_views() -> None:
    buffer = ChunkBuffer((3, 4, 5), torch.float32, "cpu", torch.channels_last)
    buffer.take(8)
    view = buffer.take(3)
    assert view.shape == (3, 3, 4, 5)
    assert view.is_contiguous(memory_format=torch.channels_last) and not view.is_contiguous()


@pytest.mark.parametrize(("rows", "error"), [(0, ValueError), (-2, ValueError), (1.0, TypeError)])
def test_buffer_rejects_bad_row_counts(rows, error) -> None:
    with pytest.raises(error, match="rows must"):
        ChunkBuffer((2,), torch.float32, "cpu").take(rows)
