"""Manifests validated before any image is read, and the ways to name a run's images (issues 11 and 12)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iscam import data
from iscam.data import (
    DataSourceError,
    ImageFolderDataset,
    ManifestDataset,
    ManifestError,
    ManifestProblem,
    Preprocess,
    find_data,
    iter_batches,
    open_dataset,
    parse_boxes,
)

HEADER = "file,label,width,height,boxes"
GOOD = "a.png,7,10,10,1 2 6 8"  # line 2 of every manifest below
TINY = Preprocess(10, "stretch")  # 10x10 images stay 10x10: boxes come back unchanged


def _manifest(folder: Path, *rows: str, name: str = "manifest.csv") -> Path:
    path = folder / name
    path.write_text("\n".join([HEADER, *rows]) + "\n", encoding="utf-8")
    return path


def _image(path: Path, size: tuple[int, int] = (10, 10), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


# --- one bad row of each kind: the error names the manifest, the line, the file and the problem


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ("b.png,1000,10,10,", "label 1000 is outside 0..999"),
        ("b.png,-1,10,10,", "label -1 is outside 0..999"),
        ("b.png,5.0,10,10,", "label '5.0' is not an integer"),
        ("b.png,cat,10,10,", "label 'cat' is not an integer"),
        ("b.png,1,0,10,", "width '0' is not a positive integer"),
        ("b.png,1,10,-3,", "height '-3' is not a positive integer"),
        ("b.png,1,22.5,10,", "width '22.5' is not a positive integer"),
        ("b.png,1,10,10,5 1 2 9", "box 1 '5 1 2 9': inverted or empty"),
        ("b.png,1,10,10,1 2 6 8;1 9 6 3", "box 2 '1 9 6 3': inverted or empty"),
        ("b.png,1,10,10,1 1 1 5", "box 1 '1 1 1 5': inverted or empty"),
        ("b.png,1,10,10,nan 1 5 5", "box 1 'nan 1 5 5': NaN or infinite coordinate"),
        ("b.png,1,10,10,0 0 inf 5", "box 1 '0 0 inf 5': NaN or infinite coordinate"),
        ("b.png,1,10,10,12 1 15 5", "box 1 '12 1 15 5': entirely outside the 10x10 image"),
        ("b.png,1,10,10,-8 1 0 5", "box 1 '-8 1 0 5': entirely outside the 10x10 image"),
        ("b.png,1,10,10,1 2 3", "box 1 '1 2 3': a box needs 4 numbers"),
        ("b.png,1,10,10,1 2 x 4", "box 1 '1 2 x 4': not a number"),
        ("b.png,1,10,10,1 2 6 8;", "box 2 '': a box needs 4 numbers"),
        ("b.png,1,10,10", "4 fields, the header has 5 (no boxes cell; an empty boxes cell means no boxes)"),
        ("b.png,1,10,10,,extra", "6 fields, the header has 5"),
        (",1,10,10,", "empty file name"),
        ("a.png,3,10,10,", "duplicate of line 2 (the same file twice)"),
        ("./a.png,3,10,10,", "duplicate of line 2 (the same file twice)"),
    ],
)
def test_each_bad_row_is_named_by_file_line_and_problem(tmp_path: Path, row: str, problem: str) -> None:
    manifest = _manifest(tmp_path, GOOD, row)
    with pytest.raises(ManifestError) as caught:
        ManifestDataset(manifest, TINY)
    file = row.split(",")[0]
    assert caught.value.problems == [ManifestProblem(3, file, caught.value.problems[0].message)]
    assert problem in caught.value.problems[0].message
    text = str(caught.value)
    assert (
        str(manifest) in text and (f"line 3 ({file}): " if file else "line 3: ") in text and problem in text
    )
    assert "1 bad row(s) of 2" in text and "on_bad_rows='skip'" in text
    assert isinstance(caught.value, ValueError)  # the CLI's "bad input" family


def test_every_problem_of_the_file_at_once_with_a_cap(tmp_path: Path) -> None:
    rows = [GOOD, "b.png,1000,0,10,", "c.png,1,10,10,", "d.png,2,10,10,9 9 1 1"]
    rows += [f"x{i}.png,{1000 + i},10,10," for i in range(22)]
    with pytest.raises(ManifestError) as caught:
        ManifestDataset(_manifest(tmp_path, *rows), TINY)
    problems = caught.value.problems
    assert [p.line for p in problems] == [3, 5] + list(range(6, 28))
    # two problems of one row are one entry, joined
    assert problems[0] == ManifestProblem(
        3,
        "b.png",
        "label 1000 is outside 0..999 (a torchvision class index); width '0' is not a positive integer",
    )
    text = str(caught.value)
    assert "24 bad row(s) of 26" in text
    assert text.count("\n  line ") == 20 and text.endswith("\n  ... and 4 more")
    assert "line 23 (x17.png)" in text and "x18.png" not in text  # the 20th shown, the 21st left out


def test_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text(f"{HEADER}\n{GOOD}\n\n\nb.png,1,10,0,\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"line 5 \(b.png\): height '0'"):
        ManifestDataset(path, TINY)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "line 1: the file is empty; expected the header file,label,width,height,boxes"),
        (b"\n\n", "line 1: the file is empty"),
        (HEADER.encode() + b"\n", "line 2: has no rows (only the header)"),
        (b"file,label\na.png,1\n", "line 1: lacks column(s) width, height, boxes"),
        (b"file,label,width,height,boxes,label\n", "line 1: column(s) label appear more than once"),
        (HEADER.encode() + b"\na.png,1,10,10,\nb\xff.png,1,10,10,\n", "line 3: is not UTF-8 text"),
    ],
)
def test_whole_file_problems(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(content)
    for policy in ("error", "skip"):  # never skippable
        with pytest.raises(ManifestError, match=re.escape(message)) as caught:
            ManifestDataset(path, TINY, on_bad_rows=policy)
        assert str(caught.value).startswith(f"manifest {path}, line ")
        assert len(caught.value.problems) == 1 and caught.value.problems[0].file == ""


def test_a_spreadsheet_byte_order_mark_is_not_part_of_the_header(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(b"\xef\xbb\xbf" + f"{HEADER}\n{GOOD}\n".encode())
    assert ManifestDataset(path, TINY).files == ["a.png"]


def test_empty_boxes_cell_means_no_boxes_and_partly_outside_boxes_are_clipped(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        _image(tmp_path / name)
    manifest = _manifest(tmp_path, GOOD, "b.png,8,10,10,", "c.png,9,10,10,-5 2 15 8;  ;")
    with pytest.raises(ManifestError, match=r"line 4 \(c.png\): box 2 '': a box needs 4 numbers"):
        ManifestDataset(manifest, TINY)
    manifest = _manifest(tmp_path, GOOD, "b.png,8,10,10,   ", "c.png,9,10,10,-5 2 15 8")
    dataset = ManifestDataset(manifest, TINY)
    assert dataset.skipped_rows == [] and dataset.has_labels and dataset.has_boxes
    assert dataset[1].boxes.shape == (0, 4)  # no boxes: the pointing game is skipped for this image
    torch.testing.assert_close(dataset[2].boxes, torch.tensor([[0.0, 2.0, 10.0, 8.0]]))  # clipped, kept
    none = ManifestDataset(_manifest(tmp_path, "a.png,7,10,10,", name="none.csv"), TINY)
    assert not none.has_boxes


def test_skip_keeps_the_good_rows_and_records_the_bad(tmp_path: Path) -> None:
    for name in ("a.png", "c.png", "e.png"):
        _image(tmp_path / name)
    manifest = _manifest(
        tmp_path,
        GOOD,
        "b.png,1000,10,10,",
        "c.png,2,10,10,",
        "a.png,3,10,10,",
        "d.png,1,10,10,0 0 1",
        "e.png,4,10,10,",
    )
    dataset = ManifestDataset(manifest, TINY, on_bad_rows="skip")
    assert dataset.files == ["a.png", "c.png", "e.png"] and dataset.labels == [7, 2, 4]
    assert [(p.line, p.file) for p in dataset.skipped_rows] == [(3, "b.png"), (5, "a.png"), (6, "d.png")]
    assert "duplicate of line 2" in dataset.skipped_rows[1].message
    assert [b.files for b in iter_batches(dataset, 3)] == [["a.png", "c.png", "e.png"]]
    assert ManifestDataset(manifest, TINY, on_bad_rows="skip", limit=2).files == ["a.png", "c.png"]
    with pytest.raises(ManifestError, match=r"all 2 row\(s\) are bad") as caught:
        ManifestDataset(
            _manifest(tmp_path, "b.png,1000,10,10,", "c.png,1,0,1,", name="bad.csv"), TINY, on_bad_rows="skip"
        )
    assert [p.line for p in caught.value.problems] == [2, 3]


def test_bad_policy_and_limit_fail_before_reading(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, GOOD)
    with pytest.raises(ValueError, match="on_bad_rows must be 'error' or 'skip', got 'drop'"):
        ManifestDataset(manifest, TINY, on_bad_rows="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on_bad_rows must be"):
        open_dataset("does-not-matter", TINY, on_bad_rows="warn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        ManifestDataset(manifest, TINY, limit=0)
    with pytest.raises(FileNotFoundError, match="is a folder"):
        ManifestDataset(tmp_path, TINY)


def test_parse_boxes_refuses_what_the_manifest_refuses() -> None:
    torch.testing.assert_close(
        parse_boxes(" 1 2 3 4 ;5 6 7.5 8"), torch.tensor([[1, 2, 3, 4], [5, 6, 7.5, 8]])
    )
    for text, message in [("4 2 3 8", "inverted"), ("1 2 nan 4", "NaN"), ("1 2 3", "4 numbers")]:
        with pytest.raises(ValueError, match=message):
            parse_boxes(text)


@pytest.mark.parametrize("name", ["imagenet-val-sample", "imagenet-val-scorecam9"])
def test_the_shared_manifests_validate_cleanly(assets: Path, name: str) -> None:
    dataset = ManifestDataset(assets / name / "manifest.csv", Preprocess(224))
    assert dataset.skipped_rows == []
    assert len(dataset) == {"imagenet-val-sample": 300, "imagenet-val-scorecam9": 9}[name]
    assert all(len(b) > 0 for b in dataset.boxes) and dataset.has_boxes


# --- naming the images: a CSV, a folder with manifest.csv, a name under the data root, a folder of images


@pytest.fixture
def jpeg_folder(assets: Path, tmp_path: Path) -> Path:
    """Three of the sample JPEGs, copied (under new names) into a folder without a manifest."""
    folder = tmp_path / "mine"
    folder.mkdir()
    sources = sorted((assets / "imagenet-val-sample").glob("*.JPEG"))[:3]
    for source, name in zip(sources, ["b.jpg", "C.JPG", "a.jpeg"]):
        shutil.copy(source, folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "._a.jpeg").write_bytes(b"AppleDouble metadata, not an image")
    (folder / "sub").mkdir()
    shutil.copy(sources[0], folder / "sub" / "nested.jpg")
    return folder


def test_find_data_every_form(assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sample = assets / "imagenet-val-sample"
    assert find_data(sample / "manifest.csv") == data.DataSource(sample / "manifest.csv", sample)
    assert find_data(sample) == data.DataSource(sample / "manifest.csv", sample)  # a folder with manifest.csv
    assert find_data("imagenet-val-sample", assets) == data.DataSource(sample / "manifest.csv", sample)
    monkeypatch.setenv("ISCAM_DATA", str(assets))
    assert find_data("imagenet-val-scorecam9").manifest == assets / "imagenet-val-scorecam9" / "manifest.csv"
    # relative: the working directory first
    (tmp_path / "imagenet-val-sample").mkdir()
    mine = _manifest(tmp_path / "imagenet-val-sample", GOOD)
    monkeypatch.chdir(tmp_path)
    assert find_data("imagenet-val-sample", assets).manifest == mine
    assert find_data("imagenet-val-sample/manifest.csv", assets).manifest == mine
    images = tmp_path / "photos"
    images.mkdir()
    _image(images / "x.png")
    assert find_data("photos") == data.DataSource(None, images)


def test_find_data_errors_say_what_was_tried(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataSourceError) as caught:
        find_data("imagenet-val-smaple", assets)
    text = str(caught.value)
    assert f"no {tmp_path / 'imagenet-val-smaple'} (relative to the working directory)" in text
    assert f"nor {assets / 'imagenet-val-smaple'} (under the data root" in text
    assert "imagenet-val-sample/" in text and "models/" in text  # what the data root does hold
    with pytest.raises(
        DataSourceError, match="manifest '/absent/m.csv' not found: /absent/m.csv does not exist"
    ):
        find_data("/absent/m.csv", assets)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "sub").mkdir()
    _image(tmp_path / "empty" / "sub" / "deep.png")
    with pytest.raises(DataSourceError, match=r"holds neither manifest.csv nor image files .*subfolders"):
        find_data("empty")
    _image(tmp_path / "one.png")
    with pytest.raises(DataSourceError, match=r"is an image .* give the folder"):
        find_data("one.png")
    with pytest.raises(ValueError, match="manifest is empty"):
        find_data("  ")
    with pytest.raises(TypeError, match="got int"):
        find_data(3)  # type: ignore[arg-type]


def test_a_data_root_is_needed_only_for_a_name_under_it(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data root holding only models/ serves an explicit manifest path, and says so for a name under it."""
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(assets / "imagenet-val-scorecam9", elsewhere)
    dataset = open_dataset(str(elsewhere / "manifest.csv"), TINY, data_root=root)
    assert isinstance(dataset, ManifestDataset) and len(dataset) == 9
    assert open_dataset(elsewhere, TINY, data_root=root).files == dataset.files
    with pytest.raises(DataSourceError, match=r"under the data root, which holds: models/\)"):
        open_dataset("imagenet-val-sample", TINY, data_root=root)
    # no data root at all: an existing path works, a name says that a data root is needed
    monkeypatch.delenv("ISCAM_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    assert len(open_dataset("elsewhere", TINY)) == 9
    with pytest.raises(DataSourceError, match=r"no data root is set to look under \(set \$ISCAM_DATA"):
        open_dataset("imagenet-val-sample", TINY)
    with pytest.raises(DataSourceError, match="root/absent.*is not an existing folder"):
        open_dataset("imagenet-val-sample", TINY, data_root=tmp_path / "root" / "absent")


def test_open_dataset_on_a_folder_of_jpegs_without_a_manifest(jpeg_folder: Path) -> None:
    dataset = open_dataset(str(jpeg_folder), Preprocess(32, "stretch"))
    assert isinstance(dataset, ImageFolderDataset)
    # sorted by name (string order: upper case first); no .txt, no hidden file, no subfolder
    assert dataset.files == ["C.JPG", "a.jpeg", "b.jpg"]
    assert not dataset.has_labels and not dataset.has_boxes and dataset.source == jpeg_folder
    (batch,) = list(iter_batches(dataset, 8))
    assert batch.files == ["C.JPG", "a.jpeg", "b.jpg"] and batch.x.shape == (3, 3, 32, 32)
    assert batch.labels.tolist() == [data.UNKNOWN_LABEL] * 3 == [-1, -1, -1]
    assert [b.shape for b in batch.boxes] == [(0, 4)] * 3
    expected = Preprocess(32, "stretch")(Image.open(jpeg_folder / "a.jpeg").convert("RGB"))
    torch.testing.assert_close(batch.x[1], expected, atol=0, rtol=0)
    with pytest.raises(
        ValueError, match="image_dir 'x' is given, but .* is a folder of images without manifest"
    ):
        open_dataset(str(jpeg_folder), TINY, image_dir="x")


def test_image_folder_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="is not an existing folder"):
        ImageFolderDataset(tmp_path / "absent", TINY)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataSourceError, match=r"holds no image files \(.bmp, .jpeg, .jpg, .png, .webp"):
        ImageFolderDataset(tmp_path, TINY)


