"""Convert a quantised TFLite MobileNet-family classifier into a float, differentiable PyTorch module.

The Coral test models (``mobilenet_v2_1.0_224_quant.tflite``, ``mobilenet_v1_0.25_128_quant.tflite``) are
the only ImageNet-pretrained CNNs this project can use offline. They store batch-norm-folded weights as
uint8 with one scale and zero-point per tensor. This module reads them with the ``tflite`` flatbuffer
bindings and rebuilds the network in float32:

- weights: ``w = (q - zero_point) * scale``; int32 biases: ``b = q * scale`` with the file's bias scale
  (``= input_scale * weight_scale``);
- CONV_2D / DEPTHWISE_CONV_2D with their fused activation (RELU6, RELU or none) and TensorFlow ``SAME``
  padding, which puts the odd pixel at the bottom/right (on a stride-2 3x3 conv over an even input: 0 before,
  1 after) -- :class:`TFSamePad2d` computes it from the actual input size, so any input size works;
- ADD of a block's output and its input -> a residual connection; AVERAGE_POOL_2D over the whole map ->
  global average pooling; the final 1x1 CONV_2D or FULLY_CONNECTED -> ``classifier`` (a Linear layer);
  RESHAPE/SQUEEZE are no-ops after pooling; the trailing SOFTMAX is dropped, so the model returns logits;
- the TF-slim background class (output 0 of 1001) is dropped, leaving torchvision's 1000 classes;
- the input quantisation ``real = scale * (q - zero_point)`` becomes a torchvision-style normalisation of a
  [0, 1] image with ``mean = zero_point / 255`` and ``std = 1 / (255 * scale)`` (Coral: 128/255 for both,
  i.e. ``x = q / 128 - 1``), exposed as :attr:`TFLiteNet.input_mean` / :attr:`TFLiteNet.input_std`.

Layers are grouped into torchvision-style blocks under ``features``: a full (k > 1) convolution is a block of
its own (the stem); otherwise a block runs up to and including the first pointwise convolution after a
depthwise one, plus a residual ADD if one follows; whatever precedes the pooling is the last block. For
MobileNetV2 this reproduces torchvision's indices (``features.18`` is the 1x1 conv to 1280 channels); for
MobileNetV1 ``features.1`` ... ``features.13`` are the depthwise-separable blocks.

The float model is not bit-exact with the int8 interpreter (activations are not re-quantised), so top-1
agreement is high but not 100 %: see ``tests/test_tflite.py``. Conversions are cached under
:func:`iscam.paths.cache_dir` keyed by the file's SHA-256 (:mod:`iscam.cache`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module_hooks  # the global hook registries

from iscam.cache import cached_conversion, sha256_file, verified_sha256

__all__ = [
    "CONVERTER_VERSION",
    "Block",
    "ConvAct",
    "TFLiteConversionError",
    "TFLiteNet",
    "TFSamePad2d",
    "build_from_spec",
    "convert_tflite",
    "load_tflite",
    "sha256_file",
]

#: Bump when the conversion changes, so stale cache entries are rebuilt.
CONVERTER_VERSION = 1

_ACTIVATIONS = {0: "none", 1: "relu", 3: "relu6"}  # tflite.ActivationFunctionType: NONE, RELU, RELU6
_PADDINGS = {0: "same", 1: "valid"}  # tflite.Padding
_NUMPY_DTYPES = {0: np.float32, 2: np.int32, 3: np.uint8, 9: np.int8}  # tflite.TensorType


class TFLiteConversionError(ValueError):
    """The file is not a TFLite model this converter understands (corrupt, or an unsupported graph)."""


# --------------------------------------------------------------------------------------------------------
# Modules


class TFSamePad2d(nn.Module):
    """Zero padding equal to TensorFlow's ``SAME``: output size ``ceil(in / stride)``, extra pixel after.

    ``total = max((ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)``; ``total // 2`` goes before (top/left) and
    the rest after (bottom/right); PyTorch's symmetric ``padding=1`` would shift every stride-2 output.
    """

    def __init__(
        self, kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int] = (1, 1)
    ):
        super().__init__()
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.dilation = tuple(dilation)

    @staticmethod
    def total_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> int:
        out = -(-size // stride)
        return max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)

    def padding_for(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(left, right, top, bottom)`` for this input size, in :func:`~torch.nn.functional.pad` order."""
        ph = self.total_padding(height, self.kernel_size[0], self.stride[0], self.dilation[0])
        pw = self.total_padding(width, self.kernel_size[1], self.stride[1], self.dilation[1])
        return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.padding_for(x.shape[-2], x.shape[-1])
        return F.pad(x, pad) if any(pad) else x

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"


def _activation(name: str) -> nn.Module:
    if name == "relu6":
        return nn.ReLU6()
    if name == "relu":
        return nn.ReLU()
    if name == "none":
        return nn.Identity()
    raise TFLiteConversionError(f"unsupported fused activation {name!r}")


class ConvAct(nn.Module):
    """TF padding, a plain :class:`~torch.nn.Conv2d` (batch norm already folded in) and the fused activation.

    When the SAME padding of this input happens to be symmetric (every stride-1 layer) it is handed to the
    convolution's own ``padding`` instead of a separate :func:`~torch.nn.functional.pad` copy -- the same
    numbers, about 20 % faster on a 2-core CPU; the asymmetric stride-2 case pads explicitly first.
    """

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        kernel, stride, dilation = tuple(spec["kernel"]), tuple(spec["stride"]), tuple(spec["dilation"])
        self.pad = TFSamePad2d(kernel, stride, dilation) if spec["padding"] == "same" else nn.Identity()
        self.conv = nn.Conv2d(
            spec["in"],
            spec["out"],
            kernel,
            stride=stride,
            dilation=dilation,
            groups=spec["groups"],
            bias=True,
        )
        self.act = _activation(spec["activation"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.pad, TFSamePad2d):
            left, right, top, bottom = self.pad.padding_for(x.shape[-2], x.shape[-1])
            if left == right and top == bottom:
                self.conv.padding = (top, left)
                return self._activate(self.conv(x))
            self.conv.padding = (0, 0)
        return self._activate(self.conv(self.pad(x)))

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        """The activation, in place on the convolution's fresh output unless a hook could see that output.

        In place (as torchvision's ``ReLU(inplace=True)``) the forward allocates and writes one activation
        tensor less per layer: ~12 % faster on a 2-core CPU, the same numbers bit for bit. A hook on the
        convolution or on the activation module gets the out-of-place call, so what it captured is never
        clamped afterwards.
        """
        if _hooked(self.conv) or _hooked(self.act):
            return self.act(y)
        if isinstance(self.act, nn.Hardtanh):  # ReLU6 is Hardtanh(0, 6)
            return F.hardtanh(y, self.act.min_val, self.act.max_val, inplace=True)
        if type(self.act) is nn.ReLU:
            return F.relu(y, inplace=True)
        return self.act(y)  # Identity, or a module someone put in its place


def _hooked(module: nn.Module) -> bool:
    """Whether a module hook (its own or a global one) may observe ``module``'s input or output."""
    base = torch_module_hooks
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or base._global_forward_hooks or base._global_forward_pre_hooks
                or base._global_backward_hooks or base._global_backward_pre_hooks)


class Block(nn.Module):
    """A run of :class:`ConvAct` layers, optionally with a residual ``x + conv(x)`` (MobileNetV2 style)."""

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        self.conv = nn.Sequential(*(ConvAct(layer) for layer in spec["layers"]))
        self.use_res_connect = bool(spec["residual"])
        self.act = _activation(spec.get("activation", "none"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.use_res_connect:
            out = out + x
        return self.act(out)


class TFLiteNet(nn.Module):
    """``features`` (blocks) -> global average pool -> ``classifier`` (Linear); returns pre-softmax logits.

    Expects a batch ``[B, 3, H, W]`` normalised with :attr:`input_mean` / :attr:`input_std`.
    """

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        self.spec = spec
        self.input_size: tuple[int, int] = tuple(spec["input"]["size"])  # type: ignore[assignment]
        self.input_mean: tuple[float, float, float] = tuple(spec["input"]["mean"])  # type: ignore[assignment]
        self.input_std: tuple[float, float, float] = tuple(spec["input"]["std"])  # type: ignore[assignment]
        self.features = nn.Sequential(*(Block(block) for block in spec["features"]))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        head = spec["classifier"]
        self.classifier = nn.Linear(head["in"], head["out"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def build_from_spec(spec: dict[str, Any]) -> TFLiteNet:
    """The (randomly initialised) module described by a conversion spec."""
    return TFLiteNet(spec)


# --------------------------------------------------------------------------------------------------------
# Reading the flatbuffer


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: Any
    scale: np.ndarray | None
    zero_point: np.ndarray | None
    quantized_dimension: int
    data: np.ndarray | None

    def dequantize(self) -> np.ndarray:
        """Float32 values of a constant tensor: ``(q - zero_point) * scale`` (per tensor or per channel)."""
        if self.data is None:
            raise TFLiteConversionError(f"tensor {self.name!r} has no constant data")
        values = self.data.astype(np.float64)
        if self.dtype == np.float32:
            return values.astype(np.float32)
        if self.scale is None or self.scale.size == 0:
            raise TFLiteConversionError(f"quantised tensor {self.name!r} has no scale")
        scale = self.scale.astype(np.float64)
        zero = (
            np.zeros_like(scale) if self.zero_point is None or self.zero_point.size == 0 else self.zero_point
        )
        if scale.size > 1:  # per-channel quantisation along quantized_dimension
            shape = [1] * values.ndim
            shape[self.quantized_dimension] = scale.size
            scale, zero = scale.reshape(shape), np.asarray(zero, dtype=np.float64).reshape(shape)
        return ((values - zero) * scale).astype(np.float32)


@dataclass
class _Op:
    kind: str
    inputs: list[int]
    outputs: list[int]
    options: dict[str, Any] = field(default_factory=dict)


def _builtin_names() -> dict[int, str]:
    import tflite

    return {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}


def _read_options(op: Any, kind: str) -> dict[str, Any]:
    import tflite

    classes = {
        "CONV_2D": tflite.Conv2DOptions,
        "DEPTHWISE_CONV_2D": tflite.DepthwiseConv2DOptions,
        "AVERAGE_POOL_2D": tflite.Pool2DOptions,
        "ADD": tflite.AddOptions,
        "FULLY_CONNECTED": tflite.FullyConnectedOptions,
    }
    if kind not in classes or op.BuiltinOptions() is None:
        return {}
    table = op.BuiltinOptions()
    opts = classes[kind]()
    opts.Init(table.Bytes, table.Pos)
    out: dict[str, Any] = {"activation": opts.FusedActivationFunction()}
    if kind in ("CONV_2D", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D"):
        out.update(padding=opts.Padding(), stride=(opts.StrideH(), opts.StrideW()))
    if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        out["dilation"] = (opts.DilationHFactor(), opts.DilationWFactor())
    if kind == "DEPTHWISE_CONV_2D":
        out["depth_multiplier"] = opts.DepthMultiplier()
    if kind == "AVERAGE_POOL_2D":
        out["filter"] = (opts.FilterHeight(), opts.FilterWidth())
    return out


def _parse(buffer: bytes, source: str) -> tuple[list[_Tensor], list[_Op], int, int]:
    if len(buffer) < 8 or buffer[4:8] != b"TFL3":
        raise TFLiteConversionError(
            f"{source} is not a TFLite model (no 'TFL3' flatbuffer identifier): the file is corrupt or "
            "truncated"
        )
    import tflite

    try:
        model = tflite.Model.GetRootAsModel(buffer, 0)
        if model.SubgraphsLength() != 1:
            raise TFLiteConversionError(f"{source}: expected one subgraph, found {model.SubgraphsLength()}")
        graph = model.Subgraphs(0)
        tensors = []
        for i in range(graph.TensorsLength()):
            t = graph.Tensors(i)
            q = t.Quantization()
            data = None
            buf = model.Buffers(t.Buffer())
            dtype = _NUMPY_DTYPES.get(t.Type())
            if buf is not None and buf.DataLength() > 0:
                if dtype is None:
                    raise TFLiteConversionError(f"{source}: tensor {i} has unsupported type {t.Type()}")
                raw = buf.DataAsNumpy().tobytes()
                data = np.frombuffer(raw, dtype=dtype).reshape(tuple(t.ShapeAsNumpy()))
            tensors.append(
                _Tensor(
                    name=t.Name().decode("utf-8", "replace"),
                    shape=tuple(int(s) for s in t.ShapeAsNumpy()) if t.ShapeLength() else (),
                    dtype=dtype,
                    scale=q.ScaleAsNumpy() if q is not None and q.ScaleLength() else None,
                    zero_point=q.ZeroPointAsNumpy() if q is not None and q.ZeroPointLength() else None,
                    quantized_dimension=q.QuantizedDimension() if q is not None else 0,
                    data=data,
                )
            )
        names = _builtin_names()
        ops = []
        for i in range(graph.OperatorsLength()):
            op = graph.Operators(i)
            code = model.OperatorCodes(op.OpcodeIndex())
            kind = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), f"CUSTOM({i})")
            ops.append(
                _Op(
                    kind,
                    [int(j) for j in op.InputsAsNumpy()],
                    [int(j) for j in op.OutputsAsNumpy()],
                    _read_options(op, kind),
                )
            )
        inputs, outputs = graph.InputsAsNumpy(), graph.OutputsAsNumpy()
    except TFLiteConversionError:
        raise
    except Exception as exc:  # flatbuffer accessors fail in many ways on damaged files
        raise TFLiteConversionError(
            f"{source} could not be parsed as a TFLite model ({exc!r}): corrupt file?"
        ) from exc
    if len(inputs) != 1 or len(outputs) != 1:
        raise TFLiteConversionError(
            f"{source}: expected one input and one output, got {len(inputs)}, {len(outputs)}"
        )
    return tensors, ops, int(inputs[0]), int(outputs[0])


# --------------------------------------------------------------------------------------------------------
# Conversion


def _input_normalisation(t: _Tensor, source: str) -> tuple[list[float], list[float]]:
    if t.dtype not in (np.uint8, np.int8) or t.scale is None or t.scale.size != 1:
        raise TFLiteConversionError(
            f"{source}: the input must be a per-tensor quantised uint8/int8 image, got {t.dtype} "
            "(float-input "
            "models carry no normalisation to recover)"
        )
    scale = float(t.scale[0])
    zero = float(t.zero_point[0]) if t.zero_point is not None else 0.0
    if t.dtype == np.int8:  # pixel p in [0, 255] is fed as q = p - 128
        zero += 128.0
    return [zero / 255.0] * 3, [1.0 / (255.0 * scale)] * 3


def _conv_layer(
    op: _Op, tensors: list[_Tensor], source: str
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    x, w = tensors[op.inputs[0]], tensors[op.inputs[1]]
    weight = w.dequantize()
    if op.kind == "CONV_2D":
        out_ch, kh, kw, in_ch = weight.shape
        if x.shape[-1] != in_ch:
            raise TFLiteConversionError(
                f"{source}: grouped CONV_2D ({x.shape[-1]} -> {in_ch}) is unsupported"
            )
        weight = weight.transpose(0, 3, 1, 2)  # OHWI -> OIHW
        groups = 1
    else:
        _, kh, kw, out_ch = weight.shape
        in_ch = x.shape[-1]
        if out_ch != in_ch * op.options["depth_multiplier"]:
            raise TFLiteConversionError(f"{source}: depthwise conv with inconsistent depth multiplier")
        weight = weight.transpose(3, 0, 1, 2)  # 1HW(C*M) -> (C*M)1HW: output c*M+m reads input c, as in torch
        groups = in_ch
    if len(op.inputs) > 2 and op.inputs[2] >= 0:
        bias_t = tensors[op.inputs[2]]
        if bias_t.scale is None and bias_t.dtype != np.float32:
            bias_t.scale = np.asarray([float(x.scale[0]) * float(w.scale[0])])  # type: ignore[index]
        bias = bias_t.dequantize()
    else:
        bias = np.zeros(out_ch, dtype=np.float32)
    activation = _ACTIVATIONS.get(op.options["activation"])
    if activation is None:
        raise TFLiteConversionError(f"{source}: unsupported fused activation {op.options['activation']}")
    spec = {
        "kind": "depthwise" if groups > 1 else ("pointwise" if (kh, kw) == (1, 1) else "conv"),
        "in": int(in_ch),
        "out": int(out_ch),
        "kernel": [int(kh), int(kw)],
        "stride": list(op.options["stride"]),
        "dilation": list(op.options["dilation"]),
        "groups": int(groups),
        "padding": _PADDINGS[op.options["padding"]],
        "activation": activation,
    }
    return spec, weight, bias


def convert_tflite(
    buffer: bytes, *, source: str = "<bytes>", drop_background: bool | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Convert TFLite model bytes into ``(spec, state_dict)`` for :func:`build_from_spec`.

    ``drop_background``: drop output 0 (TF-slim's background class); ``None`` drops it when there are 1001
    outputs. Raises :class:`TFLiteConversionError` naming ``source`` for corrupt files and unsupported graphs.
    """
    tensors, ops, input_id, output_id = _parse(buffer, source)
    mean, std = _input_normalisation(tensors[input_id], source)
    in_shape = tensors[input_id].shape  # NHWC

    blocks: list[dict[str, Any]] = []
    params: list[tuple[np.ndarray, np.ndarray]] = []
    layers: list[dict[str, Any]] = []
    block_input = current = input_id
    seen_depthwise = closing = False
    head: dict[str, Any] | None = None
    classifier: tuple[np.ndarray, np.ndarray] | None = None

    def flush(residual: bool = False, activation: str = "none") -> None:
        nonlocal layers, block_input, seen_depthwise, closing
        if layers:
            blocks.append({"layers": layers, "residual": residual, "activation": activation})
        layers, block_input, seen_depthwise, closing = [], current, False, False

    for index, op in enumerate(ops):
        where = f"{source}: op {index} ({op.kind})"
        if head is None and op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            if op.inputs[0] != current:
                raise TFLiteConversionError(
                    f"{where} does not continue the previous layer: not a sequential CNN"
                )
            spec, weight, bias = _conv_layer(op, tensors, where)
            if closing or spec["kind"] == "conv":
                flush()
            layers.append(spec)
            params.append((weight, bias))
            current = op.outputs[0]
            if spec["kind"] == "conv":
                flush()  # a full convolution (the stem) is a block of its own
            elif spec["kind"] == "depthwise":
                seen_depthwise = True
            elif seen_depthwise:
                closing = True  # the pointwise conv after a depthwise one ends the block (an ADD may follow)
        elif head is None and op.kind == "ADD":
            if not closing or sorted(op.inputs) != sorted([current, block_input]):
                raise TFLiteConversionError(
                    f"{where} is not a residual connection around the preceding block"
                )
            act = _ACTIVATIONS.get(op.options.get("activation", 0))
            if act is None:
                raise TFLiteConversionError(f"{where}: unsupported fused activation")
            current = op.outputs[0]
            flush(residual=True, activation=act)
        elif head is None and op.kind == "AVERAGE_POOL_2D":
            _, height, width, channels = tensors[op.inputs[0]].shape
            if (
                op.inputs[0] != current
                or tuple(op.options["filter"]) != (height, width)
                or op.options["activation"]
            ):
                raise TFLiteConversionError(f"{where}: only a global average pool at the end is supported")
            flush()
            head = {"in": int(channels)}
            current = op.outputs[0]
        elif head is not None and op.kind in ("CONV_2D", "FULLY_CONNECTED") and classifier is None:
            if op.inputs[0] != current or op.options.get("activation", 0) != 0:
                raise TFLiteConversionError(f"{where}: unexpected classifier layer")
            w_t = tensors[op.inputs[1]]
            weight = w_t.dequantize().reshape(w_t.shape[0], -1)  # OHWI 1x1 or [O, I]
            bias_t = tensors[op.inputs[2]]
            if bias_t.scale is None and bias_t.dtype != np.float32:
                bias_t.scale = np.asarray([float(tensors[current].scale[0]) * float(w_t.scale[0])])  # type: ignore[index]
            classifier = (weight, bias_t.dequantize())
            current = op.outputs[0]
        elif head is not None and op.kind in ("RESHAPE", "SQUEEZE"):
            current = op.outputs[0]
        elif head is not None and op.kind == "SOFTMAX" and op.outputs[0] == output_id:
            current = op.outputs[0]  # dropped: the model returns logits
        else:
            raise TFLiteConversionError(
                f"{where} is not supported by this converter (MobileNet-style graphs only)"
            )

    if current != output_id or head is None or classifier is None:
        raise TFLiteConversionError(f"{source}: the graph does not end in pool -> classifier -> (softmax)")
    weight, bias = classifier
    if drop_background is None:
        drop_background = weight.shape[0] == 1001
    if drop_background:
        weight, bias = weight[1:], bias[1:]
    head.update(out=int(weight.shape[0]), dropped_background=bool(drop_background))

    spec = {
        "format": CONVERTER_VERSION,
        "input": {"size": [int(in_shape[1]), int(in_shape[2])], "mean": mean, "std": std},
        "features": blocks,
        "classifier": head,
    }
    model = build_from_spec(spec)
    convs = [m.conv for m in model.features.modules() if isinstance(m, ConvAct)]
    if len(convs) != len(params):  # guards the grouping logic itself
        raise TFLiteConversionError(
            f"{source}: internal error, {len(convs)} modules for {len(params)} layers"
        )
    with torch.no_grad():
        for conv, (w, b) in zip(convs, params, strict=True):
            conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
            conv.bias.copy_(torch.from_numpy(np.ascontiguousarray(b)))
        model.classifier.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
        model.classifier.bias.copy_(torch.from_numpy(np.ascontiguousarray(bias)))
    return spec, model.state_dict()


# --------------------------------------------------------------------------------------------------------
# Loading with a cache


def load_tflite(
    path: str | os.PathLike[str], *, expected_sha256: str | None = None, cache: bool = True
) -> TFLiteNet:
    """Convert (or fetch from the cache) the model in ``path``; returns it in eval mode on the CPU.

    ``expected_sha256``: refuse a file whose hash differs (a corrupt or different download). The cache entry
    is ``<cache_dir>/tflite/<sha256>-v<CONVERTER_VERSION>.pt`` (:func:`iscam.cache.cached_conversion`).
    """
    path = Path(path)
    digest = verified_sha256(path, "TFLite model", expected_sha256, TFLiteConversionError)

    def convert() -> dict[str, Any]:
        spec, state = convert_tflite(path.read_bytes(), source=str(path))
        return {"spec": spec, "state_dict": state, "sha256": digest}

    def restore(payload: dict[str, Any]) -> TFLiteNet:
        model = build_from_spec(payload["spec"])
        model.load_state_dict(payload["state_dict"])
        return model.eval()

    return cached_conversion("tflite", digest, CONVERTER_VERSION, convert, restore, use_cache=cache)
