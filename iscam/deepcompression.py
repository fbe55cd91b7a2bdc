"""Decode SqueezeNet 1.0's Deep Compression file (``.net`` + Caffe ``.prototxt``) into torchvision's
``squeezenet1_0``, with Caffe's input transform folded into ``conv1`` so it takes the ImageNet normalisation.

DeepScale's Caffe SqueezeNet 1.0 -- the paper's architecture -- was pruned and codebook-quantised by Deep
Compression (Han et al., ICLR 2016; files and ``decode.py``: songhan/SqueezeNet-Deep-Compression). The
``.net`` file holds, for the prototxt's convolution layers in order (all 26 are convolutions, 8-bit codes):

- a header of one uint32 per layer: the number of stored entries ``n``;
- per layer: a float32 codebook of 256 values (entry 0 is 0.0, the pruned weights), the float32 biases,
  ``n`` uint8 codes, and ``ceil(n / 2)`` bytes of 4-bit relative indices (low nibble first). Entry ``i``
  sits ``gap_i + 1`` weights after the previous one (the first at ``gap_0``); a gap longer than 16 is
  bridged by a *filler* entry with code 0 at gap nibble 15. Weights are in Caffe's ``[out, in, kh, kw]``
  order, torchvision's too.

So the header counts entries, not non-zeros: ``n = non-zeros + fillers`` (``tests/test_deepcompression.py``
checks this for every layer, and that each code-0 entry is a filler). The file must be consumed to its last
byte.

**Caffe vs torchvision, checked on the prototxt.** Layer order and wiring (``Fire``: squeeze ->
``conv1x1_2`` / ``conv3x3_2`` -> ``Concat`` in that order, torchvision's ``torch.cat([expand1x1,
expand3x3])``), outputs, kernels, strides and pads are compared with torchvision's module; Caffe's pooling
rounds up (``ceil((n - k) / s) + 1``), which torchvision's ``MaxPool2d(ceil_mode=True)`` does too (checked).
``conv1`` has no padding in both, which is what makes the fold below exact. **One difference is real:**
Caffe's ``conv_final`` (torchvision's ``classifier.1``) is a 1x1 convolution with ``pad: 1``, so its
output is 15x15 at a 13x13 input, the border ring equal to ``ReLU(bias)``, and the global average pool
averages 225 positions. The decoded model keeps Caffe's padding (``classifier.1.padding = (1, 1)``, a
module attribute, not a parameter: the state_dict is still torchvision's key for key). Logits become
``(169 * unpadded + 56 * ReLU(bias)) / 225`` at a 13x13 map: the same top-1 on all 300 sample images, but
other probabilities -- which the Score-CAM family and Average Drop read. The target layer ``features.12``
is unaffected.

**Input fold.** Caffe feeds ``q = 255 * x[BGR] - (104, 117, 123)`` for an RGB image ``x`` in [0, 1];
the project feeds ``z = (x - m) / s`` (ImageNet mean/std). With ``x_c = s_c z_c + m_c`` and Caffe channel
``2 - c`` holding RGB channel ``c``, ``conv1(q) = conv1'(z)`` for

    W'[o, c] = 255 s_c W[o, 2 - c],    b'[o] = b[o] + sum_{c,i,j} W[o, 2 - c, i, j] (255 m_c - mean[2 - c]),

exactly, because every ``conv1`` window lies inside the image (no padding). Computed in float64.
Conversions are cached by :mod:`iscam.cache` under ``<cache_dir>/deepcompression/``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.squeezenet import Fire

from iscam.cache import cached_conversion, verified_sha256
from iscam.data import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "CAFFE_MEAN_BGR",
    "CODEBOOK_SIZE",
    "CONVERTER_VERSION",
    "CaffeConv",
    "DecodedLayer",
    "DeepCompressionError",
    "caffe_input",
    "caffe_plan",
    "convert_deepcompression",
    "decode_layers",
    "fold_caffe_input",
    "load_deepcompression",
    "parse_prototxt",
    "squeezenet1_0_with_padding",
]

#: Bump when the conversion changes, so stale cache entries are rebuilt.
CONVERTER_VERSION = 1
#: Caffe SqueezeNet's per-channel input mean, B, G, R, on the 0-255 scale.
CAFFE_MEAN_BGR: tuple[float, float, float] = (104.0, 117.0, 123.0)
#: 8-bit codes for convolution layers (decode.py: ``bits = 8`` when ``'conv' in layer``).
CODEBOOK_SIZE = 256
_MAX_GAP_NIBBLE = 15


class DeepCompressionError(ValueError):
    """The ``.net`` / ``.prototxt`` pair is corrupt, truncated, mismatched or not SqueezeNet 1.0."""


# --------------------------------------------------------------------------------------------------------
# The prototxt (protobuf text format)

_TOKEN = re.compile(r'\s+|#[^\n]*|(?P<string>"(?:[^"\\]|\\.)*")|(?P<symbol>[{}:])|(?P<word>[^\s{}:"#]+)')


def _scalar(kind: str, token: str) -> Any:
    if kind == "string":
        return token[1:-1]
    if token in ("true", "false"):
        return token == "true"
    for number in (int, float):
        try:
            return number(token)
        except ValueError:
            pass
    return token  # an enum value such as MAX


def _tokens(text: str, source: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise DeepCompressionError(f"{source}: unreadable text at character {position}")
        position = match.end()
        if match.lastgroup is not None:
            tokens.append((match.lastgroup, match.group(match.lastgroup)))
    return tokens


def parse_prototxt(text: str, *, source: str = "<prototxt>") -> dict[str, list[Any]]:
    """A protobuf text message as ``field -> [values]`` (nested messages are such dicts), in file order.

    Grammar: ``name: scalar``, ``name { ... }`` or ``name: { ... }``; ``#`` starts a comment.
    """
    tokens = _tokens(text, source) + [("end", "")]
    root: dict[str, list[Any]] = {}
    stack = [root]
    index = 0
    while tokens[index][0] != "end":
        kind, token = tokens[index]
        if token == "}" and kind == "symbol":
            if len(stack) == 1:
                raise DeepCompressionError(f"{source}: unbalanced '}}' (token {index})")
            stack.pop()
            index += 1
            continue
        if kind != "word":
            raise DeepCompressionError(f"{source}: expected a field name at token {index}, found {token!r}")
        index += 1
        if tokens[index] == ("symbol", ":"):
            index += 1
        value_kind, value = tokens[index]
        index += 1
        if (value_kind, value) == ("symbol", "{"):
            child: dict[str, list[Any]] = {}
            stack[-1].setdefault(token, []).append(child)
            stack.append(child)
        elif value_kind in ("word", "string"):
            stack[-1].setdefault(token, []).append(_scalar(value_kind, value))
        else:
            raise DeepCompressionError(
                f"{source}: field {token!r} has no value"
                + (" (the text ends there: truncated file)" if value_kind == "end" else "")
            )
    if len(stack) != 1:
        raise DeepCompressionError(f"{source}: {len(stack) - 1} unclosed '{{' at the end: truncated file")
    return root


def _one(message: Mapping[str, list[Any]], name: str, default: Any = None) -> Any:
    values = message.get(name, [])
    if len(values) > 1:
        raise DeepCompressionError(f"field {name!r} is repeated ({values}); only one value is supported")
    return values[0] if values else default


# --------------------------------------------------------------------------------------------------------
# The prototxt against torchvision's SqueezeNet 1.0


@dataclass(frozen=True)
class CaffeConv:
    """A Caffe convolution layer and the torchvision parameters it fills."""

    name: str  #: Caffe layer name, e.g. ``fire2/conv1x1_1``
    key: str  #: torchvision module, e.g. ``features.3.squeeze``
    weight_shape: tuple[int, int, int, int]  #: torchvision's ``[out, in, kh, kw]``
    padding: tuple[int, int]  #: Caffe's ``pad`` (may differ from torchvision's, see the module docstring)


class _Plan:
    """Walks the Caffe layers in file order along torchvision's module order."""

    def __init__(self, net: Mapping[str, list[Any]], source: str):
        self.source = source
        if "layers" in net:
            raise self.fail("old-style 'layers' (V1LayerParameter) prototxt is not supported")
        self.layers: list[dict[str, list[Any]]] = net.get("layer", [])
        self.index = 0
        self.convs: list[CaffeConv] = []
        self.blob = str(_one(net, "input", ""))
        dims = list(net.get("input_dim", []))
        if len(dims) != 4 or dims[1] != 3:
            raise self.fail(f"expected input_dim N, 3, H, W, found {dims}")
        self.input_size = (int(dims[2]), int(dims[3]))

    def fail(self, message: str) -> DeepCompressionError:
        return DeepCompressionError(f"{self.source}: {message}; not the SqueezeNet 1.0 this reader expects")

    def take(self, kind: str, role: str, bottom: Sequence[str]) -> dict[str, list[Any]]:
        if self.index >= len(self.layers):
            raise self.fail(f"the prototxt ends where torchvision's {role} ({kind}) follows")
        layer = self.layers[self.index]
        self.index += 1
        name, found = _one(layer, "name"), _one(layer, "type")
        if found != kind or list(layer.get("bottom", [])) != list(bottom):
            raise self.fail(
                f"layer {self.index} {name!r} is a {found} reading {layer.get('bottom')}, expected a {kind} "
                f"reading {list(bottom)} for torchvision's {role}"
            )
        return layer

    def in_place(self, kind: str, role: str) -> None:
        layer = self.take(kind, role, [self.blob])
        if list(layer.get("top", [])) != [self.blob]:
            raise self.fail(f"{kind} layer {_one(layer, 'name')!r} is not in place on {self.blob!r}")

    def conv(self, bottom: str, conv: nn.Conv2d, key: str) -> str:
        layer = self.take("Convolution", key, [bottom])
        name = str(_one(layer, "name"))
        if "conv" not in name:  # decode.py lists only parameter layers named *conv*, *fc* or *ip*
            raise self.fail(f"convolution {name!r} lacks 'conv' in its name, so the .net file has no entry")
        params = _one(layer, "convolution_param", {})
        unsupported = sorted(
            set(params)
            - {
                "num_output",
                "kernel_size",
                "stride",
                "pad",
                "weight_filler",
                "bias_filler",
                "group",
                "bias_term",
            }
        )
        if unsupported:
            raise self.fail(f"convolution {name!r} sets {unsupported}, which this reader does not handle")
        found = (
            _one(params, "num_output"),
            _one(params, "kernel_size"),
            _one(params, "stride", 1),
            _one(params, "group", 1),
            _one(params, "bias_term", True),
        )
        expected = (
            conv.out_channels,
            conv.kernel_size[0],
            conv.stride[0],
            conv.groups,
            conv.bias is not None,
        )
        if (
            found != expected
            or conv.kernel_size[0] != conv.kernel_size[1]
            or conv.stride[0] != conv.stride[1]
        ):
            raise self.fail(
                f"convolution {name!r} has (outputs, kernel, stride, group, bias) = {found}, torchvision's "
                f"{key} {expected}"
            )
        pad = int(_one(params, "pad", 0))
        self.convs.append(CaffeConv(name, key, tuple(conv.weight.shape), (pad, pad)))  # type: ignore[arg-type]
        self.blob = str(_one(layer, "top"))
        self.in_place("ReLU", f"{key}'s ReLU")
        return self.blob

    def fire(self, fire: Fire, key: str) -> None:
        squeeze = self.conv(self.blob, fire.squeeze, f"{key}.squeeze")
        expand1x1 = self.conv(squeeze, fire.expand1x1, f"{key}.expand1x1")
        expand3x3 = self.conv(squeeze, fire.expand3x3, f"{key}.expand3x3")
        concat = self.take("Concat", f"{key}'s torch.cat", [expand1x1, expand3x3])
        if _one(_one(concat, "concat_param", {}), "axis", 1) != 1:
            raise self.fail(f"concat {_one(concat, 'name')!r} does not join along the channels")
        self.blob = str(_one(concat, "top"))

    def pool(self, module: nn.Module, key: str) -> None:
        layer = self.take("Pooling", key, [self.blob])
        params = _one(layer, "pooling_param", {})
        if isinstance(module, nn.MaxPool2d):
            found = (
                _one(params, "pool"),
                _one(params, "kernel_size"),
                _one(params, "stride", 1),
                _one(params, "pad", 0),
                _one(params, "round_mode", "CEIL"),
            )
            expected = ("MAX", module.kernel_size, module.stride, module.padding, "CEIL")
            if found != expected or not module.ceil_mode:
                raise self.fail(
                    f"pooling {_one(layer, 'name')!r} is (pool, kernel, stride, pad, rounding) = {found}, "
                    f"torchvision's {key} is {expected} with ceil_mode={module.ceil_mode}"
                )
        elif (_one(params, "pool"), _one(params, "global_pooling")) != ("AVE", True):
            raise self.fail(f"pooling {_one(layer, 'name')!r} is not the global average pool of {key}")
        self.blob = str(_one(layer, "top"))

    def sequential(self, modules: nn.Sequential, prefix: str) -> None:
        children = list(modules.named_children())
        for index, (name, module) in enumerate(children):
            key = f"{prefix}.{name}"
            if isinstance(module, nn.Conv2d):
                if index + 1 == len(children) or not isinstance(children[index + 1][1], nn.ReLU):
                    raise self.fail(f"torchvision's {key} is not followed by a ReLU")
                self.conv(self.blob, module, key)
            elif isinstance(module, Fire):
                self.fire(module, key)
            elif isinstance(module, nn.MaxPool2d) or (
                isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1))
            ):
                self.pool(module, key)
            elif isinstance(module, nn.Dropout):
                self.in_place("Dropout", key)
            elif not isinstance(module, nn.ReLU):  # a ReLU was taken with its convolution
                raise self.fail(
                    f"torchvision's {key} ({type(module).__name__}) has no Caffe counterpart here"
                )

    def run(self, model: nn.Module) -> list[CaffeConv]:
        self.sequential(model.features, "features")
        self.sequential(model.classifier, "classifier")
        if self.index != len(self.layers):
            raise self.fail(f"{len(self.layers) - self.index} layers follow the global pool")
        if self.convs[0].padding != (0, 0):
            raise self.fail("conv1 is padded, so Caffe's input transform cannot be folded into it exactly")
        return self.convs


