"""Preprocessing and box mapping (hand-computed), manifests, the official XML layout, bad inputs."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import imagenet_xml
from PIL import Image
from torchvision import transforms

from iscam.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageNetValDataset,
    ManifestDataset,
    Preprocess,
    UnreadableImageError,
    format_boxes,
    imagenet_wnids,
    iter_batches,
    load_image,
    parse_boxes,
    read_bbox_xml,
    sample_manifest,
)
from iscam.paths import DataRootError


def _random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


# --- preprocessing


@pytest.mark.parametrize("size_wh", [(400, 300), (297, 224), (250, 333), (227, 227), (500, 101)])
def test_crop_is_exactly_torchvision_resize_centercrop(size_wh: tuple[int, int]) -> None:
    image = _random_image(*size_wh)
    reference = transforms.Compose(
        [transforms.Resize(224), transforms.CenterCrop(224), transforms.PILToTensor()]
    )
    assert torch.equal(Preprocess(224).resize_image(image), reference(image))
    normalised = transforms.Compose(
        [
            transforms.Resize(224),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    torch.testing.assert_close(Preprocess(224)(image), normalised(image), atol=1e-6, rtol=0)


def test_stretch_is_plain_resize() -> None:
    image = _random_image(400, 300)
    reference = transforms.Compose([transforms.Resize((224, 224)), transforms.PILToTensor()])
    assert torch.equal(Preprocess(224, "stretch").resize_image(image), reference(image))


def test_crop_offset_uses_torchvision_rounding() -> None:
    # 297x224: no scaling, (297 - 224) / 2 = 36.5 rounds to 36 (round half to even) -> columns 36..259.
    column = np.arange(297)
    encoded = np.stack([column % 256, column // 256, np.zeros_like(column)], -1).astype(np.uint8)  # R + 256 G
    out = Preprocess(224).resize_image(Image.fromarray(np.tile(encoded[None], (224, 1, 1)))).long()
    decoded = out[0, 0] + 256 * out[1, 0]
    assert decoded.tolist() == list(range(36, 260))


def test_normalize_denormalize_roundtrip() -> None:
    pre = Preprocess(224)
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    x = pre.normalize(image)
    torch.testing.assert_close(
        x[:, 0, 0], (image[:, 0, 0] / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    )
    torch.testing.assert_close(pre.denormalize(x), image / 255.0, atol=1e-6, rtol=0)
    assert pre.denormalize(torch.full((3, 2, 2), 10.0)).max() == 1.0


def test_bad_preprocess_arguments() -> None:
    with pytest.raises(ValueError, match="resize must be"):
        Preprocess(224, "squash")
    with pytest.raises(ValueError, match="positive integer"):
        Preprocess(0)


# --- box mapping


def test_map_boxes_crop_hand_computed() -> None:
    # 400x300 -> Resize(224): 298x224 (int(224 * 400 / 300) = 298); crop left = round(74 / 2) = 37, top 0.
    # x' = x * 298/400 - 37 = 0.745 x - 37 ;  y' = y * 224/300.
    boxes = torch.tensor(
        [
            [100.0, 30.0, 300.0, 150.0],  # inside: (37.5, 22.4, 186.5, 112)
            [0.0, 0.0, 40.0, 300.0],  # left of the crop: x1 = 29.8 - 37 < 0 -> dropped
            [10.0, 100.0, 120.0, 300.0],  # cut by the left edge: (0, 74.667, 52.4, 224)
            [350.0, 0.0, 400.0, 300.0],  # cut by the right edge: (223.75, 0, 224, 224)
        ]
    )
    mapped = Preprocess(224).map_boxes(boxes, 400, 300)
    expected = torch.tensor(
        [[37.5, 22.4, 186.5, 112.0], [0.0, 74.6667, 52.4, 224.0], [223.75, 0.0, 224.0, 224.0]]
    )
    torch.testing.assert_close(mapped, expected, atol=1e-4, rtol=0)


def test_map_boxes_portrait_crop_cuts_top_and_bottom() -> None:
    # 200x400 -> 224x448, top = 112: y' = 1.12 y - 112; a box in the top quarter vanishes.
    boxes = torch.tensor([[20.0, 10.0, 100.0, 90.0], [0.0, 50.0, 200.0, 350.0]])
    mapped = Preprocess(224).map_boxes(boxes, 200, 400)
    torch.testing.assert_close(mapped, torch.tensor([[0.0, 0.0, 224.0, 224.0]]))
    inner = Preprocess(224).map_boxes(torch.tensor([[50.0, 150.0, 150.0, 250.0]]), 200, 400)
    torch.testing.assert_close(inner, torch.tensor([[56.0, 56.0, 168.0, 168.0]]))


def test_map_boxes_stretch_hand_computed() -> None:
    boxes = torch.tensor([[100.0, 30.0, 300.0, 150.0], [0.0, 0.0, 400.0, 300.0]])
    mapped = Preprocess(224, "stretch").map_boxes(boxes, 400, 300)
    torch.testing.assert_close(mapped, torch.tensor([[56.0, 22.4, 168.0, 112.0], [0.0, 0.0, 224.0, 224.0]]))


def test_map_boxes_empty_and_degenerate() -> None:
    pre = Preprocess(224)
    assert pre.map_boxes(torch.zeros(0, 4), 400, 300).shape == (0, 4)
    assert pre.map_boxes(torch.tensor([[50.0, 50.0, 50.0, 80.0]]), 400, 300).shape == (0, 4)  # zero width


def test_mapped_box_covers_the_same_content() -> None:
    """A white rectangle drawn at a box lands where the mapped box says (pixel centres inside it)."""
    array = np.zeros((300, 400, 3), dtype=np.uint8)
    array[60:240, 120:280] = 255  # rows 60..239, columns 120..279 = box [120, 60, 280, 240)
    pre = Preprocess(224)
    image = pre.resize_image(Image.fromarray(array))[0].float() / 255
    x0, y0, x1, y1 = pre.map_boxes(torch.tensor([[120.0, 60.0, 280.0, 240.0]]), 400, 300)[0].tolist()
    centres = torch.arange(224) + 0.5
    inside = (
        (centres[None, :] >= x0 + 1)
        & (centres[None, :] < x1 - 1)
        & (centres[:, None] >= y0 + 1)
        & (centres[:, None] < y1 - 1)
    )
    outside = ~(
        (centres[None, :] >= x0 - 1)
        & (centres[None, :] < x1 + 1)
        & (centres[:, None] >= y0 - 1)
        & (centres[:, None] < y1 + 1)
    )
    assert image[inside].min() > 0.99 and image[outside].max() < 0.01


def test_parse_and_format_boxes() -> None:
    boxes = parse_boxes("9.1 105.9 50.4 176.8;168.9 114.4 226.5 135.6")
    assert boxes.shape == (2, 4) and boxes[1, 2].item() == pytest.approx(226.5)
    assert parse_boxes("").shape == (0, 4)
    assert format_boxes(torch.tensor([[1.0, 2.5, 3.0, 4.0]])) == "1 2.5 3 4"
    with pytest.raises(ValueError, match="4 numbers"):
        parse_boxes("1 2 3")


# --- manifests


def test_sample_manifest_dataset(assets: Path) -> None:
    dataset = ManifestDataset(sample_manifest(), Preprocess(224))
    assert len(dataset) == 300
    sample = dataset[0]
    assert sample.file == "ILSVRC2012_val_00000347.JPEG" and sample.label == 472
    assert sample.image.shape == (3, 224, 224) and sample.image.dtype == torch.float32
    # 227x227 -> Resize(224) is 224x224, no crop: boxes scale by 224/227
    raw = parse_boxes(
        "9.1 105.9 50.4 176.8;168.9 114.4 226.5 135.6;64.9 107.1 112.1 147.1;35.9 109.6 85.4 158.0;"
        "109.0 93.2 158.9 128.9;87.2 110.8 128.0 142.9;94.4 101.7 140.7 135.6;149.8 87.8 180.7 119.9"
    )
    torch.testing.assert_close(sample.boxes, raw * 224 / 227)
    assert len(ManifestDataset(sample_manifest(), Preprocess(224), limit=5)) == 5


def test_wrong_data_root_and_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataRootError, match="not an existing folder"):
        sample_manifest(tmp_path / "absent")
    (tmp_path / "models").mkdir()
    with pytest.raises(FileNotFoundError, match="no imagenet-val-sample/manifest.csv under the data root"):
        sample_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        ManifestDataset(tmp_path / "manifest.csv", Preprocess())


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_manifest_errors(tmp_path: Path) -> None:
    empty = _write(tmp_path / "empty.csv", "file,label,width,height,boxes\n")
    with pytest.raises(ValueError, match="has no rows"):
        ManifestDataset(empty, Preprocess())
    columns = _write(tmp_path / "columns.csv", "file,label\na.JPEG,1\n")
    with pytest.raises(ValueError, match="lacks column.*width, height, boxes"):
        ManifestDataset(columns, Preprocess())
    bad = _write(tmp_path / "bad.csv", "file,label,width,height,boxes\na.JPEG,one,10,10,\n")
    with pytest.raises(ValueError, match="line 2"):
        ManifestDataset(bad, Preprocess())
    with pytest.raises(FileNotFoundError, match="image folder"):
        ManifestDataset(
            _write(tmp_path / "ok.csv", "file,label,width,height,boxes\na.JPEG,1,10,10,\n"),
            Preprocess(),
            image_dir=tmp_path / "images",
        )


@pytest.fixture
def odd_images(tmp_path: Path) -> Path:
    """Greyscale, CMYK, RGBA, palette and two unreadable files, listed in a manifest."""
    folder = tmp_path / "odd"
    folder.mkdir()
    base = _random_image(60, 40, seed=3)
    base.convert("L").save(folder / "grey.JPEG")
    base.convert("CMYK").save(folder / "cmyk.JPEG")
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    base.convert("P").save(folder / "palette.png")
    (folder / "corrupt.JPEG").write_bytes(b"\xff\xd8 this is not a jpeg")
    good = folder / "good.JPEG"
    base.save(good, quality=95)
    (folder / "truncated.JPEG").write_bytes(good.read_bytes()[:200])
    rows = ["file,label,width,height,boxes"]
    for name in [
        "grey.JPEG",
        "corrupt.JPEG",
        "cmyk.JPEG",
        "rgba.png",
        "truncated.JPEG",
        "palette.png",
        "good.JPEG",
    ]:
        rows.append(f"{name},7,60,40,10 5 50 35")
    _write(folder / "manifest.csv", "\n".join(rows) + "\n")
    return folder


def test_image_modes_become_rgb(odd_images: Path) -> None:
    for name in ["grey.JPEG", "cmyk.JPEG", "rgba.png", "palette.png"]:
        image = load_image(odd_images / name)
        assert image.mode == "RGB" and image.size == (60, 40), name
    grey = np.asarray(load_image(odd_images / "grey.JPEG"))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    with pytest.raises(UnreadableImageError, match="corrupt.JPEG"):
        load_image(odd_images / "corrupt.JPEG")
    with pytest.raises(UnreadableImageError, match="truncated.JPEG"):
        load_image(odd_images / "truncated.JPEG")
    with pytest.raises(UnreadableImageError, match="absent.JPEG"):
        load_image(odd_images / "absent.JPEG")


def test_load_image_names_a_folder_and_a_missing_file(tmp_path: Path) -> None:
    (tmp_path / "pics").mkdir()
    with pytest.raises(UnreadableImageError, match=r"image '.*/pics': it is a folder, not an image"):
        load_image(tmp_path / "pics")
    with pytest.raises(UnreadableImageError, match=r"absent.png': the file does not exist"):
        load_image(tmp_path / "absent.png")


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels, with an empty IDAT: no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_decompression_bomb_is_one_line_naming_the_file_and_the_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(100_000, 100_000))  # 57 bytes claiming 10^10 pixels: PIL's error
    with pytest.raises(UnreadableImageError) as caught:
        load_image(bomb)
    text = str(caught.value)
    assert "bomb.png" in text and "10,000,000,000 pixels" in text and "decompression bomb" in text
    assert "\n" not in text and f"{Image.MAX_IMAGE_PIXELS:,}" in text
    # between the limit and twice it PIL only warns; we refuse before decoding
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    _random_image(40, 40).save(tmp_path / "warned.png")  # 1600 pixels
    with pytest.raises(UnreadableImageError, match=r"warned.png': 1,600 pixels, more than .* = 1,000"):
        load_image(tmp_path / "warned.png")
    _random_image(40, 25).save(tmp_path / "fits.png")  # 1000 pixels: at the limit, read
    assert load_image(tmp_path / "fits.png").size == (40, 25)


def test_iter_batches_skips_and_logs_unreadable_images(
    odd_images: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dataset = ManifestDataset(odd_images / "manifest.csv", Preprocess(32, "stretch"))
    with caplog.at_level(logging.WARNING, logger="iscam.data"):
        batches = list(iter_batches(dataset, batch_size=2))
    assert [b.files for b in batches] == [
        ["grey.JPEG", "cmyk.JPEG"],
        ["rgba.png", "palette.png"],
        ["good.JPEG"],
    ]
    assert [b.indices.tolist() for b in batches] == [[0, 2], [3, 5], [6]]
    assert batches[0].x.shape == (2, 3, 32, 32) and batches[0].labels.tolist() == [7, 7]
    torch.testing.assert_close(
        batches[2].boxes[0], torch.tensor([[10 * 32 / 60, 5 * 32 / 40, 50 * 32 / 60, 35 * 32 / 40]])
    )
    skipped = [r.getMessage() for r in caplog.records if r.name == "iscam.data"]
    assert len(skipped) == 2 and "corrupt.JPEG" in skipped[0] and "truncated.JPEG" in skipped[1]


def test_iter_batches_indices_order_and_sizes(assets: Path) -> None:
    dataset = ManifestDataset(sample_manifest(), Preprocess(16, "stretch"), limit=7)
    batches = list(iter_batches(dataset, 3, indices=[6, 0, 2, 4]))
    assert [b.indices.tolist() for b in batches] == [[6, 0, 2], [4]]
    assert batches[0].files == [dataset.files[6], dataset.files[0], dataset.files[2]]
    with pytest.raises(ValueError, match="batch_size"):
        next(iter_batches(dataset, 0))


def test_manifest_boxes_rescaled_when_file_size_differs(tmp_path: Path) -> None:
    _random_image(100, 50).save(tmp_path / "a.png")
    manifest = _write(tmp_path / "m.csv", "file,label,width,height,boxes\na.png,3,200,100,20 10 120 60\n")
    sample = ManifestDataset(manifest, Preprocess(50, "stretch"))[0]
    torch.testing.assert_close(sample.boxes, torch.tensor([[5.0, 5.0, 30.0, 30.0]]))  # (/2 then *0.5, *1)


# --- official layout


def test_wnid_list() -> None:
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and list(wnids) == sorted(set(wnids))
    assert wnids[0] == "n01440764" and wnids[1] == "n01443537" and wnids[999] == "n15075141"
    # anchors from the shared manifest: val_00000347 canoe (472), val_00000355 chow (260),
    # val_00000363 bittern (133)
    assert (wnids[472], wnids[260], wnids[133]) == ("n02951358", "n02112137", "n02011460")


def test_read_bbox_xml(tmp_path: Path) -> None:
    other = (
        "<object><name>n99999999</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax>"
        "</bndbox></object>"
    )
    path = _write(
        tmp_path / "a.xml", imagenet_xml("n01443537", 500, 375, [(111, 108, 441, 193), (1, 1, 500, 375)], other)
    )
    ann = read_bbox_xml(path)
    assert (ann.width, ann.height, ann.wnid) == (500, 375, "n01443537")
    # 1-based inclusive pixel indices -> continuous [xmin - 1, xmax); the other class's box is ignored
    torch.testing.assert_close(
        ann.boxes, torch.tensor([[110.0, 107.0, 441.0, 193.0], [0.0, 0.0, 500.0, 375.0]])
    )
    with pytest.raises(FileNotFoundError, match="bounding-box file not found"):
        read_bbox_xml(tmp_path / "absent.xml")
    with pytest.raises(ValueError, match="malformed"):
        read_bbox_xml(_write(tmp_path / "bad.xml", "<annotation><size>"))
    with pytest.raises(ValueError, match="no <object>"):
        read_bbox_xml(
            _write(
                tmp_path / "none.xml",
                "<annotation><size><width>5</width><height>5</height></size></annotation>",
            )
        )


def _official_layout(root: Path) -> tuple[Path, Path]:
    images, boxes = root / "ILSVRC2012_img_val", root / "ILSVRC2012_bbox_val_v3" / "val"
    images.mkdir(parents=True)
    boxes.mkdir(parents=True)
    _random_image(400, 300, seed=1).save(images / "ILSVRC2012_val_00000001.JPEG")
    _random_image(200, 400, seed=2).save(images / "ILSVRC2012_val_00000002.JPEG")
    _write(boxes / "ILSVRC2012_val_00000001.xml", imagenet_xml("n01443537", 400, 300, [(101, 31, 300, 150)]))
    _write(
        boxes / "ILSVRC2012_val_00000002.xml",
        imagenet_xml("n15075141", 200, 400, [(51, 151, 150, 250), (1, 1, 20, 20)]),
    )
    return images, boxes


def test_imagenet_val_dataset(tmp_path: Path) -> None:
    images, boxes = _official_layout(tmp_path)
    dataset = ImageNetValDataset(images, boxes, Preprocess(224))
    assert dataset.files == ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"]
    first, second = dataset[0], dataset[1]
    assert (first.label, second.label) == (1, 999)
    torch.testing.assert_close(first.boxes, torch.tensor([[37.5, 22.4, 186.5, 112.0]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        second.boxes, torch.tensor([[56.0, 56.0, 168.0, 168.0]])
    )  # 2nd box leaves the crop
    only = ImageNetValDataset(images, boxes, Preprocess(224), files=["ILSVRC2012_val_00000002.JPEG"])
    assert len(only) == 1 and only[0].label == 999


def test_imagenet_val_dataset_errors(tmp_path: Path) -> None:
    images, boxes = _official_layout(tmp_path)
    (boxes / "ILSVRC2012_val_00000002.xml").unlink()
    with pytest.raises(FileNotFoundError, match="1 bounding-box XML file.*ILSVRC2012_val_00000002.xml"):
        ImageNetValDataset(images, boxes, Preprocess())
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageNetValDataset(tmp_path / "nope", boxes, Preprocess())
    with pytest.raises(FileNotFoundError, match="listed images missing"):
        ImageNetValDataset(images, boxes, Preprocess(), files=["ILSVRC2012_val_00000009.JPEG"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no ILSVRC2012_val_"):
        ImageNetValDataset(empty, boxes, Preprocess())
    _write(boxes / "ILSVRC2012_val_00000002.xml", imagenet_xml("n00000000", 200, 400, [(1, 1, 5, 5)]))
    dataset = ImageNetValDataset(images, boxes, Preprocess())
    with pytest.raises(ValueError, match="not one of the 1000"):
        dataset[1]
