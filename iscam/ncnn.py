"""Read torchvision's SqueezeNet 1.1 back from its ncnn export (``.param`` + ``.bin``) into ``squeezenet1_1``.

The offline copy of torchvision's ``squeezenet1_1`` ``IMAGENET1K_V1`` weights (see the data root's README) was
exported with pnnx to ncnn, the weights stored as float16. This module reads both files without the ncnn
runtime and returns torchvision's own module with torchvision's parameter names, so everything downstream
(target layer ``features.12``, the ImageNet normalisation) is the same as for the downloaded weights.

The format, as ncnn's ``ParamDict`` and ``ModelBin`` read it:

- ``.param`` (text): the magic line ``7767517``; ``<layer count> <blob count>``; then one line per layer,
  ``type name n_in n_out in_blob... out_blob... key=value...``. ``Convolution``: 0 = outputs, 1/11 = kernel
  w/h, 2/12 = dilation w/h, 3/13 = stride w/h, 4/14/15/16 = pad left/top/right/bottom, 5 = bias term,
  6 = weight count, 8 = int8 scales, 9 = fused activation (1 = ReLU). ``Pooling``: 0 = kind (0 max,
  1 average), 1/11 = kernel, 2/12 = stride, 3/13/14/15 = pads, 4 = global, 5 = pad mode (0 = "full":
  ``ceil((n - k) / s) + 1`` outputs, which is torch's ``ceil_mode=True``). Unset keys take ncnn's defaults
  (a ``_h`` value defaults to its ``_w`` value). Keys ``<= -23300`` carry arrays (``n,v1,...,vn``).
- ``.bin``: for each ``Convolution`` in ``.param`` order, a 4-byte tag (``0x01306B47`` = float16, ``0`` =
  float32), the ``[out, in, kh, kw]`` weights padded to a multiple of 4 bytes, then ``out`` float32 biases.

Nothing is assumed: the graph is walked against torchvision's module -- each ``Fire`` is squeeze conv ->
``Split`` -> two convs -> ``Concat`` whose *first* input is ``expand1x1`` (torchvision's ``torch.cat``
order); kernel, stride, padding, dilation, fused ReLU, pooling kind and ceil mode, and every weight count
are compared with torchvision's; every layer of the file must be used and the ``.bin`` read to its last byte.
Any difference raises :class:`NcnnConversionError` naming the file. Conversions are cached by
:mod:`iscam.cache` under ``<cache_dir>/ncnn/`` keyed by both files' SHA-256.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models.squeezenet import Fire

from iscam.cache import cached_conversion, verified_sha256

__all__ = [
    "CONVERTER_VERSION",
    "FLOAT16_TAG",
    "FLOAT32_TAG",
    "PARAM_MAGIC",
    "NcnnConversionError",
    "NcnnLayer",
    "convert_ncnn",
    "load_ncnn",
    "parse_param",
]

#: Bump when the conversion changes, so stale cache entries are rebuilt.
CONVERTER_VERSION = 1
#: First line of every ncnn ``.param`` text file.
PARAM_MAGIC = 7767517
#: ``ModelBin`` storage tags in front of a weight blob.
FLOAT16_TAG = 0x01306B47
FLOAT32_TAG = 0
_ARRAY_KEY_BASE = -23300


class NcnnConversionError(ValueError):
    """The ncnn files are corrupt, truncated, mismatched or not the SqueezeNet this reader expects."""


@dataclass(frozen=True)
class NcnnLayer:
    """One line of a ``.param`` file."""

    kind: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: dict[int, Any] = field(default_factory=dict, hash=False)

    def param(self, key: int, default: Any) -> Any:
        return self.params.get(key, default)


def _value(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") else int(text)


def parse_param(text: str, *, source: str = "<param>") -> list[NcnnLayer]:
    """The layers of a ``.param`` text, checked against its own header counts."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if not lines or lines[0] != [str(PARAM_MAGIC)]:
        raise NcnnConversionError(f"{source} is not an ncnn .param file (first line is not {PARAM_MAGIC})")
    try:
        layer_count, blob_count = (int(v) for v in lines[1])
        layers = []
        for tokens in lines[2:]:
            kind, name, n_in, n_out = tokens[0], tokens[1], int(tokens[2]), int(tokens[3])
            blobs = tokens[4 : 4 + n_in + n_out]
            if len(blobs) != n_in + n_out:
                raise ValueError(f"layer {name!r} lists fewer blobs than its counts say")
            params: dict[int, Any] = {}
            for item in tokens[4 + n_in + n_out :]:
                key_text, value_text = item.split("=", 1)
                key = int(key_text)
                if key <= _ARRAY_KEY_BASE:  # an array: "n,v1,...,vn"
                    count, *values = value_text.split(",")
                    if int(count) != len(values):
                        raise ValueError(f"layer {name!r}: array {key} announces {count} values")
                    params[_ARRAY_KEY_BASE - key] = tuple(_value(v) for v in values)
                else:
                    params[key] = _value(value_text)
            layers.append(NcnnLayer(kind, name, tuple(blobs[:n_in]), tuple(blobs[n_in:]), params))
    except (ValueError, IndexError) as exc:
        raise NcnnConversionError(f"{source}: malformed .param line ({exc}): corrupt file?") from exc
    blobs_seen = {blob for layer in layers for blob in (*layer.inputs, *layer.outputs)}
    if len(layers) != layer_count or len(blobs_seen) != blob_count:
        raise NcnnConversionError(
            f"{source}: the header announces {layer_count} layers and {blob_count} blobs, the file has "
            f"{len(layers)} and {len(blobs_seen)}: truncated or edited"
        )
    return layers


