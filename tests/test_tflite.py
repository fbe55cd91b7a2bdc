"""The TFLite -> PyTorch converter: SAME padding by hand, structure, caching, bad files, and agreement with
the TFLite interpreter (ai-edge-litert) on the 300 shared ILSVRC2012-val images."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from iscam import models
from iscam.data import ManifestDataset, Preprocess, load_image, sample_manifest
from iscam.tflite import (
    TFLiteConversionError,
    TFSamePad2d,
    convert_tflite,
    load_tflite,
    sha256_file,
)

V2 = models.CORAL_MODELS["mobilenet_v2_coral"]
V1 = models.CORAL_MODELS["mobilenet_v1_coral_tiny"]


# --- padding


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "expected"),
    [
        (224, 3, 2, (0, 1)),
        (225, 3, 2, (1, 1)),
        (112, 3, 1, (1, 1)),
        (7, 3, 2, (1, 1)),
        (56, 1, 1, (0, 0)),
        (8, 5, 2, (1, 2)),
        (4, 4, 2, (1, 1)),
    ],
)
def test_same_padding_amounts(size: int, kernel: int, stride: int, expected: tuple[int, int]) -> None:
    pad = TFSamePad2d((kernel, kernel), (stride, stride))
    left, right, top, bottom = pad.padding_for(size, size)
    assert (left, right) == (top, bottom) == expected
    assert (size + left + right - kernel) // stride + 1 == -(-size // stride)  # TF's output size ceil(n / s)


def test_same_padding_conv_matches_hand_computed_tf_output() -> None:
    # TF SAME, 3x3 ones kernel, stride 2 on a 4x4 input: pad 0 before, 1 after; outputs are window sums.
    x = torch.arange(16.0).view(1, 1, 4, 4)
    conv = nn.Conv2d(1, 1, 3, stride=2, bias=False)
    nn.init.ones_(conv.weight)
    y = conv(TFSamePad2d((3, 3), (2, 2))(x))
    expected = torch.tensor(
        [
            [x[0, 0, 0:3, 0:3].sum(), x[0, 0, 0:3, 2:4].sum()],
            [x[0, 0, 2:4, 0:3].sum(), x[0, 0, 2:4, 2:4].sum()],
        ]
    )
    torch.testing.assert_close(y[0, 0], expected)


# --- structure


@pytest.fixture(scope="module")
def v2(assets: Path) -> nn.Module:
    return load_tflite(assets / "models" / V2.file, expected_sha256=V2.sha256)


@pytest.fixture(scope="module")
def v1(assets: Path) -> nn.Module:
    return load_tflite(assets / "models" / V1.file, expected_sha256=V1.sha256)


def test_v2_has_torchvision_layout(v2: nn.Module) -> None:
    assert len(v2.features) == 19
    assert v2.features[18].conv[0].conv.out_channels == 1280
    assert v2.features[18].conv[0].conv.kernel_size == (1, 1)
    assert v2.features[0].conv[0].conv.stride == (2, 2) and v2.features[0].conv[0].conv.in_channels == 3
    residual = [i for i, block in enumerate(v2.features) if block.use_res_connect]
    assert residual == [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]  # torchvision MobileNetV2's residual blocks
    assert v2.classifier.out_features == 1000 and v2.classifier.in_features == 1280
    assert v2.spec["classifier"]["dropped_background"] is True
    assert v2.input_mean == v2.input_std == pytest.approx((128 / 255,) * 3)
    assert v2.input_size == (224, 224)


def test_v1_blocks_and_target(v1: nn.Module) -> None:
    assert len(v1.features) == 14
    for block in v1.features[1:]:  # depthwise 3x3 then pointwise 1x1
        dw, pw = block.conv[0].conv, block.conv[1].conv
        assert dw.groups == dw.in_channels and pw.kernel_size == (1, 1)
    assert v1.features[13].conv[1].conv.out_channels == 256
    assert v1.input_size == (128, 128) and v1.classifier.out_features == 1000


class _CalledFunctions(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        in_place = kwargs.get("inplace") or (len(args) > 3 and args[3] is True)
        self.names.add(getattr(func, "__name__", str(func)) + ("_" if in_place else ""))
        return func(*args, **kwargs)


def _every_conv_hooked(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """No-op forward hooks on every convolution: they switch each layer to the out-of-place activation."""
    return [m.register_forward_hook(lambda *_: None) for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("name", ["v1", "v2"])
def test_in_place_activation_changes_no_number(name: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(name)
    size = model.input_size
    torch.manual_seed(0)
    x = (torch.rand(2, 3, *size) * 4 - 2).contiguous(memory_format=torch.channels_last)
    inputs = [x.clone().requires_grad_(True) for _ in range(2)]
    with _CalledFunctions() as called:
        fast = model(inputs[0])
    assert "hardtanh_" in called.names  # the in-place path did run
    handles = _every_conv_hooked(model)
    try:
        assert all(m._forward_hooks for m in model.modules() if isinstance(m, nn.Conv2d))
        reference = model(inputs[1])
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(fast, reference)
    (fast[:, 3].sum()).backward()
    (reference[:, 3].sum()).backward()
    assert torch.equal(inputs[0].grad, inputs[1].grad) and inputs[0].grad.abs().sum() > 0


def test_an_activation_put_in_place_of_the_converted_one_is_the_one_applied(v1: nn.Module) -> None:
    layer = copy.deepcopy(v1.features[3].conv[0])
    torch.manual_seed(2)
    x = torch.rand(1, 32, 32, 32) * 4 - 2
    with torch.no_grad():
        before = layer.conv(x)
        layer.act = nn.Tanh()
        assert torch.equal(layer(x), torch.tanh(before))
        layer.act = nn.Hardtanh(-1.0, 1.0)
        assert torch.equal(layer(x), before.clamp(-1, 1))


def test_a_hook_on_a_convolution_sees_its_output_before_the_activation(v1: nn.Module) -> None:
    layer = v1.features[3].conv[0]
    captured: list[torch.Tensor] = []
    handle = layer.conv.register_forward_hook(lambda _m, _i, out: captured.append(out))
    inputs: list[torch.Tensor] = []
    pre = layer.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    try:
        torch.manual_seed(1)
        with torch.no_grad():
            v1(torch.rand(1, 3, 128, 128) * 4 - 2)
    finally:
        handle.remove()
        pre.remove()
    (out,) = captured
    assert out.min() < 0 and out.max() > 6  # not clamped in place after the hook saw it
    with torch.no_grad():
        assert layer.conv.padding == (1, 1)  # a stride-1 layer: SAME padding is the conv's own
        assert torch.equal(out, layer.conv(inputs[0]))
    # the hooks are gone: the layer is back on the in-place path and gives the same activation
    with torch.no_grad():
        assert torch.equal(layer(inputs[0]), out.clamp(0, 6))


def test_converted_model_supports_gradients_and_batching(v1: nn.Module) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 3, 128, 128, requires_grad=True)
    logits = v1(x)
    assert logits.shape == (3, 1000)
    logits[:, 7].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        single = torch.cat([v1(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(logits.detach(), single, atol=1e-4, rtol=1e-4)


def test_dequantisation_of_first_conv(assets: Path, v1: nn.Module) -> None:
    import tflite

    buf = (assets / "models" / V1.file).read_bytes()
    graph = tflite.Model.GetRootAsModel(buf, 0).Subgraphs(0)
    model = tflite.Model.GetRootAsModel(buf, 0)
    op = graph.Operators(0)
    w_t = graph.Tensors(int(op.InputsAsNumpy()[1]))
    q = model.Buffers(w_t.Buffer()).DataAsNumpy().reshape(tuple(w_t.ShapeAsNumpy())).astype(np.float64)
    scale, zero = float(w_t.Quantization().ScaleAsNumpy()[0]), float(w_t.Quantization().ZeroPointAsNumpy()[0])
    expected = torch.from_numpy(((q - zero) * scale).transpose(0, 3, 1, 2)).float()  # OHWI -> OIHW
    torch.testing.assert_close(v1.features[0].conv[0].conv.weight.detach(), expected)


# --- caching, bad files


def test_conversion_is_cached_by_sha256(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ISCAM_CACHE", str(tmp_path))
    source = assets / "models" / V1.file
    first = load_tflite(source)
    entries = list((tmp_path / "tflite").glob("*.pt"))
    assert [e.name.split("-v")[0] for e in entries] == [sha256_file(source)]
    second = load_tflite(source)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(first(x), second(x), rtol=0, atol=0)
    entries[0].write_bytes(b"damaged")
    with caplog.at_level(logging.WARNING, logger="iscam.cache"):
        third = load_tflite(source)
    assert "unreadable cache entry" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(first(x), third(x), rtol=0, atol=0)


def test_corrupt_and_truncated_files(assets: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(TFLiteConversionError, match="junk.tflite"):
        load_tflite(junk, cache=False)
    truncated = tmp_path / "cut.tflite"
    truncated.write_bytes((assets / "models" / V1.file).read_bytes()[:4096])
    with pytest.raises(TFLiteConversionError, match="cut.tflite"):
        convert_tflite(truncated.read_bytes(), source=str(truncated))


def test_hash_mismatch_and_missing_file(assets: Path, tmp_path: Path) -> None:
    with pytest.raises(TFLiteConversionError, match="SHA-256"):
        load_tflite(assets / "models" / V1.file, expected_sha256="0" * 64)
    (tmp_path / "models").mkdir()
    with pytest.raises(FileNotFoundError, match=r"models/mobilenet_v2_1\.0_224_quant\.tflite"):
        models.load("mobilenet_v2_coral", data_root=tmp_path)
    (tmp_path / "models" / V2.file).write_bytes(b"TFL3 but not really")
    with pytest.raises(TFLiteConversionError, match="SHA-256"):
        models.load("mobilenet_v2_coral", data_root=tmp_path)
    # the user's own file skips the hash check (and here fails to parse, naming it)
    with pytest.raises(TFLiteConversionError, match="not a TFLite model|could not be parsed"):
        models.load("mobilenet_v2_coral", weights=tmp_path / "models" / V2.file)


# --- vs the interpreter


def _interpreter(path: Path, *, keep_intermediates: bool = False):
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    interpreter = litert.Interpreter(
        model_path=str(path), experimental_preserve_all_tensors=keep_intermediates
    )
    interpreter.allocate_tensors()
    return interpreter


@pytest.mark.filterwarnings("ignore:Warning. Enabling .experimental_preserve_all_tensors.")
def test_stem_activation_matches_interpreter(assets: Path, v2: nn.Module) -> None:
    """The stride-2 stem with asymmetric SAME padding: our float output within 2 quantisation steps."""
    interpreter = _interpreter(assets / "models" / V2.file, keep_intermediates=True)
    image = Preprocess(224).resize_image(
        load_image(sorted((assets / "imagenet-val-sample").glob("*.JPEG"))[0])
    )
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image.permute(1, 2, 0)[None].numpy())
    interpreter.invoke()
    stem_out = next(d for d in interpreter.get_tensor_details() if d["shape"].tolist() == [1, 112, 112, 32])
    scale, zero = stem_out["quantization"]
    reference = (interpreter.get_tensor(stem_out["index"]).astype(np.float32) - zero) * scale
    with torch.no_grad():
        ours = v2.features[0](image[None].float() / 128 - 1)[0].permute(1, 2, 0).numpy()
    error = np.abs(ours - reference)
    assert error.max() <= 2 * scale
    assert error.mean() <= 0.3 * scale


def _compare(
    assets: Path, loaded: models.LoadedModel, tflite_file: str, limit: int | None
) -> dict[str, float]:
    interpreter = _interpreter(assets / "models" / tflite_file)
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]
    dataset = ManifestDataset(sample_manifest(), loaded.preprocess, limit=limit)
    images = torch.stack(
        [loaded.preprocess.resize_image(load_image(dataset.image_dir / f)) for f in dataset.files]
    )
    tflite_out = []
    for image in images:  # the interpreter takes one uint8 NHWC image at a time
        interpreter.set_tensor(input_index, image.permute(1, 2, 0)[None].numpy())
        interpreter.invoke()
        tflite_out.append(interpreter.get_tensor(output_index)[0, 1:].astype(np.int32))  # drop background
    tflite_scores = np.stack(tflite_out)
    with torch.no_grad():
        ours = torch.cat([loaded.model(loaded.preprocess.normalize(chunk)) for chunk in images.split(50)])
    ours_top = ours.argmax(1).numpy()
    tflite_top = tflite_scores.argmax(1)
    tied = tflite_scores == tflite_scores.max(1, keepdims=True)
    labels = np.asarray(dataset.labels)
    stats = {
        "n": len(labels),
        "agreement": float((ours_top == tflite_top).mean()),
        "agreement_ties": float(tied[np.arange(len(labels)), ours_top].mean()),
        "top1": float((ours_top == labels).mean()),
        "tflite_top1": float((tflite_top == labels).mean()),
    }
    print(f"\n{tflite_file}: {stats}")
    return stats


def test_mobilenet_v2_agrees_with_interpreter(assets: Path) -> None:
    stats = _compare(assets, models.load("mobilenet_v2_coral"), V2.file, None)
    assert stats["n"] == 300
    assert stats["agreement"] >= 0.95
    assert stats["agreement_ties"] >= 0.97
    assert stats["top1"] >= 0.75


def test_mobilenet_v1_tiny_agrees_with_interpreter(assets: Path) -> None:
    stats = _compare(assets, models.load("mobilenet_v1_coral_tiny"), V1.file, None)
    assert stats["n"] == 300
    assert stats["agreement"] >= 0.90
    assert stats["top1"] >= 0.50