def caffe_plan(prototxt: str, *, source: str = "<prototxt>") -> tuple[list[CaffeConv], tuple[int, int]]:
    """The convolution layers in Caffe's (= the ``.net`` file's) order, and the trained input size."""
    net = parse_prototxt(prototxt, source=source)
    try:
        plan = _Plan(net, source)
        return plan.run(_architecture()), plan.input_size
    except DeepCompressionError as exc:
        if str(exc).startswith(source):
            raise
        raise DeepCompressionError(f"{source}: {exc}") from None


def _architecture() -> nn.Module:
    return torchvision.models.squeezenet1_0(weights=None)


# --------------------------------------------------------------------------------------------------------
# The .net file


@dataclass(frozen=True)
class DecodedLayer:
    """One decoded convolution: dense float32 weights and biases, and what the file said about them."""

    conv: CaffeConv
    weight: np.ndarray  #: float32, ``conv.weight_shape``
    bias: np.ndarray  #: float32, ``[out]``
    stored: int  #: the header's count: entries in the file (non-zeros + fillers)
    fillers: int  #: code-0 entries that only bridge a gap longer than 16


class _Bytes:
    def __init__(self, buffer: bytes, source: str):
        self.buffer, self.source, self.offset = buffer, source, 0

    def take(self, dtype: str, count: int, what: str) -> np.ndarray:
        size = np.dtype(dtype).itemsize * count
        if self.offset + size > len(self.buffer):
            raise DeepCompressionError(
                f"{self.source} ends at byte {len(self.buffer)} inside {what} (needs {self.offset + size}): "
                "the file is truncated or belongs to another network"
            )
        values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.offset)
        self.offset += size
        return values