# --------------------------------------------------------------------------------------------------------
# The graph against torchvision's SqueezeNet


def _conv_mismatches(layer: NcnnLayer, conv: nn.Conv2d) -> list[str]:
    """What differs between an ncnn Convolution and torchvision's conv (always followed by a ReLU)."""
    p = layer.param
    kernel_w, dilation_w, stride_w, pad_left = p(1, 0), p(2, 1), p(3, 1), p(4, 0)
    pad_top = p(14, pad_left)
    found = {
        "outputs": p(0, 0),
        "kernel": (p(11, kernel_w), kernel_w),
        "dilation": (p(12, dilation_w), dilation_w),
        "stride": (p(13, stride_w), stride_w),
        "padding (top, left, bottom, right)": (pad_top, pad_left, p(16, pad_top), p(15, pad_left)),
        "bias term": p(5, 0),
        "weight count": p(6, 0),
        "int8 scales": p(8, 0),
        "fused activation": p(9, 0),
    }
    expected = {
        "outputs": conv.out_channels,
        "kernel": tuple(conv.kernel_size),
        "dilation": tuple(conv.dilation),
        "stride": tuple(conv.stride),
        "padding (top, left, bottom, right)": tuple(conv.padding) * 2,  # type: ignore[operator]
        "bias term": 1,
        "weight count": conv.weight.numel(),
        "int8 scales": 0,
        "fused activation": 1,  # ReLU
    }
    if conv.groups != 1 or conv.bias is None:
        return ["torchvision's layer is grouped or has no bias (not SqueezeNet)"]
    return [
        f"{key} {found[key]} (torchvision {expected[key]})" for key in found if found[key] != expected[key]
    ]


