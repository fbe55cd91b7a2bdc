"""The Deep Compression reader: prototxt parsing, the Caffe-vs-torchvision checks, decoding a hand-made file,
the header counts of the real one, the exact input fold, Caffe's padded final conv, bad files, and top-1 on
the 300 shared ILSVRC2012-val images."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import data_files

from iscam import models
from iscam.data import IMAGENET_MEAN, IMAGENET_STD, ManifestDataset, Preprocess, load_image, sample_manifest
from iscam.deepcompression import (
    CAFFE_MEAN_BGR,
    CaffeConv,
    DeepCompressionError,
    caffe_input,
    caffe_plan,
    decode_layers,
    fold_caffe_input,
    load_deepcompression,
    parse_prototxt,
)

COMPRESSED = models.MODELS["squeezenet1_0"].weights["deepcompression"]
NET_SHA, PROTOTXT_SHA = (f.sha256 for f in COMPRESSED.files)


@pytest.fixture(scope="module")
def files(assets: Path) -> tuple[Path, Path]:
    net, prototxt = data_files(assets, "squeezenet1_0", "deepcompression")
    return net, prototxt


@pytest.fixture(scope="module")
def prototxt(files: tuple[Path, Path]) -> str:
    return files[1].read_text(encoding="utf-8")


# --- the prototxt


def test_parse_prototxt_by_hand() -> None:
    text = """name: "x"  # a comment
    input: "data"
    input_dim: 1
    layer { name: "a" type: "Pooling" pooling_param { pool: MAX kernel_size: 3 global_pooling: true } }
    layer: { name: "b" bottom: "a" bottom: "c" mean: -0.5 }
    """
    assert parse_prototxt(text) == {
        "name": ["x"],
        "input": ["data"],
        "input_dim": [1],
        "layer": [
            {"name": ["a"], "type": ["Pooling"],
             "pooling_param": [{"pool": ["MAX"], "kernel_size": [3], "global_pooling": [True]}]},
            {"name": ["b"], "bottom": ["a", "c"], "mean": [-0.5]},
        ],
    }  # fmt: skip
    with pytest.raises(DeepCompressionError, match="p.prototxt: field 'type' has no value .*truncated"):
        parse_prototxt('layer { name: "a" type:', source="p.prototxt")
    with pytest.raises(DeepCompressionError, match="1 unclosed"):
        parse_prototxt('layer { name: "a"', source="p.prototxt")
    with pytest.raises(DeepCompressionError, match="unbalanced"):
        parse_prototxt("}", source="p.prototxt")


def test_caffe_plan_maps_layers_to_torchvision(prototxt: str) -> None:
    convs, input_size = caffe_plan(prototxt)
    assert input_size == (227, 227)
    assert len(convs) == 26
    assert [(c.name, c.key) for c in convs[:4]] == [
        ("conv1", "features.0"),
        ("fire2/conv1x1_1", "features.3.squeeze"),
        ("fire2/conv1x1_2", "features.3.expand1x1"),
        ("fire2/conv3x3_2", "features.3.expand3x3"),
    ]
    assert (convs[-1].name, convs[-1].key, convs[-1].padding) == ("conv_final", "classifier.1", (1, 1))
    assert convs[0].padding == (0, 0)  # what makes the input fold exact
    # every other conv is padded exactly when it is 3x3, as in torchvision
    assert all(c.padding == ((1, 1) if c.weight_shape[-1] == 3 else (0, 0)) for c in convs[:-1])


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("num_output: 96\n", "num_output: 96\n    pad: 1\n", "conv1 is padded"),
        ("kernel_size: 7", "kernel_size: 5", r"\(outputs, kernel, stride, group, bias\) = \(96, 5"),
        ('name: "fire2/conv1x1_1"', 'name: "fire2/squeeze1x1"', "lacks 'conv'"),
        (
            'bottom: "fire2/conv1x1_2"\n  bottom: "fire2/conv3x3_2"',
            'bottom: "fire2/conv3x3_2"\n  bottom: "fire2/conv1x1_2"',
            "expected a Concat reading",
        ),
        ("pool: MAX\n", "pool: MAX\n    round_mode: FLOOR\n", "rounding"),
        ("pool: AVE", "pool: MAX", "not the global average pool"),
    ],
    ids=["padded-conv1", "kernel", "name", "concat-order", "floor-pooling", "final-pool"],
)
def test_structural_differences_are_refused(prototxt: str, old: str, new: str, message: str) -> None:
    assert old in prototxt
    with pytest.raises(DeepCompressionError, match=message):
        caffe_plan(prototxt.replace(old, new, 1), source="edited.prototxt")


# --- the .net format


def hand_made_net(codes: list[int], gaps: list[int], *, codebook0: float = 0.0, extra: bytes = b"") -> bytes:
    """One layer of 40 weights: codebook [0, 0.5, -1.25, 2.0, 0...], bias 0.25, the given entries."""
    codebook = np.zeros(256, dtype="<f4")
    codebook[:4] = [codebook0, 0.5, -1.25, 2.0]
    padded = gaps + [0] * (len(gaps) % 2)
    nibbles = bytes(low | (high << 4) for low, high in zip(padded[0::2], padded[1::2], strict=True))
    header = np.array([len(codes)], dtype="<u4").tobytes()
    return (
        header + codebook.tobytes() + np.array([0.25], dtype="<f4").tobytes() + bytes(codes) + nibbles + extra
    )


LAYER = CaffeConv("conv_x", "features.0", (1, 1, 1, 40), (0, 0))
# positions 0, 3, 19 (a real value at the longest gap), 35 (a filler: code 0 at gap 16), 37
CODES, GAPS = [1, 2, 3, 0, 1], [0, 2, 15, 15, 1]


def test_decode_a_hand_made_layer() -> None:
    (layer,) = decode_layers(hand_made_net(CODES, GAPS), [LAYER])
    expected = np.zeros(40, dtype=np.float32)
    expected[[0, 3, 19, 37]] = [0.5, -1.25, 2.0, 0.5]
    np.testing.assert_array_equal(layer.weight.reshape(-1), expected)
    np.testing.assert_array_equal(layer.bias, [0.25])
    assert (layer.stored, layer.fillers, int(np.count_nonzero(layer.weight))) == (5, 1, 4)


@pytest.mark.parametrize(
    ("buffer", "message"),
    [
        (hand_made_net(CODES, GAPS)[:-1], "h.net ends at byte 1039 inside the indices"),
        (hand_made_net(CODES, GAPS, extra=b"\0"), "h.net has 1 bytes after the last layer"),
        (hand_made_net(CODES, GAPS, codebook0=0.1), "codebook entry 0 is 0.1"),
        (hand_made_net([1, 0, 3, 0, 1], GAPS), "a zero code that is not a gap filler"),
        (hand_made_net(CODES, [0, 2, 15, 15, 15]), "the indices run to 51, past 40 weights"),
        (hand_made_net([1] * 41, [0] * 41), "the header stores 41 entries for 40 weights"),
    ],
    ids=["truncated", "extra", "codebook", "zero-code", "overrun", "header"],
)
def test_damaged_files_are_refused(buffer: bytes, message: str) -> None:
    with pytest.raises(DeepCompressionError, match=message):
        decode_layers(buffer, [LAYER], source="h.net")


def test_real_file_header_counts_entries(files: tuple[Path, Path], prototxt: str) -> None:
    """The header's count per layer is exactly the decoded non-zeros plus the gap fillers."""
    raw = files[0].read_bytes()
    convs, _ = caffe_plan(prototxt)
    header = np.frombuffer(raw, dtype="<u4", count=26).tolist()
    layers = decode_layers(raw, convs)
    assert [layer.stored for layer in layers] == header
    for layer in layers:
        assert int(np.count_nonzero(layer.weight)) == layer.stored - layer.fillers, layer.conv.name
    assert header[0] == 13902 == int(np.count_nonzero(layers[0].weight))  # conv1: 13902 of 14112, no filler
    assert sum(header) == 422_083
    total = sum(layer.weight.size + layer.bias.size for layer in layers)
    assert total == 1_248_424  # torchvision squeezenet1_0's parameter count


