"""Shared machinery of every CAM method: layer resolution, input and target checks, model-state
restoration, the clean forward that captures the target layer, and map normalisation.

A method subclasses :class:`CAM` and implements :meth:`CAM._raw` (and :meth:`CAM.finish` when its last steps
differ); everything else lives here once.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iscam.batching import run_chunks
from iscam.layers import DEFAULT_TARGET_LAYERS, layer_name, resolve_layer

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "AMP_MODES",
    "amp_autocast",
    "CAM",
    "Target",
    "default_target_layer",
    "minmax_normalize",
    "upsample",
]

#: What ``target`` may be: None (argmax of the clean logits), one class for the whole batch, or one per image.
Target = int | Sequence[int] | Tensor | None

#: Mixed-precision modes accepted by ``amp=``: None (the input's own dtype), bfloat16 or float16 autocast.
AMP_MODES: tuple[str | None, ...] = (None, "bf16", "fp16")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager[Any]:
    """Autocast to the dtype of ``amp`` (``"bf16"`` / ``"fp16"``) on ``device``; ``None``: no autocast."""
    if amp is None:
        return contextlib.nullcontext()
    if amp not in _AMP_DTYPES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[amp])


def default_target_layer(model: nn.Module) -> str:
    """The paper's target layer for ``model``: its ``default_target_layer`` attribute (set by
    :func:`iscam.models.load`), else found from its class (VGG, ResNet-18, SqueezeNet, MobileNetV2).

    Raises ``ValueError`` when the architecture has no known default, so the caller passes ``target_layer``.
    """
    declared = getattr(model, "default_target_layer", None)
    if isinstance(declared, str):  # set by iscam.models.load on every model it returns
        return declared
    kind = type(model).__name__
    key: str | None = None
    if kind == "VGG":
        key = "vgg16"
    elif kind == "ResNet" and _resnet_depth(model) == 18:
        key = "resnet18"
    elif kind == "SqueezeNet":
        key = "squeezenet1_0"
    elif kind == "MobileNetV2":
        key = "mobilenet_v2"
    if key is None:
        known = ", ".join(sorted(DEFAULT_TARGET_LAYERS))
        raise ValueError(
            f"no default target layer for a {kind}: pass target_layer= (a name from model.named_modules() "
            f"or the module itself); defaults exist for {known}"
        )
    return DEFAULT_TARGET_LAYERS[key]


def _resnet_depth(model: nn.Module) -> int | None:
    """Depth of a torchvision ResNet from its block counts (18 = four stages of two basic blocks)."""
    stages = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    if any(not isinstance(stage, nn.Sequential) for stage in stages):
        return None
    blocks = [block for stage in stages for block in stage]  # type: ignore[union-attr]
    convs_per_block = 3 if type(blocks[0]).__name__ == "Bottleneck" else 2
    return convs_per_block * len(blocks) + 2


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``[B, K, h, w]`` maps to ``size``, ``align_corners=False`` (the authors' setting)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def minmax_normalize(maps: Tensor, dims: tuple[int, ...] = (-2, -1)) -> Tensor:
    """``(m - min) / (max - min)`` over ``dims``; a constant map (e.g. all zero) becomes zero, never NaN."""
    low = maps.amin(dim=dims, keepdim=True)
    span = maps.amax(dim=dims, keepdim=True) - low
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (maps - low) / safe, torch.zeros_like(maps))


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode and give every submodule its own training flag back afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training


class CAM(ABC):
    """A class-activation-map method: ``cam(x, target)`` -> saliency ``[B, H, W]`` in [0, 1] on ``x.device``.

    Args:
        model: the classifier (its ``training`` flags are restored after every call; its weights and their
            ``requires_grad`` flags are never changed, except for the memory layout with ``channels_last``).
        target_layer: a dotted name from ``model.named_modules()`` or the module itself; ``None`` picks the
            paper's layer for VGG-16, ResNet-18, SqueezeNet 1.0 and MobileNetV2 and raises otherwise.
        batch_size: images per forward pass for methods that forward many perturbed inputs; ``None`` picks
            one from the device (halved automatically on CUDA out-of-memory).
        amp: ``None``, ``"bf16"`` or ``"fp16"``: autocast of the perturbed forwards to bfloat16 or float16.
            Both run at the same rate on recent GPUs; float16 keeps 3 more mantissa bits, so its class
            probabilities, and the Score family's weights, stay closer to float32 (see benchmarks/gpu.py).
        channels_last: convert the model and the perturbed inputs to the channels-last memory layout (faster
            convolutions on recent GPUs; values unchanged).

    Attributes:
        forward_count: cumulative number of images this object has forwarded through the model.
        last_stats: counts of the last call (``forwards``, and for the Score family ``channels``,
            ``skipped_constant``, ``deduplicated``).
    """

    #: Registry name used by :func:`iscam.methods.get`.
    name: ClassVar[str] = ""
    #: The name tables and figures show (the paper's spelling).
    display_name: ClassVar[str] = ""
    #: Whether the method reads a target layer (the random baseline does not).
    uses_layer: ClassVar[bool] = True
    #: Whether the map depends on random numbers (then a ``seed`` argument makes it repeatable).
    stochastic: ClassVar[bool] = False
    #: Constructor parameters that change speed or memory, never the map: kept out of a stored row's key.
    execution_params: ClassVar[frozenset[str]] = frozenset({"batch_size", "amp", "channels_last"})
    #: Bumped whenever a change to the code changes this method's maps; stored with every row, so results
    #: of an older algorithm are never mixed with new ones (see :mod:`iscam.runner`).
    algorithm_version: ClassVar[int] = 1

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        batch_size: int | None = None,
        amp: str | None = None,
        channels_last: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)):
            raise TypeError(f"batch_size must be a positive int or None, got {batch_size!r}")
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
        self.model = model
        self.layer: nn.Module | None = None
        self.target_layer: str | None = None
        if self.uses_layer:
            layer = default_target_layer(model) if target_layer is None else target_layer
            self.layer = resolve_layer(model, layer)
            self.target_layer = layer_name(model, self.layer)
        self.batch_size = batch_size
        self.amp = amp
        self.channels_last = bool(channels_last)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.forward_count = 0
        self.last_stats: dict[str, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._closed = False

    # ------------------------------------------------------------------ public interface
    def __call__(self, x: Tensor, target: Target = None) -> Tensor:
        """Saliency maps ``[B, H, W]`` (float32, in [0, 1], on ``x.device``) for the classes ``target``.

        ``target=None`` explains the argmax of the model's logits on the clean ``x``. Equal to
        ``finish(raw_maps(x, target), (H, W), **parameters)``.
        """
        raw = self.raw_maps(x, target)
        return self.finish(raw, (x.shape[-2], x.shape[-1]), **self._finish_params()).to(torch.float32)

    def raw_maps(self, x: Tensor, target: Target = None) -> Tensor:
        """The maps before their last, model-free steps (``[B, h, w]``, at the target layer's resolution for
        the CAM methods): what the results store keeps, since :meth:`finish` rebuilds the full-size map from
        it exactly (bilinear upsampling is linear, so a 7x7 map stands for a 224x224 one).
        """
        self._check_open()
        x = self._check_input(x)
        start = self.forward_count
        self.last_stats = {}
        with _eval_mode(self.model):
            raw = self._raw(x, target)
        self.last_stats["forwards"] = self.forward_count - start
        return raw

    @classmethod
    def finish(cls, raw: Tensor, size: tuple[int, int], **parameters: Any) -> Tensor:
        """Full-size maps ``[B, H, W]`` in [0, 1] from :meth:`raw_maps`: ``minmax(up(ReLU(raw)))``.

        ``parameters`` are the method's constructor parameters (those that change the last steps are read,
        e.g. the Score family's ``protocol``; the others are ignored), so a stored map is rebuilt from the
        row's parameters alone, without the model.
        """
        return minmax_normalize(upsample(torch.relu(raw).unsqueeze(1), size)).squeeze(1)

    def close(self) -> None:
        """Remove every hook this object placed on the model; the object cannot be called afterwards."""
        self._remove_hooks()
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._extra_repr()})"

    # ------------------------------------------------------------------ for subclasses
    @abstractmethod
    def _raw(self, x: Tensor, target: Target) -> Tensor:
        """Raw maps ``[B, h, w]`` (see :meth:`raw_maps`) for a checked ``x``; called with the model in eval mode."""

    def _finish_params(self) -> dict[str, Any]:
        """The parameters :meth:`finish` reads, from this object."""
        return {}

    def _extra_repr(self) -> str:
        return f"target_layer={self.target_layer!r}"

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} was closed: create a new one to compute more maps")

    @staticmethod
    def _check_input(x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape [B, 3, H, W], got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"x must be a 4-D batch [B, 3, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != 3:
            raise ValueError(
                f"x must have 3 colour channels (shape [B, 3, H, W]), got shape {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            raise ValueError("x is an empty batch")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point (normalised) tensor, got {x.dtype}")
        return x

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        return amp_autocast(device, self.amp)

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _hooked_forward(self, x: Tensor, *, grad: bool) -> tuple[Tensor, Tensor]:
        """Forward ``x`` once with a hook on the target layer; return (logits, target-layer activation).

        The hook exists only during this forward, so the many perturbed forwards that follow run hook-free.
        With ``grad=True`` the activation is returned as a fresh leaf that requires grad and the model
        continues from a copy of it: gradients with respect to it are available even if the weights are
        frozen, and nothing upstream of the layer is back-propagated.
        """
        assert self.layer is not None
        captured: list[Tensor] = []

        def capture(_module: nn.Module, _inputs: tuple[Any, ...], output: Any) -> Tensor | None:
            if not isinstance(output, Tensor) or output.ndim != 4:
                raise TypeError(
                    f"target layer {self.target_layer!r} must output a [B, K, h, w] tensor, got "
                    f"{type(output).__name__}{'' if not isinstance(output, Tensor) else tuple(output.shape)}"
                )
            if grad:
                leaf = output.detach().requires_grad_(True)
                captured.append(leaf)
                return leaf.clone()  # a non-leaf copy, so in-place layers downstream stay legal
            captured.append(output.detach())
            return None

        handle = self.layer.register_forward_hook(capture)
        self._handles.append(handle)
        try:
            logits = self.model(x)
        finally:
            handle.remove()
            self._handles.remove(handle)
        self.forward_count += x.shape[0]
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            raise TypeError(
                f"the model must return logits [B, classes], got {getattr(logits, 'shape', logits)}"
            )
        if not captured:
            raise RuntimeError(f"target layer {self.target_layer!r} was not called during the forward pass")
        return logits, captured[-1]

    @staticmethod
    def _resolve_target(target: Target, logits: Tensor) -> Tensor:
        """The class index per image as a LongTensor ``[B]`` on the logits' device (argmax when None)."""
        batch, classes = logits.shape
        if target is None:
            return logits.detach().argmax(dim=1)
        indices = _target_indices(target, batch).to(device=logits.device)
        # One host sync per call: the range check must see the values.
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= classes:
            bad = low if low < 0 else high
            raise ValueError(
                f"target class {bad} is out of range: the model has {classes} classes (0..{classes - 1})"
            )
        return indices

    def _default_batch_size(self, device: torch.device) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return 512 if device.type == "cuda" else 32

    def _run_chunks(self, total: int, device: torch.device, step: Callable[[slice], None]) -> None:
        """Call ``step(rows)`` over ``range(total)`` in chunks of the batch size.

        One loop for methods and metrics (:func:`iscam.batching.run_chunks`): the chunk size starts at
        ``batch_size`` (or the device default) and is halved on CUDA out-of-memory, retrying the same rows;
        the size that worked is kept for later calls. ``step`` must leave its results on the device (no
        per-chunk host sync) and count its forwards.
        """
        size = self._default_batch_size(device)
        worked = run_chunks(total, size, step)
        if worked != size:
            self.batch_size = worked

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _target_indices(target: int | Sequence[int] | Tensor, batch: int) -> Tensor:
    """``target`` as a CPU-or-device LongTensor ``[batch]``; type and length checked, range not (no model)."""
    if isinstance(target, bool):
        raise TypeError("target must be None, an int, a sequence of ints or a LongTensor [B], got a bool")
    if isinstance(target, int):
        indices = torch.full((batch,), target, dtype=torch.long)
    elif isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"target tensor must hold integer class indices, got {target.dtype}")
        if target.ndim > 1:
            raise ValueError(f"target tensor must be 1-D [B], got shape {tuple(target.shape)}")
        indices = target.reshape(1).expand(batch) if target.ndim == 0 else target
    elif isinstance(target, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in target):
        indices = torch.tensor(list(target), dtype=torch.long)
    else:
        raise TypeError(
            "target must be None, an int, a sequence of ints or a LongTensor [B], "
            f"got {type(target).__name__}"
        )
    if indices.shape[0] != batch:
        raise ValueError(f"target has {indices.shape[0]} entries but the batch has {batch} images")
    if indices.numel() and int(indices.min()) < 0:
        raise ValueError(f"target class {int(indices.min())} is out of range: class indices start at 0")
    return indices.to(torch.long)


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _check_non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a non-negative number, got {value!r}")
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value}")
    return float(value)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return seed


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(repr(c) for c in choices)}")
    return str(value)

