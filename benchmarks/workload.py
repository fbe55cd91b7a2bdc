"""What the benchmarks time: the model a ``--models`` name means, the methods with a config's parameters, and
TorchCAM's counterpart of each method, counted forward by forward.

- **Models** (:func:`parse_model`): ``NAME`` or ``NAME:WEIGHTS``, a name of :data:`iscam.models.MODELS` and
  one of its ``weights=`` options (``squeezenet1_0:deepcompression``, ``squeezenet1_1:ncnn``) or ``random``
  (:data:`RANDOM`). A bare name means the model's offline default weights where it has them (the Coral
  models) and random weights for the torchvision architectures, whose weights are a download: a benchmark
  never downloads unless told ``NAME:default``.
- **Methods** (:func:`method_params`): the parameters of every method come from a shipped config (default
  ``squeezenet``: the paper's N and sigma, the same in every paper config), so a benchmark times what
  ``iscam run`` computes; ``--set methods.iscam.N=5`` overrides one as ``iscam run --set`` does.
- **TorchCAM** (:data:`TORCHCAM_METHODS`): TorchCAM 0.5.0 has all six of the paper's methods and no random
  baseline. Its extractors get the same number of samples / steps (``num_samples``) and noise scale
  (``std``) as iscam's, and otherwise run their own protocol (TorchCAM's Score family scores logit differences
  and softmaxes them across channels; its SS-CAM adds the noise to the mask, its IS-CAM scales the masked
  input by the running sum of ``(i + 1) / N``); each scores every channel, at its default batch of 32.
- **Forwards** (:func:`counted_forwards`): images through the model's ``forward``, counted by a pre-hook, for
  both libraries alike (for iscam it must equal the method's own ``forward_count``).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from iscam import config, methods, models

__all__ = [
    "LAYOUTS",
    "RANDOM",
    "TORCHCAM_METHODS",
    "BenchModel",
    "ChannelsLast",
    "ForwardCounter",
    "TorchCAMCounterpart",
    "counted_forwards",
    "method_label",
    "method_params",
    "model_argument",
    "parse_model",
    "torchcam_explain",
    "torchcam_extractor",
]

#: Memory layouts a benchmark can run in: PyTorch's default, and channels-last (what ``channels_last: true``
#: in the shipped configs gives; it halves a SqueezeNet's Score-CAM time on a CPU, see benchmarks/README.md).
LAYOUTS: tuple[str, ...] = ("contiguous", "channels_last")
#: The ``NAME:WEIGHTS`` spelling of random initialisation (``weights=None`` of :func:`iscam.models.load`).
RANDOM = "random"


@dataclass(frozen=True)
class BenchModel:
    """A model of the registry with the weights a benchmark runs it with (``None``: random initialisation)."""

    name: str
    weights: str | None

    @property
    def spec(self) -> str:
        """The ``--models`` spelling that gives this model back (a bare name where it means these weights)."""
        return self.name if self == parse_model(self.name) else f"{self.name}:{self.weights or RANDOM}"

    @property
    def real(self) -> bool:
        """Trained weights (then the benchmarks explain real sample images)."""
        return self.weights is not None

    @property
    def label(self) -> str:
        """Model and weights as tables show them: ``SqueezeNet1.1 [SqueezeNet 1.1, torchvision ...]``."""
        return f"{models.model_label(self.name)} [{models.weights_label(self.name, self.weights)}]"

    def load(self, **kwargs: Any) -> models.LoadedModel:
        """``iscam.models.load(name, weights, **kwargs)``; seed torch first for repeatable random weights."""
        return models.load(self.name, self.weights, **kwargs)


def parse_model(spec: str) -> BenchModel:
    """``NAME`` or ``NAME:WEIGHTS`` -> :class:`BenchModel` (see the module docstring); a ValueError names the
    known models or the model's weights options."""
    if not isinstance(spec, str):
        raise TypeError(f"a model is given as 'NAME' or 'NAME:WEIGHTS', got {spec!r}")
    name, colon, weights = spec.partition(":")
    if name not in models.MODELS:
        raise ValueError(f"unknown model {name!r} in {spec!r}; models: {', '.join(models.MODEL_NAMES)}")
    info = models.MODELS[name]
    if not colon:
        return BenchModel(name, None if info.torchvision_architecture else "default")
    if weights == RANDOM:
        return BenchModel(name, None)
    if weights not in info.weights:
        raise ValueError(f"{name} has no weights {weights!r} (in {spec!r}); its weights: "
                         f"{', '.join([*info.weights, RANDOM])}")
    return BenchModel(name, weights)