# --- Caffe's conventions


def test_fold_by_hand() -> None:
    ones = np.ones((1, 3, 1, 1))
    weight, bias = fold_caffe_input(ones, np.zeros(1))
    np.testing.assert_allclose(weight.reshape(3), 255 * np.asarray(IMAGENET_STD), rtol=1e-6)
    # at the mean colour (z = 0): sum_c 255 m_c - (104 + 117 + 123) = 343.485 - 344
    np.testing.assert_allclose(bias, [-0.515], atol=1e-4)
    blue_only = np.zeros((1, 3, 1, 1))
    blue_only[0, 0] = 1.0  # Caffe channel 0 is blue = RGB channel 2
    weight, bias = fold_caffe_input(blue_only, np.zeros(1))
    np.testing.assert_allclose(weight.reshape(3), [0, 0, 255 * IMAGENET_STD[2]], rtol=1e-6)
    np.testing.assert_allclose(bias, [255 * IMAGENET_MEAN[2] - CAFFE_MEAN_BGR[0]], atol=1e-4)
    with pytest.raises(ValueError, match=r"\[out, 3, kh, kw\]"):
        fold_caffe_input(np.ones((2, 4, 3, 3)), np.zeros(2))


def test_fold_is_exact_for_an_unpadded_conv() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 3, 7, 7, generator=generator, dtype=torch.float64)
    bias = torch.randn(5, generator=generator, dtype=torch.float64)
    x = torch.rand(2, 3, 20, 20, generator=generator, dtype=torch.float64)
    folded_w, folded_b = (
        torch.from_numpy(a).double() for a in fold_caffe_input(weight.numpy(), bias.numpy())
    )
    z = Preprocess(20).normalize(x.float()).double()
    expected = F.conv2d(caffe_input(x), weight, bias, stride=2)
    torch.testing.assert_close(F.conv2d(z, folded_w, folded_b, stride=2), expected, rtol=1e-5, atol=1e-3)


