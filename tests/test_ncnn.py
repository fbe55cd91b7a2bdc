"""The ncnn reader: .param parsing, the graph checks, the float16 weights read by hand, bad files, the cache,
and agreement with the ncnn runtime on the 300 shared ILSVRC2012-val images."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from conftest import data_files

from iscam import models
from iscam.cache import sha256_file
from iscam.data import ManifestDataset, load_image, sample_manifest
from iscam.ncnn import FLOAT16_TAG, NcnnConversionError, convert_ncnn, load_ncnn, parse_param

NCNN = models.MODELS["squeezenet1_1"].weights["ncnn"]
PARAM_SHA, BIN_SHA = (f.sha256 for f in NCNN.files)


@pytest.fixture(scope="module")
def files(assets: Path) -> tuple[Path, Path]:
    param, weights = data_files(assets, "squeezenet1_1", "ncnn")
    return param, weights


@pytest.fixture(scope="module")
def texts(files: tuple[Path, Path]) -> tuple[str, bytes]:
    return files[0].read_text(encoding="utf-8"), files[1].read_bytes()


# --- the .param text


def test_parse_param_by_hand() -> None:
    text = "7767517\n3 3\nInput in 0 1 a\nConvolution c 1 1 a b 0=8 1=3 11=5 5=1 6=120 -23309=2,1.5,-2e-1\n"
    text += "Pooling p 1 1 b c 0=1 4=1\n"
    layers = parse_param(text)
    assert [(layer.kind, layer.name, layer.inputs, layer.outputs) for layer in layers] == [
        ("Input", "in", (), ("a",)),
        ("Convolution", "c", ("a",), ("b",)),
        ("Pooling", "p", ("b",), ("c",)),
    ]
    conv = layers[1]
    assert conv.params == {0: 8, 1: 3, 11: 5, 5: 1, 6: 120, 9: (1.5, -0.2)}  # -23309 = array of key 9
    assert conv.param(3, 1) == 1  # unset: ncnn's default
    with pytest.raises(NcnnConversionError, match="not an ncnn .param file"):
        parse_param("7767518\n" + text.split("\n", 1)[1], source="x.param")
    with pytest.raises(NcnnConversionError, match="x.param: the header announces 4 layers"):
        parse_param(text.replace("3 3", "4 3", 1), source="x.param")
    with pytest.raises(NcnnConversionError, match="x.param: malformed"):
        parse_param(text.replace("0=8", "0-8"), source="x.param")


def test_real_param_file(texts: tuple[str, bytes]) -> None:
    layers = parse_param(texts[0])
    kinds = [layer.kind for layer in layers]
    assert len(layers) == 49
    assert {k: kinds.count(k) for k in set(kinds)} == {
        "Input": 1, "Convolution": 26, "Pooling": 4, "Split": 8, "Concat": 8, "Reshape": 1, "Flatten": 1
    }  # fmt: skip
    max_pools = [layer for layer in layers if layer.kind == "Pooling" and layer.param(0, 0) == 0]
    assert [layer.param(5, 0) for layer in max_pools] == [0, 0, 0]  # ncnn's "full" (ceil) rounding


# --- the conversion


def test_weights_match_the_bin_read_by_hand(files: tuple[Path, Path], texts: tuple[str, bytes]) -> None:
    """conv1: tag, 64*3*3*3 = 1728 float16 (3456 bytes, already 4-aligned), then 64 float32 biases."""
    raw = texts[1]
    assert int.from_bytes(raw[:4], "little") == FLOAT16_TAG
    weight = np.frombuffer(raw, dtype="<f2", count=1728, offset=4).astype(np.float32)
    bias = np.frombuffer(raw, dtype="<f4", count=64, offset=4 + 3456)
    model = load_ncnn(*files)
    torch.testing.assert_close(model.features[0].weight.detach().flatten(), torch.from_numpy(weight))
    torch.testing.assert_close(model.features[0].bias.detach(), torch.from_numpy(bias.copy()))


def test_state_dict_is_torchvisions_key_for_key(texts: tuple[str, bytes]) -> None:
    state = convert_ncnn(*texts)
    reference = torchvision.models.squeezenet1_1(weights=None).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert len(state) == 52
    assert sum(v.numel() for v in state.values()) == 1_235_496
    assert all(v.dtype == torch.float32 for v in state.values())


def test_ceil_mode_pooling_gives_13x13_at_features_12(squeezenet1_1_ncnn: models.LoadedModel) -> None:
    # 225 -> conv 3x3/2: 112 -> pools 3/2 with ceil: 56, 28, 14 (floor would give 55, 27, 13)
    seen = []
    layer = squeezenet1_1_ncnn.model.features[12]
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    with torch.no_grad():
        squeezenet1_1_ncnn.model(torch.zeros(1, 3, 225, 225))
        squeezenet1_1_ncnn.model(torch.zeros(1, 3, 224, 224))  # 111 -> 55, 27, 13 either way
    handle.remove()
    assert [tuple(s[-2:]) for s in seen] == [(14, 14), (13, 13)]


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("cat_0                    2 1 6 7", "cat_0                    2 1 7 6", "kernel"),
        ("6=1728 9=1", "6=1728 9=0", "fused activation"),
        ("2=2 3=0 5=0", "2=2 3=0 5=1", "ceil_mode"),
        ("Split                    splitncnn_0", "Concat splitncnn_0", "expected one Split"),
    ],
    ids=["swapped-concat", "no-relu", "floor-pooling", "no-split"],
)
def test_structural_differences_are_refused(
    texts: tuple[str, bytes], old: str, new: str, message: str
) -> None:
    assert old in texts[0]
    with pytest.raises(NcnnConversionError, match=message):
        convert_ncnn(texts[0].replace(old, new, 1), texts[1], source="edited.param")


def test_truncated_extended_and_unknown_weights(texts: tuple[str, bytes]) -> None:
    param, raw = texts
    with pytest.raises(NcnnConversionError, match="cut.bin ends at byte 1000 inside"):
        convert_ncnn(param, raw[:1000], source="cut.bin")
    with pytest.raises(NcnnConversionError, match="long.bin has 4 bytes after the last layer"):
        convert_ncnn(param, raw + b"\0\0\0\0", source="long.bin")
    with pytest.raises(NcnnConversionError, match="tag 0x000D4B38"):
        convert_ncnn(param, (0x000D4B38).to_bytes(4, "little") + raw[4:], source="int8.bin")


# --- files, hashes, cache


def test_missing_corrupt_and_different_files(files: tuple[Path, Path], tmp_path: Path) -> None:
    param, weights = files
    with pytest.raises(FileNotFoundError, match=r"ncnn \.bin file not found: .*absent\.bin"):
        load_ncnn(param, tmp_path / "absent.bin")
    with pytest.raises(NcnnConversionError, match=rf"{weights}.*expected {'0' * 64}"):
        load_ncnn(param, weights, expected_sha256=(PARAM_SHA, "0" * 64))
    (tmp_path / "models").mkdir()
    with pytest.raises(FileNotFoundError, match=r"expected .*models/squeezenet_v1\.1\.ncnn\.param"):
        models.load("squeezenet1_1", "ncnn", data_root=tmp_path)
    (tmp_path / "models" / param.name).write_bytes(param.read_bytes())
    (tmp_path / "models" / weights.name).write_bytes(weights.read_bytes()[:-8])  # truncated download
    with pytest.raises(NcnnConversionError, match=r"models/squeezenet_v1\.1\.ncnn\.bin has SHA-256"):
        models.load("squeezenet1_1", "ncnn", data_root=tmp_path)
    with pytest.raises(NcnnConversionError, match=r"squeezenet_v1\.1\.ncnn\.bin ends at byte"):
        load_ncnn(tmp_path / "models" / param.name, tmp_path / "models" / weights.name, cache=False)
    (tmp_path / "models" / param.name).write_bytes(b"\xff\xfe not text")
    with pytest.raises(NcnnConversionError, match="is not a text .param file"):
        load_ncnn(tmp_path / "models" / param.name, weights, cache=False)


def test_conversion_is_cached_by_both_hashes(
    files: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("ISCAM_CACHE", str(tmp_path))
    first = load_ncnn(*files, expected_sha256=(PARAM_SHA, BIN_SHA))
    entries = list((tmp_path / "ncnn").glob("*.pt"))
    assert [e.name for e in entries] == [f"{sha256_file(files[0])}-{sha256_file(files[1])}-v1.pt"]
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    entries[0].write_bytes(b"damaged")
    with caplog.at_level(logging.WARNING, logger="iscam.cache"):
        again = load_ncnn(*files)
    assert "unreadable cache entry" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(first(x), again(x), rtol=0, atol=0)


# --- against the ncnn runtime


def test_agrees_with_the_ncnn_runtime_on_300_images(
    files: tuple[Path, Path], squeezenet1_1_ncnn: models.LoadedModel, one_thread: None
) -> None:
    """The reference for this file is ncnn itself, run in float32 (fp16 storage and arithmetic off)."""
    import ncnn  # the reference runtime (the test extra)
    loaded = squeezenet1_1_ncnn
    dataset = ManifestDataset(sample_manifest(), loaded.preprocess)
    images = torch.stack([loaded.preprocess(load_image(dataset.image_dir / f)) for f in dataset.files])
    start = time.perf_counter()
    with torch.no_grad():
        ours = torch.cat([loaded.model(chunk) for chunk in images.split(10)])  # small chunks: fastest on CPU
    seconds = time.perf_counter() - start
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = 1
    for option in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage"):
        setattr(net.opt, option, False)
    assert net.load_param(str(files[0])) == 0 and net.load_model(str(files[1])) == 0
    theirs = []
    for image in images:
        array = np.ascontiguousarray(image.numpy())  # the Mat borrows this memory: keep it alive
        extractor = net.create_extractor()
        extractor.input("in0", ncnn.Mat(array))
        status, out = extractor.extract("out0")
        assert status == 0
        theirs.append(np.array(out).reshape(-1))
    reference = torch.from_numpy(np.stack(theirs))
    labels = torch.tensor(dataset.labels)
    agreement = (ours.argmax(1) == reference.argmax(1)).float().mean().item()
    top1 = (ours.argmax(1) == labels).float().mean().item()
    print(
        f"\nsqueezenet1_1 (ncnn copy): n={len(labels)} agreement={agreement:.4f} top1={top1:.4f} "
        f"ncnn_top1={(reference.argmax(1) == labels).float().mean().item():.4f} "
        f"max|dlogit|={(ours - reference).abs().max().item():.2e} torch forward {seconds:.1f} s"
    )
    assert len(labels) == 300
    assert agreement >= 0.97
    assert top1 >= 0.70
    assert (ours - reference).abs().max() <= 1e-3  # both float32: only summation order differs
