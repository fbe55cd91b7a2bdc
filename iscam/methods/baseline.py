"""A random-saliency baseline: the sanity row every metric table needs (real explanations must beat it)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from iscam.methods.base import CAM, Target, _check_seed, _target_indices

__all__ = ["RandomCAM"]


class RandomCAM(CAM):
    """Uniform random saliency in [0, 1) at the input resolution, independent of the model and the target.

    Maps come from a CPU ``torch.Generator`` seeded once with ``seed`` at construction and advanced by every
    call, so a given seed and sequence of calls always yields the same maps, on any device. The model is
    never run (``forward_count`` stays 0), so ``target`` is only checked for type, length and sign;
    ``target_layer``, ``batch_size``, ``amp`` and ``channels_last`` are accepted for a uniform interface and
    ignored.
    """

    name = "random"
    display_name = "Random"
    uses_layer = False
    stochastic = True

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        seed: int = 0,
        batch_size: int | None = None,
        amp: str | None = None,
        channels_last: bool = False,
    ) -> None:
        _check_seed(seed)
        super().__init__(model, None, batch_size=batch_size, amp=amp, channels_last=False)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    def _raw(self, x: Tensor, target: Target) -> Tensor:
        batch, _, height, width = x.shape
        if target is not None:
            _target_indices(target, batch)  # type and length only: the model (and its class count) is not run
        return torch.rand((batch, height, width), generator=self._generator).to(x.device)

    @classmethod
    def finish(cls, raw: Tensor, size: tuple[int, int], **_: Any) -> Tensor:
        """The raw maps already are the maps (at the input size)."""
        return raw

    @staticmethod
    def regenerate(seed: int, size: tuple[int, int]) -> Tensor:
        """The map ``[H, W]`` the first call of ``RandomCAM(model, seed=seed)`` draws for one image: a stored
        row of the random baseline is rebuilt from its seed instead of keeping ``H x W`` floats."""
        return torch.rand((1, *size), generator=torch.Generator().manual_seed(_check_seed(seed)))[0]

    def _extra_repr(self) -> str:
        return f"seed={self.seed}"