def test_ceil_mode_pooling_gives_13x13_at_features_12(
    squeezenet1_0_deepcompression: models.LoadedModel,
) -> None:
    # 224 -> conv 7x7/2: 109 -> pools 3/2 rounding up: 54, 27, 13 (rounding down: 54, 26, 12)
    seen = []
    handle = squeezenet1_0_deepcompression.model.features[12].register_forward_hook(
        lambda _m, _i, out: seen.append(tuple(out.shape[-2:]))
    )
    with torch.no_grad():
        squeezenet1_0_deepcompression.model(torch.zeros(1, 3, 224, 224))
    handle.remove()
    assert seen == [(13, 13)]


def test_final_conv_keeps_caffes_padding(squeezenet1_0_deepcompression: models.LoadedModel) -> None:
    """pad 1 on the 1x1 conv_final: 15x15 outputs whose border ring is ReLU(bias), so the global mean is
    (169 * the unpadded mean + 56 * ReLU(bias)) / 225."""
    padded = squeezenet1_0_deepcompression.model
    assert padded.classifier[1].padding == (1, 1)
    unpadded = copy.deepcopy(padded)
    unpadded.classifier[1].padding = (0, 0)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(3))  # features.12: 5x5 -> 7x7
    with torch.no_grad():
        ring = torch.relu(padded.classifier[1].bias)
        expected = (25 * unpadded(x) + 24 * ring) / 49
        torch.testing.assert_close(padded(x), expected, rtol=1e-5, atol=1e-5)