def model_argument(spec: str) -> BenchModel:
    """:func:`parse_model` for argparse's ``type=``: its message reaches the user unchanged."""
    try:
        return parse_model(spec)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def method_params(config_name: str, overrides: Sequence[str] = (),
                  names: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Method name -> its parameters in config ``config_name`` (with ``--set`` style ``overrides``), for
    ``names`` (default: every method of the config); a ValueError names a method the config lacks."""
    params = {spec.name: dict(spec.params) for spec in config.load_config(config_name, overrides).methods}
    missing = [name for name in (names or ()) if name not in params]
    if missing:
        raise ValueError(f"config {config_name!r} has no method {', '.join(missing)}; it has "
                         f"{', '.join(params)}")
    return {name: params[name] for name in (names or params)}


def method_label(name: str, params: Mapping[str, Any]) -> str:
    """The paper's name with the parameters, e.g. ``IS-CAM (N=10, schedule=authors)``."""
    shown = ", ".join(f"{key}={value}" for key, value in params.items())
    return f"{methods.PAPER_NAMES[name]} ({shown})" if shown else methods.PAPER_NAMES[name]


@dataclass
class ForwardCounter:
    """Images forwarded so far (filled by :func:`counted_forwards`)."""

    images: int = 0


@contextmanager
def counted_forwards(model: nn.Module) -> Iterator[ForwardCounter]:
    """Count the images of every ``model(x)`` call inside the block (a forward pre-hook on ``model``)."""
    counter = ForwardCounter()

    def count(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
        counter.images += inputs[0].shape[0]

    handle = model.register_forward_pre_hook(count)
    try:
        yield counter
    finally:
        handle.remove()


class ChannelsLast(nn.Module):
    """``model`` in the channels-last layout, converting its inputs too, as ``iscam run`` does for the metric
    frames; for TorchCAM and the metrics, which do not convert their inputs themselves. The wrapped model's
    layers are named ``model.<name>``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


@dataclass(frozen=True)
class TorchCAMCounterpart:
    """A TorchCAM extractor standing in for one of iscam's methods."""

    class_name: str  #: in ``torchcam.methods``
    arguments: Mapping[str, str]  #: iscam parameter -> TorchCAM argument of the same meaning
    gradient: bool  #: back-propagates the user's scores, so the user's forward runs with autograd


#: TorchCAM's counterpart of each of the paper's six methods (TorchCAM has no random baseline).
TORCHCAM_METHODS: dict[str, TorchCAMCounterpart] = {
    "gradcam": TorchCAMCounterpart("GradCAM", {}, True),
    "gradcampp": TorchCAMCounterpart("GradCAMpp", {}, True),
    "smoothgradcampp": TorchCAMCounterpart(
        "SmoothGradCAMpp", {"n_samples": "num_samples", "noise_std": "std"}, True
    ),
    "scorecam": TorchCAMCounterpart("ScoreCAM", {}, False),
    "sscam": TorchCAMCounterpart("SSCAM", {"N": "num_samples", "sigma": "std"}, False),
    "iscam": TorchCAMCounterpart("ISCAM", {"N": "num_samples"}, False),
}


def torchcam_extractor(name: str, params: Mapping[str, Any], model: nn.Module, layer: str,
                       input_shape: tuple[int, ...]) -> Any:
    """TorchCAM's extractor for iscam method ``name`` with ``params`` translated (a context manager that
    removes its hooks); a ValueError for the random baseline, which TorchCAM lacks."""
    if name not in TORCHCAM_METHODS:
        raise ValueError(f"TorchCAM has no counterpart of {name!r}; it has {', '.join(TORCHCAM_METHODS)}")
    import torchcam.methods

    counterpart = TORCHCAM_METHODS[name]
    arguments = {theirs: params[ours] for ours, theirs in counterpart.arguments.items() if ours in params}
    extractor_class = getattr(torchcam.methods, counterpart.class_name)
    return extractor_class(model, layer, input_shape=input_shape, **arguments)


def torchcam_explain(extractor: Any, name: str, model: nn.Module, x: Tensor, target: Tensor | None = None
                     ) -> Tensor:
    """TorchCAM's maps ``[B, h, w]`` (at the layer's resolution) for classes ``target`` (None: the argmax of
    the user's logits), as a TorchCAM user computes them: the user's forward (with autograd only for the
    gradient methods), then the extractor."""
    with torch.set_grad_enabled(TORCHCAM_METHODS[name].gradient):
        logits = model(x)
    classes = logits.argmax(dim=1) if target is None else target
    return extractor(classes.tolist(), logits)[0]