class _Walk:
    """Follows the blobs of a ``.param`` graph along torchvision's module order."""

    def __init__(self, layers: list[NcnnLayer], source: str):
        self.source = source
        self.layers = layers
        self.producer = {blob: layer for layer in layers for blob in layer.outputs}
        self.consumers: dict[str, list[NcnnLayer]] = {}
        for layer in layers:
            for blob in layer.inputs:
                self.consumers.setdefault(blob, []).append(layer)
        self.visited: set[str] = set()
        self.convs: dict[str, NcnnLayer] = {}  # torchvision prefix -> Convolution layer

    def fail(self, message: str) -> NcnnConversionError:
        return NcnnConversionError(
            f"{self.source}: {message}; not torchvision's SqueezeNet as exported by pnnx"
        )

    def reader(self, blob: str, kind: str, role: str) -> NcnnLayer:
        users = self.consumers.get(blob, [])
        if len(users) != 1 or users[0].kind != kind:
            found = ", ".join(f"{u.kind} {u.name!r}" for u in users) or "nothing"
            raise self.fail(f"expected one {kind} ({role}) to read blob {blob!r}, found {found}")
        self.visited.add(users[0].name)
        return users[0]

    def conv(self, layer: NcnnLayer, conv: nn.Conv2d, prefix: str) -> str:
        problems = _conv_mismatches(layer, conv)
        if problems:
            raise self.fail(
                f"layer {layer.name!r} does not match torchvision's {prefix}: {'; '.join(problems)}"
            )
        self.convs[prefix] = layer
        return layer.outputs[0]

    def fire(self, blob: str, fire: Fire, prefix: str) -> str:
        blob = self.conv(
            self.reader(blob, "Convolution", f"{prefix}.squeeze"), fire.squeeze, f"{prefix}.squeeze"
        )
        split = self.reader(blob, "Split", f"{prefix} split")
        if len(split.outputs) != 2:
            raise self.fail(f"split {split.name!r} feeds {len(split.outputs)} layers, a Fire module needs 2")
        branches = [self.reader(out, "Convolution", f"{prefix} expand") for out in split.outputs]
        concat = self.reader(branches[0].outputs[0], "Concat", f"{prefix} concat")
        joined = {branch.outputs[0] for branch in branches}
        if self.consumers.get(branches[1].outputs[0]) != [concat] or set(concat.inputs) != joined:
            raise self.fail(f"concat {concat.name!r} does not join exactly the two expand convs of {prefix}")
        if len(concat.inputs) != 2 or concat.param(0, 0) != 0:
            raise self.fail(f"concat {concat.name!r} does not join two blobs along the channels")
        # torchvision: torch.cat([expand1x1, expand3x3], 1) -- the concat's first input is expand1x1
        self.conv(self.producer[concat.inputs[0]], fire.expand1x1, f"{prefix}.expand1x1")
        self.conv(self.producer[concat.inputs[1]], fire.expand3x3, f"{prefix}.expand3x3")
        return concat.outputs[0]

    def max_pool(self, blob: str, pool: nn.MaxPool2d, prefix: str) -> str:
        layer = self.reader(blob, "Pooling", prefix)
        p = layer.param
        kernel, stride, pad_left = p(1, 0), p(2, 1), p(3, 0)
        pad_top = p(13, pad_left)
        found = (
            p(0, 0),
            (p(11, kernel), kernel),
            (p(12, stride), stride),
            (pad_top, pad_left, p(15, pad_top), p(14, pad_left)),
            p(4, 0),
            p(5, 0),
        )
        expected = (
            0,
            (pool.kernel_size,) * 2,
            (pool.stride,) * 2,
            (pool.padding,) * 4,
            0,
            0 if pool.ceil_mode else 1,
        )
        if found != expected:
            raise self.fail(
                f"pooling {layer.name!r} is (kind, kernel, stride, pads, global, pad mode) = {found}, "
                f"torchvision's {prefix} needs {expected} (pad mode 0 = ceil_mode=True)"
            )
        return layer.outputs[0]

    def global_average(self, blob: str, prefix: str) -> str:
        layer = self.reader(blob, "Pooling", prefix)
        if layer.param(0, 0) != 1 or layer.param(4, 0) != 1:
            raise self.fail(f"pooling {layer.name!r} is not a global average pool ({prefix})")
        return layer.outputs[0]

    def sequential(self, blob: str, modules: nn.Sequential, prefix: str) -> str:
        children = list(modules.named_children())
        for index, (name, module) in enumerate(children):
            where = f"{prefix}.{name}"
            following = children[index + 1][1] if index + 1 < len(children) else None
            if isinstance(module, nn.Conv2d):
                if not isinstance(following, nn.ReLU):
                    raise self.fail(f"torchvision's {where} is not followed by a ReLU")
                blob = self.conv(self.reader(blob, "Convolution", where), module, where)
            elif isinstance(module, Fire):
                blob = self.fire(blob, module, where)
            elif isinstance(module, nn.MaxPool2d):
                blob = self.max_pool(blob, module, where)
            elif isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1)):
                blob = self.global_average(blob, where)
            elif not isinstance(module, (nn.ReLU, nn.Dropout)):  # fused into the conv / identity in eval
                raise self.fail(
                    f"torchvision's {where} ({type(module).__name__}) has no ncnn counterpart here"
                )
        return blob

    def run(self, model: nn.Module) -> dict[str, NcnnLayer]:
        inputs = [layer for layer in self.layers if layer.kind == "Input"]
        if len(inputs) != 1 or len(inputs[0].outputs) != 1:
            raise self.fail("expected one Input layer")
        self.visited.add(inputs[0].name)
        blob = self.sequential(inputs[0].outputs[0], model.features, "features")
        blob = self.sequential(blob, model.classifier, "classifier")
        while blob in self.consumers:  # after the pool only reshapes may follow, as torch.flatten
            kind = self.consumers[blob][0].kind
            if kind not in ("Reshape", "Flatten"):
                raise self.fail(f"a {kind} layer follows the global pool")
            blob = self.reader(blob, kind, "flatten").outputs[0]
        unused = [layer.name for layer in self.layers if layer.name not in self.visited]
        if unused:
            raise self.fail(f"layers {unused} are not part of torchvision's network")
        return self.convs


# --------------------------------------------------------------------------------------------------------
# The weights