def test_folded_equals_the_caffe_input_model(files: tuple[Path, Path], one_thread: None) -> None:
    folded = load_deepcompression(*files)
    caffe = load_deepcompression(*files, fold=False, cache=False)
    preprocess = Preprocess(224)
    dataset = ManifestDataset(sample_manifest(), preprocess, limit=16)
    images = torch.stack([preprocess.resize_image(load_image(dataset.image_dir / f)) for f in dataset.files])
    with torch.no_grad():
        ours = folded(preprocess.normalize(images))
        theirs = caffe(caffe_input(images.float() / 255))
    print(f"\nfolded vs Caffe-input SqueezeNet 1.0: max|dlogit| = {(ours - theirs).abs().max().item():.2e}")
    assert (ours - theirs).abs().max() <= 1e-4
    assert torch.equal(ours.argmax(1), theirs.argmax(1))


# --- files, hashes, cache


def test_missing_corrupt_and_different_files(files: tuple[Path, Path], tmp_path: Path) -> None:
    net, prototxt = files
    (tmp_path / "models").mkdir()
    with pytest.raises(FileNotFoundError, match=r"expected .*models/compressed_SqueezeNet_v1\.0\.net"):
        models.load("squeezenet1_0", "deepcompression", data_root=tmp_path)
    (tmp_path / "models" / net.name).write_bytes(net.read_bytes()[:-100])  # a truncated download
    with pytest.raises(FileNotFoundError, match=r"expected .*models/SqueezeNet_v1\.0_deploy\.prototxt"):
        models.load("squeezenet1_0", "deepcompression", data_root=tmp_path)
    (tmp_path / "models" / prototxt.name).write_bytes(prototxt.read_bytes())
    with pytest.raises(DeepCompressionError, match=r"models/compressed_SqueezeNet_v1\.0\.net has SHA-256"):
        models.load("squeezenet1_0", "deepcompression", data_root=tmp_path)
    with pytest.raises(DeepCompressionError, match=r"compressed_SqueezeNet_v1\.0\.net .*ends at byte"):
        load_deepcompression(tmp_path / "models" / net.name, prototxt, cache=False)
    with pytest.raises(DeepCompressionError, match=rf"{prototxt}.*expected {'0' * 64}"):
        load_deepcompression(net, prototxt, expected_sha256=(NET_SHA, "0" * 64))
    with pytest.raises(FileNotFoundError, match=r"\.prototxt file not found: .*absent\.prototxt"):
        load_deepcompression(net, tmp_path / "absent.prototxt")


def test_folded_and_caffe_conversions_are_cached_apart(
    files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISCAM_CACHE", str(tmp_path))
    folded = load_deepcompression(*files, expected_sha256=(NET_SHA, PROTOTXT_SHA))
    caffe = load_deepcompression(*files, fold=False)
    names = sorted(e.name for e in (tmp_path / "deepcompression").glob("*.pt"))
    assert names == [f"{NET_SHA}-{PROTOTXT_SHA}-caffe-v1.pt", f"{NET_SHA}-{PROTOTXT_SHA}-v1.pt"]
    again = load_deepcompression(*files)  # from the cache: padding restored too
    assert again.classifier[1].padding == (1, 1)
    torch.testing.assert_close(again.features[0].weight, folded.features[0].weight, rtol=0, atol=0)
    assert not torch.equal(caffe.features[0].weight, folded.features[0].weight)


# --- accuracy


def test_top1_at_224_on_300_images(
    squeezenet1_0_deepcompression: models.LoadedModel, one_thread: None
) -> None:
    loaded = squeezenet1_0_deepcompression
    dataset = ManifestDataset(sample_manifest(), loaded.preprocess)
    images = torch.stack([loaded.preprocess(load_image(dataset.image_dir / f)) for f in dataset.files])
    start = time.perf_counter()
    with torch.no_grad():
        predictions = torch.cat([loaded.model(chunk).argmax(1) for chunk in images.split(10)])
    top1 = (predictions == torch.tensor(dataset.labels)).float().mean().item()
    print(
        f"\nsqueezenet1_0 (Deep Compression) at 224: top1={top1:.4f} forward {time.perf_counter() - start:.1f} s"
    )
    assert len(dataset.labels) == 300
    assert top1 >= 0.70
