"""The results store: atomic, verified, shared files (:mod:`iscam.store`)."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
from pathlib import Path

import pandas as pd
import pytest

from iscam.store import KEY_COLUMNS, ResultsStore, StoreBusyError, StoreError, atomic_write_bytes


def _rows(files: list[str], method: str = "gradcam", value: float = 0.5) -> list[dict]:
    rows = []
    for i, file in enumerate(files):
        row = dict(zip(KEY_COLUMNS, (file, "m", "default", "crop", "layer", "fp32", method, "{}", "{}")))
        row.update(index=i, label=1, target=1, correct=True, y=0.9, o=value, drop=0.1, increase=0.0, change=0.1,
                   insertion_auc=0.4, deletion_auc=0.2, pointing=0.3, pointing_skip="",
                   insertion_curve=[0.1, 0.2], deletion_curve=[0.3, 0.1], map=[0.5, -1.0], map_shape=[1, 2],
                   method_seconds=0.1, metric_seconds=0.2, forward_count=1, metric_forward_count=4, rank=0)
        rows.append(row)
    return rows


def test_store_parts_are_atomic_and_readers_ignore_leftover_temporary_files(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "res")
    assert not store.exists() and store.read().empty and store.keys().empty
    store.write_part(_rows(["a", "b"]))
    store.write_part(_rows(["c"], method="iscam"))
    # what a writer killed mid-write leaves behind: a partial temporary file
    (store.parts_dir / ".part-r000-x.parquet.abc.tmp").write_bytes(b"PAR1 truncated")
    frame = store.read()
    assert list(frame["file"]) == ["a", "b", "c"] and list(frame["method"]) == ["gradcam", "gradcam", "iscam"]
    assert list(frame["insertion_curve"][0]) == [0.1, 0.2] and list(frame["map"][0]) == [0.5, -1.0]
    assert len(store.keys()) == 3
    with pytest.raises(StoreError, match="same key twice"):
        store.write_part(_rows(["a", "a"]))
    store.compact()
    assert store.part_files() == [] and len(store.merged_files()) == 1
    assert not list(store.parts_dir.glob("*.tmp"))
    pd.testing.assert_frame_equal(store.read(), frame)


def test_newer_rows_win_and_a_killed_compaction_leaves_only_duplicates(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.write_part(_rows(["a", "b"], value=0.5))
    store.write_part(_rows(["a"], value=0.7))  # a stale row recomputed
    assert store.read().set_index("file")["o"].to_dict() == {"a": 0.7, "b": 0.5}
    store.compact()
    store.write_part(_rows(["b"], value=0.9))
    # a compaction killed between writing the merged file and deleting what it merged
    merged = store.merged_files()[0]
    copy = merged.with_name(merged.name.replace("results-", "results-0"))  # an older merged file
    assert store.read().set_index("file")["o"].to_dict() == {"a": 0.7, "b": 0.9}
    del copy


def test_a_row_recomputed_by_rank_0_wins_over_the_stale_row_rank_1_wrote_earlier(tmp_path: Path) -> None:
    """Newer rows win by write time, whatever rank wrote them ("part-r001-..." sorts after "part-r000-")."""
    ResultsStore(tmp_path, rank=1).write_part(_rows(["a", "b"], value=0.25))  # a torchrun worker, earlier
    ResultsStore(tmp_path, rank=0).write_part(_rows(["a"], value=0.75))  # --recompute-stale in one process
    assert ResultsStore(tmp_path).read().set_index("file")["o"].to_dict() == {"a": 0.75, "b": 0.25}
    store = ResultsStore(tmp_path)
    store.compact()
    ResultsStore(tmp_path, rank=3).write_part(_rows(["b"], value=0.5))  # after the merged file: wins too
    assert ResultsStore(tmp_path).read().set_index("file")["o"].to_dict() == {"a": 0.75, "b": 0.5}


def test_a_store_folder_that_is_a_file_is_named_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "S").write_text("x")
    with pytest.raises(StoreError, match=rf"the results folder {tmp_path / 'S'} is a file, not a folder"):
        ResultsStore(tmp_path / "S").check_writable()


def test_a_flipped_byte_anywhere_in_a_part_is_detected_with_the_command_that_recomputes_it(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    path = store.write_part(_rows(["a", "b", "c"]))
    store.write_provenance({"command": "iscam run smoke --out S"}, history=False)
    data = bytearray(path.read_bytes())
    for position in (10, len(data) // 2, len(data) - 12):  # a data page, the middle, the footer
        broken = bytearray(data)
        broken[position] ^= 0x01
        path.write_bytes(bytes(broken))
        with pytest.raises(StoreError, match=rf"{path.name} is corrupt.*mv .*\.corrupt.*iscam run smoke --out S"):
            store.read()
    path.write_bytes(bytes(data))
    assert len(store.read()) == 3


def test_files_honour_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store = ResultsStore(tmp_path / "s")
        part = store.write_part(_rows(["a"]))
        store.write_provenance({"run": 1})
        atomic_write_bytes(tmp_path / "figure.png", b"png")
        for path in (part, store.run_json, store.history_path, tmp_path / "figure.png"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
        os.umask(0o077)
        private = store.write_part(_rows(["b"]))
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_provenance_keeps_history_and_a_truncated_run_json_names_the_file(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.write_provenance({"run": 1})
    store.write_provenance({"run": 2})
    assert store.provenance() == {"run": 2}
    assert [record["run"] for record in store.history()] == [1, 2]
    store.run_json.write_text('{"run": 2, "conf')
    with pytest.raises(StoreError, match=rf"{store.run_json} is not a valid run record"):
        store.provenance()


def _append(folder: str, writer: int, count: int) -> None:
    store = ResultsStore(folder)
    for i in range(count):
        store.append_history({"writer": writer, "i": i, "padding": "x" * 500})


def test_six_concurrent_history_writers_keep_every_line(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append, args=(str(tmp_path), w, 200)) for w in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    records = ResultsStore(tmp_path).history()
    assert len(records) == 1200
    assert sorted((r["writer"], r["i"]) for r in records) == [(w, i) for w in range(6) for i in range(200)]


def _hold_lock(folder: str, ready: multiprocessing.synchronize.Event,
               release: multiprocessing.synchronize.Event) -> None:
    store = ResultsStore(folder)
    with store.lock(owner="iscam run smoke"):
        (Path(folder) / ".part-r000-inflight.parquet.x.tmp").write_bytes(b"in flight")
        ready.set()
        release.wait(60)


def test_the_lock_keeps_a_second_writer_and_compact_out(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        store = ResultsStore(tmp_path)
        busy = pytest.raises(StoreBusyError, match=r"in use by pid \d+: iscam run smoke")
        with busy, store.lock(wait=False):
            pass
        with pytest.raises(StoreBusyError):
            store.compact()
        assert (tmp_path / ".part-r000-inflight.parquet.x.tmp").exists()  # a running writer's file survives
    finally:
        release.set()
        holder.join(timeout=60)
    waited = []
    with ResultsStore(tmp_path).lock(on_wait=waited.append):
        pass
    assert waited == []  # free again: no wait


def test_an_unwritable_store_fails_before_any_work_naming_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):  # root ignores permissions
            pytest.skip("running as root: a read-only folder is writable")
        with pytest.raises(StoreError, match=rf"cannot write to the results folder {folder}"):
            ResultsStore(folder).check_writable()
        with pytest.raises(OSError, match=rf"cannot write {folder / 'x.bin'}"):
            atomic_write_bytes(folder / "x.bin", b"x")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_tables_other_than_the_rows_have_their_own_keys(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.write_part([{"file": "a", "model": "m", "resize": "crop", "png": b"\x89PNG"}], table="images")
    assert store.read(table="images")["png"].tolist() == [b"\x89PNG"]
    with pytest.raises(StoreError, match="unknown table 'imgs'"):
        store.read(table="imgs")
    with pytest.raises(StoreError, match="lack the key columns"):
        store.write_part([{"file": "a"}], table="images")
    assert json.loads(json.dumps(store.keys("images").to_dict("records"))) == [
        {"file": "a", "model": "m", "resize": "crop"}]