class _Reader:
    def __init__(self, buffer: bytes, source: str):
        self.buffer, self.source, self.offset = buffer, source, 0

    def take(self, size: int, what: str) -> bytes:
        if self.offset + size > len(self.buffer):
            raise NcnnConversionError(
                f"{self.source} ends at byte {len(self.buffer)} inside {what} (needs {self.offset + size}): "
                "the .bin is truncated or belongs to another .param"
            )
        chunk = self.buffer[self.offset : self.offset + size]
        self.offset += size
        return chunk


def _read_weights(
    layers: list[NcnnLayer], buffer: bytes, source: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``layer name -> (flat float32 weights, float32 bias)`` for every Convolution, in file order."""
    reader = _Reader(buffer, source)
    out = {}
    for layer in layers:
        if layer.kind != "Convolution":
            continue
        count, outputs = int(layer.param(6, 0)), int(layer.param(0, 0))
        tag = int.from_bytes(reader.take(4, f"the storage tag of {layer.name!r}"), "little")
        if tag == FLOAT16_TAG:
            raw = reader.take((2 * count + 3) // 4 * 4, f"the float16 weights of {layer.name!r}")
            weight = np.frombuffer(raw, dtype="<f2", count=count).astype(np.float32)
        elif tag == FLOAT32_TAG:
            weight = np.frombuffer(
                reader.take(4 * count, f"the weights of {layer.name!r}"), dtype="<f4"
            ).copy()
        else:
            raise NcnnConversionError(
                f"{source}: layer {layer.name!r} stores its weights with tag 0x{tag:08X}; only float16 "
                f"(0x{FLOAT16_TAG:08X}) and float32 (0) are supported (int8/codebook exports are not)"
            )
        bias = np.frombuffer(reader.take(4 * outputs, f"the bias of {layer.name!r}"), dtype="<f4").copy()
        if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
            raise NcnnConversionError(f"{source}: layer {layer.name!r} holds non-finite values: corrupt file")
        out[layer.name] = (weight, bias)
    if reader.offset != len(buffer):
        raise NcnnConversionError(
            f"{source} has {len(buffer) - reader.offset} bytes after the last layer's weights: it does not "
            "belong to this .param"
        )
    return out


def _architecture() -> nn.Module:
    return torchvision.models.squeezenet1_1(weights=None)


def convert_ncnn(param_text: str, weights: bytes, *, source: str = "<ncnn>") -> dict[str, torch.Tensor]:
    """torchvision ``squeezenet1_1`` state_dict from the ``.param`` text and the ``.bin`` bytes.

    Raises :class:`NcnnConversionError` (naming ``source``) for any structural difference, see the module
    docstring.
    """
    layers = parse_param(param_text, source=source)
    model = _architecture()
    convs = _Walk(layers, source).run(model)
    values = _read_weights(layers, weights, source)
    target = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for prefix, layer in convs.items():
        weight, bias = values[layer.name]
        shape = target[f"{prefix}.weight"].shape
        state[f"{prefix}.weight"] = torch.from_numpy(weight.reshape(shape))
        state[f"{prefix}.bias"] = torch.from_numpy(bias)
    if set(state) != set(target):  # the walk visits every torchvision conv; this guards the walk itself
        raise NcnnConversionError(f"{source}: internal error, keys {sorted(set(target) ^ set(state))} differ")
    return state


def load_ncnn(
    param_path: str | os.PathLike[str],
    bin_path: str | os.PathLike[str],
    *,
    expected_sha256: tuple[str, str] | None = None,
    cache: bool = True,
) -> nn.Module:
    """torchvision's ``squeezenet1_1`` with the weights of the ncnn files, in eval mode on the CPU.

    ``expected_sha256``: ``(param, bin)`` hashes; a file whose hash differs (corrupt, or a different model)
    is refused with an error naming it. The cache entry is ``<cache_dir>/ncnn/<param sha>-<bin sha>-v<n>.pt``.
    """
    files = (Path(param_path), Path(bin_path))
    expected = expected_sha256 or (None, None)
    digests = tuple(
        verified_sha256(path, f"ncnn {what} file", sha, NcnnConversionError)
        for path, what, sha in zip(files, (".param", ".bin"), expected, strict=True)
    )

    def convert() -> dict[str, Any]:
        try:
            text = files[0].read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise NcnnConversionError(f"{files[0]} is not a text .param file: {exc}") from exc
        state = convert_ncnn(text, files[1].read_bytes(), source=f"{files[0]} + {files[1].name}")
        return {"state_dict": state, "sha256": list(digests)}

    return cached_conversion("ncnn", "-".join(digests), CONVERTER_VERSION, convert, _restore, use_cache=cache)


def _restore(payload: dict[str, Any]) -> nn.Module:
    model = _architecture()
    model.load_state_dict(payload["state_dict"])
    return model.eval()