def test_open_dataset_image_dir_is_looked_up_like_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    (root / "pictures").mkdir(parents=True)
    _image(root / "pictures" / "a.png")
    manifest = _manifest(tmp_path, GOOD, name="list.csv")
    monkeypatch.chdir(tmp_path)
    dataset = open_dataset("list.csv", TINY, data_root=root, image_dir="pictures")  # under the data root
    assert isinstance(dataset, ManifestDataset) and dataset.image_dir == root / "pictures"
    assert dataset.manifest == manifest and dataset[0].label == 7
    (tmp_path / "pictures").mkdir()  # the working directory first
    assert (
        open_dataset("list.csv", TINY, data_root=root, image_dir="pictures").image_dir
        == tmp_path / "pictures"
    )
    with pytest.raises(DataSourceError, match="image folder 'list.csv' .* is not a folder"):
        open_dataset("list.csv", TINY, image_dir="list.csv")
    with pytest.raises(DataSourceError, match="image folder 'nope' not found"):
        open_dataset("list.csv", TINY, data_root=root, image_dir="nope")
    bad = _manifest(tmp_path, GOOD, "b.png,1000,10,10,", name="bad.csv")
    with pytest.raises(ManifestError, match=r"line 3 \(b.png\)"):
        open_dataset(bad, TINY)
    assert open_dataset(bad, TINY, on_bad_rows="skip").skipped_rows[0].line == 3
