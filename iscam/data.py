"""The images a run reads: found, checked before any is read, and preprocessed as the model expects.

Three sources, all yielding :class:`Sample` s (the normalised tensor, the torchvision class index, the boxes
mapped into the network's input frame, and the file name):

- a manifest CSV (``file,label,width,height,boxes``, as in the shared assets'
  ``imagenet-val-sample/manifest.csv``): :class:`ManifestDataset`, every row validated up front;
- a folder of your own images without a manifest: :class:`ImageFolderDataset` (labels and boxes unknown);
- the official layout (``ILSVRC2012_val_*.JPEG`` + the per-image XML files of ``ILSVRC2012_bbox_val_v3``):
  :class:`ImageNetValDataset`.

:func:`open_dataset` is the runner's one entry point: it turns the text of ``data.manifest`` into one of the
first two (see :func:`find_data` for how the text is looked up).

**Box convention.** Boxes are ``(x0, y0, x1, y1)`` in continuous pixel coordinates, ``x`` along columns: pixel
``(row j, column i)`` is the unit square ``[i, i+1) x [j, j+1)`` with centre ``(i + 0.5, j + 0.5)``, and a box
covers ``[x0, x1) x [y0, y1)``. Rasterise a box as the pixels whose centres lie inside it,
``x0 <= i + 0.5 < x1`` and ``y0 <= j + 0.5 < y1``. Resizing scales these coordinates by
``new_size / old_size`` (what PIL's resampling does to pixel centres) and cropping subtracts the offset, so a
mapped box lies exactly over the same image content.

Images of any mode (greyscale, CMYK, RGBA, palette) become RGB as in torchvision's default loader
(``Image.convert("RGB")``; alpha is dropped). An image that cannot be read (missing, a folder, truncated, not
an image, or a possible decompression bomb) raises :class:`UnreadableImageError`; :func:`iter_batches` logs it
by name on ``logging.getLogger("iscam.data")`` and goes on.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from numbers import Integral
from pathlib import Path
from typing import ClassVar, Literal, NamedTuple, Protocol, get_args

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from iscam import paths

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGENET_VAL_BOXES",
    "IMAGENET_VAL_IMAGES",
    "IMAGE_SUFFIXES",
    "MANIFEST_COLUMNS",
    "MANIFEST_NAME",
    "NUM_CLASSES",
    "UNKNOWN_LABEL",
    "Batch",
    "BoxAnnotation",
    "DataSource",
    "DataSourceError",
    "ImageFolderDataset",
    "ImageNetValDataset",
    "ManifestDataset",
    "ManifestError",
    "ManifestProblem",
    "OnBadRows",
    "Preprocess",
    "Sample",
    "UnreadableImageError",
    "find_data",
    "format_boxes",
    "imagenet_wnids",
    "iter_batches",
    "load_image",
    "open_dataset",
    "parse_boxes",
    "read_bbox_xml",
    "sample_manifest",
]

log = logging.getLogger("iscam.data")

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
MANIFEST_COLUMNS: tuple[str, ...] = ("file", "label", "width", "height", "boxes")
#: The file a folder must hold to be read as a manifest (otherwise its images are read without one).
MANIFEST_NAME = "manifest.csv"
#: Image files :class:`ImageFolderDataset` reads (compared case-insensitively).
IMAGE_SUFFIXES: tuple[str, ...] = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
#: ILSVRC2012 classes; a manifest label is a torchvision class index ``0 .. NUM_CLASSES - 1``.
NUM_CLASSES = 1000
#: :attr:`Sample.label` of an image whose class is not known (:class:`ImageFolderDataset`).
UNKNOWN_LABEL = -1
#: What :class:`ManifestDataset` does with a bad row: raise :class:`ManifestError`, or drop it and record it.
OnBadRows = Literal["error", "skip"]
_ON_BAD_ROWS: tuple[str, ...] = get_args(OnBadRows)
#: How many problems a :class:`ManifestError` message lists before "... and N more".
_REPORTED_PROBLEMS = 20
#: Where the official ImageNet validation files are expected under a data root (override with arguments).
IMAGENET_VAL_IMAGES = "ILSVRC2012_img_val"
IMAGENET_VAL_BOXES = "ILSVRC2012_bbox_val_v3/val"


class UnreadableImageError(OSError):
    """An image file that is missing, a folder, truncated, not an image or too large; the message names it."""


class DataSourceError(FileNotFoundError):
    """A manifest or image-folder text that names nothing usable; the message says what was tried."""


class ManifestProblem(NamedTuple):
    """One bad line of a manifest: all that is wrong with it, joined by ``"; "``."""

    line: int  #: line of the CSV file, 1-based (the header is line 1)
    file: str  #: the row's ``file`` cell ("" for a problem of the whole file)
    message: str


class ManifestError(ValueError):
    """A manifest that cannot be used as it is; ``problems`` lists every bad line (``(line, file, message)``).

    The message names the manifest and lists the first problems with their line numbers, then
    "... and N more"; :attr:`problems` holds them all.
    """

    def __init__(
        self, manifest: str | os.PathLike[str], problems: Sequence[ManifestProblem], summary: str = ""
    ) -> None:
        self.manifest = Path(manifest)
        self.problems: list[ManifestProblem] = list(problems)
        if not summary and len(self.problems) == 1 and not self.problems[0].file:
            text = f"manifest {self.manifest}, line {self.problems[0].line}: {self.problems[0].message}"
        else:
            shown = [
                f"  line {p.line}" + (f" ({p.file})" if p.file else "") + f": {p.message}"
                for p in self.problems[:_REPORTED_PROBLEMS]
            ]
            if len(self.problems) > _REPORTED_PROBLEMS:
                shown.append(f"  ... and {len(self.problems) - _REPORTED_PROBLEMS} more")
            text = "\n".join([f"manifest {self.manifest}: {summary}", *shown])
        super().__init__(text)


# --------------------------------------------------------------------------------------------------------
# Preprocessing


@dataclass(frozen=True)
class _Geometry:
    resized_width: int
    resized_height: int
    left: int
    top: int


class Preprocess:
    """Resize, crop, scale to [0, 1] and normalise a PIL image; map boxes the same way.

    ``resize="crop"`` (default, the authors' code): ``Resize(size)`` -- the shorter side to ``size``, the
    longer to ``int(size * long / short)`` as torchvision computes it -- then ``CenterCrop(size)`` with
    torchvision's offsets ``int(round((n - size) / 2))``. ``resize="stretch"`` (the paper's text): a plain
    ``size x size`` resize. Resampling is torchvision's ``Resize`` on a PIL image: bilinear with antialiasing
    (PIL's filter), so the uint8 image from :meth:`resize_image` is exactly what ``transforms.Resize`` +
    ``CenterCrop`` give.
    """

    def __init__(
        self,
        size: int = 224,
        resize: str = "crop",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if resize not in ("crop", "stretch"):
            raise ValueError(
                f"resize must be 'crop' (Resize + CenterCrop) or 'stretch' (plain resize), got {resize!r}"
            )
        if int(size) != size or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need three values (std > 0), got {mean!r}, {std!r}")
        self.size = int(size)
        self.resize = resize
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __repr__(self) -> str:
        return f"Preprocess(size={self.size}, resize={self.resize!r}, mean={self.mean}, std={self.std})"

    def geometry(self, width: int, height: int) -> _Geometry:
        """Resized size and crop offset for an image of ``width x height``."""
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        if self.resize == "stretch":
            return _Geometry(self.size, self.size, 0, 0)
        short, long = min(width, height), max(width, height)
        new_long = int(self.size * long / short)  # torchvision's _compute_resized_output_size
        new_w, new_h = (self.size, new_long) if width <= height else (new_long, self.size)
        return _Geometry(new_w, new_h, round((new_w - self.size) / 2.0), round((new_h - self.size) / 2.0))

    def resize_image(self, image: Image.Image) -> torch.Tensor:
        """The resized (and cropped) RGB image as uint8 ``[3, size, size]``: what a uint8 model is fed."""
        image = _to_rgb(image)
        geo = self.geometry(*image.size)
        image = TF.resize(
            image, [geo.resized_height, geo.resized_width], InterpolationMode.BILINEAR, antialias=True
        )
        if self.resize == "crop":
            image = TF.crop(image, geo.top, geo.left, self.size, self.size)
        return TF.pil_to_tensor(image)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 ``[..., 3, H, W]`` (or float in [0, 1]) -> normalised float32 (not in place)."""
        x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`, clamped to [0, 1] (for plots)."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x * std + mean).clamp(0.0, 1.0)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.resize_image(image))

    def map_boxes(self, boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Map ``[n, 4]`` boxes from an image of ``width x height`` into the ``size x size`` input frame.

        Coordinates are scaled by the resize factors, shifted by the crop offset and clipped to
        ``[0, size]``; boxes with zero width or height after clipping (outside the crop) are dropped, so the
        result has ``m <= n`` rows, in the input order. See the module docstring for the pixel convention.
        """
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        geo = self.geometry(width, height)
        scale = torch.tensor([geo.resized_width / width, geo.resized_height / height] * 2)
        offset = torch.tensor([geo.left, geo.top] * 2, dtype=torch.float32)
        mapped = (boxes * scale - offset).clamp(0.0, float(self.size))
        keep = (mapped[:, 2] > mapped[:, 0]) & (mapped[:, 3] > mapped[:, 1])
        return mapped[keep]


def _to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Read an image fully into memory as RGB; :class:`UnreadableImageError` (naming it) if that fails.

    A folder or a missing file is named as such. An image of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels
    (about 89 million by default) is refused as a possible decompression bomb, before its pixels are
    decoded: PIL only warns up to twice that limit, but no ImageNet-style image comes near it, and
    decoding one can exhaust the memory of the machine. Raise ``Image.MAX_IMAGE_PIXELS`` to read a large file
    you trust.
    """
    name = os.fspath(path)
    if os.path.isdir(name):
        raise UnreadableImageError(f"cannot read image {name!r}: it is a folder, not an image file")
    if not os.path.exists(name):
        raise UnreadableImageError(f"cannot read image {name!r}: the file does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(name) as image:
                image.load()
                return _to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImageError(_decompression_bomb_message(name, exc)) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImageError(f"cannot read image {name!r}: {exc}") from exc


def _decompression_bomb_message(name: str, exc: Exception) -> str:
    # PIL says "Image size (N pixels) exceeds limit of M pixels, ..." and has no attribute for N.
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(found.group(1)):,} pixels" if found else f"too many pixels ({exc})"
    return (
        f"cannot read image {name!r}: {size}, more than PIL's limit Image.MAX_IMAGE_PIXELS = "
        f"{Image.MAX_IMAGE_PIXELS:,} (a possible decompression bomb; raise the limit only for a file you "
        "trust)"
    )


# --------------------------------------------------------------------------------------------------------
# Samples and datasets


class Sample(NamedTuple):
    image: torch.Tensor  #: [3, H, W] normalised
    label: int  #: torchvision class index, or UNKNOWN_LABEL (-1) when the dataset has no labels
    boxes: torch.Tensor  #: [m, 4] float, (x0, y0, x1, y1) in input pixels, x = column; m = 0: none known
    file: str


class Batch(NamedTuple):
    x: torch.Tensor  #: [B, 3, H, W]
    labels: torch.Tensor  #: [B] long
    boxes: list[torch.Tensor]  #: B tensors [m_i, 4]
    files: list[str]
    indices: torch.Tensor  #: [B] long, positions in the dataset


class _Dataset(Protocol):
    files: list[str]
    has_labels: bool
    has_boxes: bool

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


def parse_boxes(text: str) -> torch.Tensor:
    """``"x0 y0 x1 y1;x0 y0 x1 y1"`` -> float32 ``[m, 4]`` (empty text -> ``[0, 4]``).

    :class:`ValueError` for a box that is not four finite numbers with ``x0 < x1`` and ``y0 < y1``.
    """
    boxes, problems = _parse_boxes(text, frame=None)
    if problems:
        raise ValueError("; ".join(problems))
    return boxes


def _parse_boxes(text: str | None, frame: tuple[int, int] | None) -> tuple[torch.Tensor, list[str]]:
    """Boxes of a manifest cell and what is wrong with them; ``frame = (width, height)`` if it is known."""
    text = (text or "").strip()
    rows: list[list[float]] = []
    problems: list[str] = []
    for number, part in enumerate(text.split(";") if text else [], start=1):
        fields = part.split()
        problem = ""
        if len(fields) != 4:
            problem = "a box needs 4 numbers 'x0 y0 x1 y1'"
        else:
            try:
                x0, y0, x1, y1 = box = list(map(float, fields))
            except ValueError:
                problem = "not a number"
            else:
                if not all(map(math.isfinite, box)):
                    problem = "NaN or infinite coordinate"
                elif x1 <= x0 or y1 <= y0:
                    problem = "inverted or empty (needs x0 < x1 and y0 < y1)"
                elif frame is not None and (x1 <= 0 or y1 <= 0 or x0 >= frame[0] or y0 >= frame[1]):
                    problem = f"entirely outside the {frame[0]}x{frame[1]} image"
                else:
                    rows.append(box)
        if problem:
            problems.append(f"box {number} {part.strip()!r}: {problem}")
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4), problems


def format_boxes(boxes: torch.Tensor | Sequence[Sequence[float]]) -> str:
    """Inverse of :func:`parse_boxes` (shortest exact decimal of each float)."""
    return ";".join(
        " ".join(f"{float(v):g}" for v in box) for box in torch.as_tensor(boxes).reshape(-1, 4).tolist()
    )


_INTEGER = re.compile(r"[+-]?[0-9]+")


def _integer(text: str | None) -> int | None:
    """The integer a cell holds (surrounding blanks allowed), else None: no '5.0', '1e3', '1_000'."""
    text = (text or "").strip()
    return int(text) if _INTEGER.fullmatch(text) else None


class _Row(NamedTuple):
    file: str
    label: int
    width: int
    height: int
    boxes: torch.Tensor


def _check_row(
    row: list[str], columns: dict[str, int], width_of_header: int
) -> tuple[_Row | None, list[str]]:
    """A manifest row (``columns``: name -> position) as values, or None and everything wrong with it."""
    problems: list[str] = []
    text = {c: row[i] if i < len(row) else None for c, i in columns.items()}
    if len(row) != width_of_header:
        absent = [c for c in MANIFEST_COLUMNS if text[c] is None]
        problems.append(
            f"{len(row)} fields, the header has {width_of_header}"
            + (f" (no {', '.join(absent)} cell; an empty boxes cell means no boxes)" if absent else "")
        )
    file = text["file"] or ""
    if text["file"] is not None and not file.strip():
        problems.append("empty file name")
    label = _integer(text["label"])
    if text["label"] is not None:
        if label is None:
            problems.append(f"label {text['label']!r} is not an integer")
        elif not 0 <= label < NUM_CLASSES:
            problems.append(f"label {label} is outside 0..{NUM_CLASSES - 1} (a torchvision class index)")
    size: list[int] = []
    for column in ("width", "height"):
        value = _integer(text[column])
        if text[column] is not None and (value is None or value <= 0):
            problems.append(f"{column} {text[column]!r} is not a positive integer")
        elif value is not None:
            size.append(value)
    frame = (size[0], size[1]) if len(size) == 2 else None
    boxes, box_problems = _parse_boxes(text["boxes"], frame)
    problems.extend(box_problems)
    if problems or label is None or frame is None:
        return None, problems
    return _Row(file, label, frame[0], frame[1], boxes), problems


def _read_manifest(manifest: Path) -> tuple[list[_Row], list[ManifestProblem]]:
    """Every good row, and every bad line; :class:`ManifestError` if the file as a whole is unusable."""

    def whole_file(line: int, message: str) -> ManifestError:
        return ManifestError(manifest, [ManifestProblem(line, "", message)])

    data = manifest.read_bytes()
    try:
        # utf-8-sig: a spreadsheet's byte-order mark would otherwise glue itself to the first column's name.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise whole_file(line, f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    good: list[_Row] = []
    bad: list[ManifestProblem] = []
    first_line: dict[str, int] = {}
    expected = ",".join(MANIFEST_COLUMNS)
    try:
        header = next((row for row in reader if row), None)  # blank lines are skipped, as csv.DictReader does
        if header is None:
            raise whole_file(1, f"the file is empty; expected the header {expected}")
        header_line = reader.line_num
        missing = [c for c in MANIFEST_COLUMNS if c not in header]
        if missing:
            raise whole_file(
                header_line,
                f"lacks column(s) {', '.join(missing)}; expected header {expected}, found {header}",
            )
        twice = sorted({c for c in header if header.count(c) > 1})
        if twice:
            raise whole_file(header_line, f"column(s) {', '.join(twice)} appear more than once in the header")
        columns = {c: header.index(c) for c in MANIFEST_COLUMNS}
        for row in reader:
            if not row:
                continue
            line = reader.line_num  # the row's last physical line: blank lines and quoted newlines count
            checked, problems = _check_row(row, columns, len(header))
            file = row[columns["file"]] if columns["file"] < len(row) else ""
            key = os.path.normpath(file.strip()) if file.strip() else ""
            if key in first_line:
                problems.append(f"duplicate of line {first_line[key]} (the same file twice)")
            elif key:
                first_line[key] = line
            if problems:
                bad.append(ManifestProblem(line, file, "; ".join(problems)))
            elif checked is not None:
                good.append(checked)
    except csv.Error as exc:
        raise whole_file(reader.line_num, f"is not a readable CSV file: {exc}") from exc
    if not good and not bad:
        raise whole_file(header_line + 1, "has no rows (only the header)")
    return good, bad


class ManifestDataset:
    """Images listed in a manifest CSV with columns ``file,label,width,height,boxes``, validated up front.

    ``label`` is the torchvision class index; ``boxes`` are ``x0 y0 x1 y1`` separated by ``;``, in the pixel
    frame of a ``width x height`` image (see the module docstring); if the file on disk has another size,
    the boxes are rescaled to it first. ``image_dir`` defaults to the manifest's folder; ``limit`` keeps the
    first (good) rows only. Other columns are allowed and ignored.

    **Validation.** The whole file is read and checked when the dataset is built, before any image is read;
    every bad line is reported at once as a :class:`ManifestError`, each with its line number and file:

    - the file is empty, not UTF-8 CSV, has no rows, lacks a column or repeats one (always an error);
    - a row with more or fewer fields than the header (a row that ends before its ``boxes`` cell is
      malformed: "no boxes" is an *empty* ``boxes`` cell, which is allowed: the pointing game is skipped
      for that image);
    - an empty file name, or the same file twice (the later line is the bad one);
    - a label that is not an integer in ``0 .. 999``; a width or height that is not a positive integer;
    - a box that is not four numbers, has a NaN or infinite coordinate, is inverted or empty
      (``x1 <= x0`` or ``y1 <= y0``), or lies entirely outside the ``width x height`` image.

    A box partly outside the image is *not* an error: it is clipped when mapped into the input frame, as
    boxes that reach the image edge are, by rounding, in real annotations. A box entirely outside the image
    *is* an error, not a warning: no annotation of this image can be there, so the row's coordinates are in
    another frame (swapped x and y, another image's size, or a wrong width/height), and its other boxes
    cannot be trusted either; dropping the box quietly would compute the pointing game against the wrong
    region or silently skip it. (The metric itself, :func:`iscam.metrics.energy_pointing_game`, refuses such
    a box for the same reason.)

    ``on_bad_rows="skip"`` drops the bad rows instead and keeps them, with their problems, in
    :attr:`skipped_rows` (for the runner to report their number); whole-file problems still raise, and so
    does a manifest with no good row. Files listed but absent on disk are not checked here: they are
    reported by name when read (:func:`iter_batches`).
    """

    has_labels: ClassVar[bool] = True

    def __init__(
        self,
        manifest_csv: str | os.PathLike[str],
        preprocess: Preprocess,
        *,
        image_dir: str | os.PathLike[str] | None = None,
        limit: int | None = None,
        on_bad_rows: OnBadRows = "error",
    ) -> None:
        if on_bad_rows not in _ON_BAD_ROWS:
            raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, Integral) or limit < 1):
            raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
        self.manifest = Path(manifest_csv)
        if self.manifest.is_dir():
            raise FileNotFoundError(
                f"manifest {self.manifest} is a folder, not a CSV file (open_dataset reads a folder's "
                f"{MANIFEST_NAME}, or its images if it has none)"
            )
        if not self.manifest.is_file():
            raise FileNotFoundError(f"manifest not found: {self.manifest}")
        self.image_dir = Path(image_dir) if image_dir is not None else self.manifest.parent
        if not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"image folder {self.image_dir} (for manifest {self.manifest}) does not exist"
            )
        self.preprocess = preprocess
        self.on_bad_rows = on_bad_rows
        good, bad = _read_manifest(self.manifest)
        if bad and on_bad_rows == "error":
            raise ManifestError(
                self.manifest,
                bad,
                f"{len(bad)} bad row(s) of {len(good) + len(bad)} (fix them, or drop them with "
                "on_bad_rows='skip', in a config data.on_bad_rows: skip):",
            )
        if not good:
            raise ManifestError(
                self.manifest, bad, f"all {len(bad)} row(s) are bad; on_bad_rows='skip' leaves no image:"
            )
        #: The bad rows dropped under ``on_bad_rows="skip"``, one entry per line.
        self.skipped_rows: list[ManifestProblem] = bad
        rows = good[:limit]
        self.files: list[str] = [row.file for row in rows]
        self.labels: list[int] = [row.label for row in rows]
        self.sizes: list[tuple[int, int]] = [(row.width, row.height) for row in rows]
        self.boxes: list[torch.Tensor] = [row.boxes for row in rows]
        #: Whether any image has boxes; one with an empty ``boxes`` cell skips the pointing game alone.
        self.has_boxes: bool = any(len(b) for b in self.boxes)

    @property
    def source(self) -> Path:
        """What the images were listed by: the manifest CSV (for provenance)."""
        return self.manifest

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        image = load_image(self.image_dir / self.files[index])
        width, height = self.sizes[index]
        boxes = self.boxes[index]
        if image.size != (width, height):
            boxes = boxes * torch.tensor([image.width / width, image.height / height] * 2)
        boxes = self.preprocess.map_boxes(boxes, image.width, image.height)
        return Sample(self.preprocess(image), self.labels[index], boxes, self.files[index])


def _image_files(folder: Path) -> list[str]:
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.suffix.lower() in IMAGE_SUFFIXES and not entry.name.startswith(".") and entry.is_file()
    )


class ImageFolderDataset:
    """Every image file in one folder, for explaining your own images: no manifest, no labels, no boxes.

    Files are those whose suffix is one of :data:`IMAGE_SUFFIXES` (any case), sorted by name (plain string
    order: ``img10.jpg`` before ``img2.jpg``); hidden files (``.name``, e.g. macOS ``._photo.jpg``) are left
    out. Subfolders are *not* searched: a manifest (whose ``file`` cells may be relative paths) is the way to
    list a nested layout, and recursing would pull in thumbnails or copies kept beside the images and make
    the stored ``file`` keys depend on the folder depth.

    Labels are unknown: every :attr:`Sample.label` is :data:`UNKNOWN_LABEL` (-1), so the class explained is
    the model's prediction (the runner always explains the top-1 class; no "correct" column can be computed).
    Boxes are unknown: every sample has ``[0, 4]`` boxes and the pointing game is skipped for every image.
    """

    has_labels: ClassVar[bool] = False
    has_boxes: ClassVar[bool] = False

    def __init__(self, folder: str | os.PathLike[str], preprocess: Preprocess) -> None:
        self.image_dir = Path(folder)
        if not self.image_dir.is_dir():
            raise DataSourceError(f"image folder {self.image_dir} is not an existing folder")
        self.preprocess = preprocess
        self.files: list[str] = _image_files(self.image_dir)
        if not self.files:
            raise DataSourceError(
                f"image folder {self.image_dir} holds no image files ({', '.join(IMAGE_SUFFIXES)}; "
                "subfolders are not searched)"
            )

    @property
    def source(self) -> Path:
        """What the images were listed by: the folder itself (for provenance)."""
        return self.image_dir

    @property
    def labels(self) -> list[int]:
        """:data:`UNKNOWN_LABEL` for every image."""
        return [UNKNOWN_LABEL] * len(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        image = load_image(self.image_dir / self.files[index])
        return Sample(self.preprocess(image), UNKNOWN_LABEL, torch.zeros(0, 4), self.files[index])


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ILSVRC2012 WordNet ids in torchvision's class order (sorted; index 1 is ``n01443537``)."""
    text = resources.files("iscam.resources").joinpath("imagenet_wnids.txt").read_text(encoding="utf-8")
    wnids = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(wnids) != NUM_CLASSES or list(wnids) != sorted(set(wnids)):
        raise RuntimeError("iscam/resources/imagenet_wnids.txt is damaged: expected 1000 sorted unique wnids")
    return wnids


class BoxAnnotation(NamedTuple):
    width: int
    height: int
    wnid: str  #: the class of the first object (in ILSVRC2012-val every object has the image's class)
    boxes: torch.Tensor  #: [m, 4] continuous (x0, y0, x1, y1) of the objects of class ``wnid``


def read_bbox_xml(path: str | os.PathLike[str]) -> BoxAnnotation:
    """Read one ``ILSVRC2012_bbox_val_v3`` (PASCAL-VOC style) XML file.

    VOC coordinates are 1-based inclusive pixel indices, so ``xmin..xmax`` covers the continuous interval
    ``[xmin - 1, xmax)``; boxes are clipped to the image. Objects of another class than the first are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"bounding-box file not found: {path}")
    try:
        root = ET.parse(path).getroot()
        width = int(root.findtext("size/width", ""))
        height = int(root.findtext("size/height", ""))
        objects = root.findall("object")
        if not objects:
            raise ValueError("no <object> element")
        wnid = (objects[0].findtext("name") or "").strip()
        boxes = []
        for obj in objects:
            if (obj.findtext("name") or "").strip() != wnid:
                continue
            box = obj.find("bndbox")
            if box is None:
                raise ValueError("an <object> without <bndbox>")
            xmin, ymin, xmax, ymax = (float(box.findtext(k, "")) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append([max(xmin - 1, 0.0), max(ymin - 1, 0.0), min(xmax, width), min(ymax, height)])
    except (ET.ParseError, ValueError) as exc:
        raise ValueError(f"malformed bounding-box XML {path}: {exc}") from exc
    return BoxAnnotation(width, height, wnid, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))


class ImageNetValDataset:
    """The official ILSVRC2012 validation layout: ``ILSVRC2012_val_*.JPEG`` + one XML per image.

    Labels come from each XML's class (``<object><name>``), mapped to torchvision indices through the sorted
    wnid list (:func:`imagenet_wnids`); boxes are those of that class. ``files`` restricts the dataset to
    some file names (e.g. ``data_scripts/paper_2000.csv``). Missing folders, images or XML files are
    reported when the dataset is built.
    """

    has_labels: ClassVar[bool] = True
    has_boxes: ClassVar[bool] = True

    def __init__(
        self,
        image_dir: str | os.PathLike[str],
        bbox_dir: str | os.PathLike[str],
        preprocess: Preprocess,
        *,
        files: Sequence[str] | None = None,
    ) -> None:
        self.image_dir, self.bbox_dir, self.preprocess = Path(image_dir), Path(bbox_dir), preprocess
        for what, folder in (("image", self.image_dir), ("bounding-box", self.bbox_dir)):
            if not folder.is_dir():
                raise FileNotFoundError(f"ILSVRC2012 validation {what} folder not found: {folder}")
        if files is None:
            self.files = sorted(p.name for p in self.image_dir.glob("ILSVRC2012_val_*.JPEG"))
            if not self.files:
                raise FileNotFoundError(f"no ILSVRC2012_val_*.JPEG files in {self.image_dir}")
        else:
            self.files = list(files)
            if not self.files:
                raise ValueError("files= is empty")
            absent = [f for f in self.files if not (self.image_dir / f).is_file()]
            if absent:
                raise FileNotFoundError(
                    f"{len(absent)} of {len(self.files)} listed images missing in {self.image_dir}, "
                    f"e.g. {absent[:3]}"
                )
        missing = [f for f in self.files if not self._xml(f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} bounding-box XML file(s) missing in {self.bbox_dir}, e.g. "
                f"{[self._xml(f).name for f in missing[:3]]}"
            )
        self._index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}

    def _xml(self, file: str) -> Path:
        return self.bbox_dir / (Path(file).stem + ".xml")

    def annotation(self, index: int) -> tuple[int, BoxAnnotation]:
        """``(label, annotation)`` of one image, without reading the image."""
        ann = read_bbox_xml(self._xml(self.files[index]))
        if ann.wnid not in self._index:
            raise ValueError(
                f"{self._xml(self.files[index])}: {ann.wnid!r} is not one of the 1000 ILSVRC2012 classes"
            )
        return self._index[ann.wnid], ann

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        label, ann = self.annotation(index)
        image = load_image(self.image_dir / self.files[index])
        boxes = ann.boxes
        if image.size != (ann.width, ann.height):
            boxes = boxes * torch.tensor([image.width / ann.width, image.height / ann.height] * 2)
        boxes = self.preprocess.map_boxes(boxes, image.width, image.height)
        return Sample(self.preprocess(image), label, boxes, self.files[index])


class DataSource(NamedTuple):
    """Where a run's images are: a manifest and its folder, or a folder of images without a manifest."""

    manifest: Path | None  #: the manifest CSV, or None: every image in ``folder``, labels and boxes unknown
    folder: Path  #: the manifest's folder (where its files are by default), or the image folder


def find_data(text: str | os.PathLike[str], data_root: str | os.PathLike[str] | None = None) -> DataSource:
    """Turn the text of ``data.manifest`` into a :class:`DataSource`; :class:`DataSourceError` if none fits.

    ``text`` may name a manifest CSV file, a folder holding :data:`MANIFEST_NAME`, or a folder of images
    without one (see :class:`ImageFolderDataset`). An absolute path (``~`` expanded) is taken as is. A
    relative one is looked up in the working directory first, then under the data root (so
    ``"imagenet-val-sample"`` finds ``<data root>/imagenet-val-sample/manifest.csv``); the first that exists
    is used. The data root (``data_root``, else ``$ISCAM_DATA``) is consulted only for a relative text not
    found in the working directory; when it is needed but not set, the error says so. A folder that holds
    ``manifest.csv`` is read through it, even if it holds images too.
    """
    path = _locate(text, data_root, "manifest")
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            raise DataSourceError(
                f"manifest {os.fspath(text)!r} is an image ({path}), not a manifest CSV: give the folder "
                "that holds it to use every image in that folder"
            )
        return DataSource(path, path.parent)
    if (path / MANIFEST_NAME).is_file():
        return DataSource(path / MANIFEST_NAME, path)
    if not path.is_dir():
        raise DataSourceError(f"manifest {os.fspath(text)!r} ({path}) is neither a file nor a folder")
    if not _image_files(path):
        raise DataSourceError(
            f"folder {path} (from {os.fspath(text)!r}) holds neither {MANIFEST_NAME} nor image files "
            f"({', '.join(IMAGE_SUFFIXES)}; subfolders are not searched)"
        )
    return DataSource(None, path)


def _locate(text: str | os.PathLike[str], data_root: str | os.PathLike[str] | None, what: str) -> Path:
    """The existing path ``text`` names: as is if absolute, else in the working directory or the data root."""
    if not isinstance(text, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path (str or os.PathLike), got {type(text).__name__}")
    raw = os.fspath(text)
    if not raw.strip():
        raise ValueError(
            f"{what} is empty: give a manifest CSV, a folder holding {MANIFEST_NAME} or of images"
        )
    path = Path(raw).expanduser()
    if path.is_absolute():
        if path.exists():
            return path
        raise DataSourceError(f"{what} {raw!r} not found: {path} does not exist")
    here = Path.cwd() / path
    if here.exists():
        return here
    if data_root is None and not os.environ.get(paths.DATA_ENV):
        raise DataSourceError(
            f"{what} {raw!r} not found: no {here} (relative to the working directory), and no data root is "
            f"set to look under (set ${paths.DATA_ENV} or pass a data root, e.g. --data-root)"
        )
    try:
        root = paths.data_root(data_root)
    except paths.DataRootError as exc:
        raise DataSourceError(
            f"{what} {raw!r} not found: no {here} (relative to the working directory), and {exc}"
        ) from None
    under = root / path
    if under.exists():
        return under
    entries = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in root.iterdir())
    listing = ", ".join(entries[:12]) + (f", ... ({len(entries)} entries)" if len(entries) > 12 else "")
    raise DataSourceError(
        f"{what} {raw!r} not found: no {here} (relative to the working directory) nor {under} (under the "
        f"data root, which holds: {listing or 'nothing'})"
    )


def open_dataset(
    manifest: str | os.PathLike[str],
    preprocess: Preprocess,
    *,
    data_root: str | os.PathLike[str] | None = None,
    image_dir: str | os.PathLike[str] | None = None,
    on_bad_rows: OnBadRows = "error",
) -> ManifestDataset | ImageFolderDataset:
    """The dataset ``manifest`` names (looked up by :func:`find_data`), validated before any image is read.

    A manifest gives a :class:`ManifestDataset` (``on_bad_rows`` as there); a folder of images without one an
    :class:`ImageFolderDataset`. ``image_dir`` (a manifest's images elsewhere than beside it) is looked up as
    ``manifest`` is: absolute, else the working directory, then the data root; it is an error with an image
    folder, which holds its images itself. The data root is needed only where a relative text is not found in
    the working directory.
    """
    if on_bad_rows not in _ON_BAD_ROWS:
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    source = find_data(manifest, data_root)
    if source.manifest is None:
        if image_dir is not None:
            raise ValueError(
                f"image_dir {os.fspath(image_dir)!r} is given, but {os.fspath(manifest)!r} is a folder of "
                f"images without {MANIFEST_NAME} ({source.folder}): image_dir only says where a manifest's "
                "files are"
            )
        return ImageFolderDataset(source.folder, preprocess)
    folder = None
    if image_dir is not None:
        folder = _locate(image_dir, data_root, "image folder")
        if not folder.is_dir():
            raise DataSourceError(f"image folder {os.fspath(image_dir)!r} ({folder}) is not a folder")
    return ManifestDataset(source.manifest, preprocess, image_dir=folder, on_bad_rows=on_bad_rows)


def sample_manifest(
    data_root: str | os.PathLike[str] | None = None, name: str = "imagenet-val-sample"
) -> Path:
    """Path of ``<data root>/<name>/manifest.csv``, with an error saying what the data root should hold."""
    root = paths.data_root(data_root)
    path = root / name / MANIFEST_NAME
    if not path.is_file():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"no {name}/manifest.csv under the data root {root} (it holds: {present}); the data root must be "
            "the "
            "folder with models/ and imagenet-val-sample/ (iscam.fetch.ensure_assets() downloads them, "
            "data_scripts/fetch_assets.py --download from a checkout)"
        )
    return path


def iter_batches(dataset: _Dataset, batch_size: int, indices: Sequence[int] | None = None) -> Iterator[Batch]:
    """Yield batches of ``batch_size`` samples (the last may be smaller) in ``indices`` order.

    An unreadable image is logged by name (warning on ``iscam.data``) and skipped; the batch is filled from
    the following images, and :attr:`Batch.indices` says which dataset items each batch holds.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = range(len(dataset)) if indices is None else [int(i) for i in indices]
    pending: list[tuple[int, Sample]] = []
    for index in order:
        try:
            pending.append((index, dataset[index]))
        except UnreadableImageError as exc:
            log.warning("skipping %s: %s", dataset.files[index], exc)
            continue
        if len(pending) == batch_size:
            yield _collate(pending)
            pending = []
    if pending:
        yield _collate(pending)


def _collate(items: list[tuple[int, Sample]]) -> Batch:
    return Batch(
        x=torch.stack([s.image for _, s in items]),
        labels=torch.tensor([s.label for _, s in items], dtype=torch.long),
        boxes=[s.boxes for _, s in items],
        files=[s.file for _, s in items],
        indices=torch.tensor([i for i, _ in items], dtype=torch.long),
    )