def decode_layers(buffer: bytes, convs: Sequence[CaffeConv], *, source: str = "<net>") -> list[DecodedLayer]:
    """Decode every layer of a ``.net`` file (see the module docstring), checking each structural fact."""
    data = _Bytes(buffer, source)
    counts = data.take("<u4", len(convs), "the header of non-zero counts")
    decoded = []
    for conv, stored in zip(convs, counts.tolist(), strict=True):
        size = int(np.prod(conv.weight_shape))
        where = f"{source}: layer {conv.name!r} ({conv.key})"
        if not 0 < stored <= size:
            raise DeepCompressionError(f"{where}: the header stores {stored} entries for {size} weights")
        codebook = data.take("<f4", CODEBOOK_SIZE, f"the codebook of {conv.name!r}")
        bias = data.take("<f4", conv.weight_shape[0], f"the bias of {conv.name!r}").copy()
        codes = data.take("u1", stored, f"the codes of {conv.name!r}")
        nibbles = data.take("u1", (stored + 1) // 2, f"the indices of {conv.name!r}")
        gaps = np.stack([nibbles & 0x0F, nibbles >> 4], axis=1).reshape(-1)[:stored].astype(np.int64)
        positions = np.cumsum(gaps + 1) - 1
        if codebook[0] != 0.0:
            raise DeepCompressionError(f"{where}: codebook entry 0 is {codebook[0]}, not the pruned 0.0")
        if positions[-1] >= size:
            raise DeepCompressionError(f"{where}: the indices run to {positions[-1]}, past {size} weights")
        fillers = codes == 0
        if (gaps[fillers] != _MAX_GAP_NIBBLE).any():
            raise DeepCompressionError(f"{where}: a zero code that is not a gap filler: not this format")
        if not (np.isfinite(codebook).all() and np.isfinite(bias).all()):
            raise DeepCompressionError(f"{where}: non-finite codebook or bias values: corrupt file")
        weight = np.zeros(size, dtype=np.float32)
        weight[positions] = codebook[codes]
        decoded.append(
            DecodedLayer(conv, weight.reshape(conv.weight_shape), bias, int(stored), int(fillers.sum()))
        )
    if data.offset != len(buffer):
        raise DeepCompressionError(
            f"{source} has {len(buffer) - data.offset} bytes after the last layer: it does not belong to "
            "this prototxt"
        )
    return decoded


# --------------------------------------------------------------------------------------------------------
# Caffe's input


def caffe_input(x: Tensor, mean_bgr: Sequence[float] = CAFFE_MEAN_BGR) -> Tensor:
    """RGB images in [0, 1] ``[..., 3, H, W]`` -> Caffe's input ``255 * x[BGR] - mean_bgr``."""
    mean = torch.tensor(mean_bgr, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return 255.0 * x.flip(-3) - mean


def fold_caffe_input(
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    mean_bgr: Sequence[float] = CAFFE_MEAN_BGR,
) -> tuple[np.ndarray, np.ndarray]:
    """``conv1`` weights for Caffe's input -> the same layer on ``(x - mean) / std`` (module docstring).

    Only exact for an unpadded first convolution, which :func:`caffe_plan` checks.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 4 or w.shape[1] != 3:
        raise ValueError(f"expected first-layer weights [out, 3, kh, kw], got shape {w.shape}")
    rgb = w[:, ::-1]  # Caffe's channel 2 - c is RGB channel c
    scale = 255.0 * np.asarray(std, dtype=np.float64)
    shift = 255.0 * np.asarray(mean, dtype=np.float64) - np.asarray(mean_bgr, dtype=np.float64)[::-1]
    folded = rgb * scale.reshape(1, 3, 1, 1)
    folded_bias = np.asarray(bias, dtype=np.float64) + (rgb * shift.reshape(1, 3, 1, 1)).sum(axis=(1, 2, 3))
    return folded.astype(np.float32), folded_bias.astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# Conversion and loading


def squeezenet1_0_with_padding(padding: Mapping[str, Sequence[int]]) -> nn.Module:
    """torchvision's (random) ``squeezenet1_0`` with the given convolutions' padding set (Caffe's)."""
    model = _architecture()
    modules = dict(model.named_modules())
    for key, pad in padding.items():
        conv = modules.get(key)
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{key!r} is not a convolution of squeezenet1_0")
        conv.padding = (int(pad[0]), int(pad[1]))
    return model


def convert_deepcompression(
    net: bytes, prototxt: str, *, source: str = "<deepcompression>", fold: bool = True
) -> dict[str, Any]:
    """``{"state_dict", "padding"}`` for :func:`squeezenet1_0_with_padding`; ``padding`` lists the
    convolutions whose Caffe padding differs from torchvision's. ``fold=False`` keeps Caffe's ``conv1``
    (the model then takes :func:`caffe_input`)."""
    convs, _ = caffe_plan(prototxt, source=source)
    layers = decode_layers(net, convs, source=source)
    model = _architecture()
    modules = dict(model.named_modules())
    state: dict[str, Tensor] = {}
    padding: dict[str, list[int]] = {}
    for layer in layers:
        weight, bias = layer.weight, layer.bias
        if layer.conv.key == convs[0].key and fold:
            weight, bias = fold_caffe_input(weight, bias)
        state[f"{layer.conv.key}.weight"] = torch.from_numpy(np.ascontiguousarray(weight))
        state[f"{layer.conv.key}.bias"] = torch.from_numpy(np.ascontiguousarray(bias))
        if tuple(modules[layer.conv.key].padding) != layer.conv.padding:
            padding[layer.conv.key] = list(layer.conv.padding)
    target = model.state_dict()
    if set(state) != set(target):  # the walk covers every torchvision conv; this guards the walk itself
        raise DeepCompressionError(
            f"{source}: internal error, keys {sorted(set(target) ^ set(state))} differ"
        )
    return {"state_dict": state, "padding": padding}


def load_deepcompression(
    net_path: str | os.PathLike[str],
    prototxt_path: str | os.PathLike[str],
    *,
    expected_sha256: tuple[str, str] | None = None,
    cache: bool = True,
    fold: bool = True,
) -> nn.Module:
    """torchvision's ``squeezenet1_0`` with the decoded Deep Compression weights, eval mode, CPU.

    ``fold=True`` (default): takes the ImageNet normalisation; ``False``: Caffe's input (:func:`caffe_input`).
    ``expected_sha256``: ``(net, prototxt)`` hashes; a differing file (corrupt, or another model) is refused
    with an error naming it. Cache entry: ``<cache_dir>/deepcompression/<net sha>-<prototxt sha>-v<n>.pt``
    (``...-caffe-v<n>.pt`` for ``fold=False``).
    """
    files = (Path(net_path), Path(prototxt_path))
    expected = expected_sha256 or (None, None)
    digests = tuple(
        verified_sha256(path, f"Deep Compression {what} file", sha, DeepCompressionError)
        for path, what, sha in zip(files, (".net", ".prototxt"), expected, strict=True)
    )

    def convert() -> dict[str, Any]:
        try:
            text = files[1].read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DeepCompressionError(f"{files[1]} is not a text prototxt: {exc}") from exc
        payload = convert_deepcompression(
            files[0].read_bytes(), text, source=f"{files[0]} + {files[1].name}", fold=fold
        )
        return {**payload, "sha256": list(digests)}

    key = "-".join(digests) + ("" if fold else "-caffe")
    return cached_conversion("deepcompression", key, CONVERTER_VERSION, convert, _restore, use_cache=cache)


def _restore(payload: dict[str, Any]) -> nn.Module:
    model = squeezenet1_0_with_padding(payload["padding"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()
