"""The Score-CAM family: Score-CAM, SS-CAM and IS-CAM, batched across images, channels and steps.

All three weight each activation map by how much the model still believes in the target class when it
sees the input masked by that map. They differ only in the perturbed inputs built from one mask
(one plain input, N noisy ones, N scaled ones), which is the one method each subclass overrides.

Faithful default (``protocol="authors"``, the code behind the paper's numbers):

- ``U_k = up(A_k)`` bilinear, ``align_corners=False``, to the input size; channel ``k`` is skipped
  (weight 0) when ``U_k`` is constant; ``M_k = (U_k - min U_k) / (max U_k - min U_k)``;
- scores are the softmax probability ``p_c`` of the target class ``c``;
- ``L = minmax(ReLU(sum_k alpha_k U_k))`` over the whole map (an all-zero map stays zero). It is computed as
  ``up(sum_k alpha_k A_k)``, equal because bilinear interpolation is linear, and much cheaper.

``protocol="torchcam"`` reproduces TorchCAM 0.5.0 instead: masks are min-max normalised *before* upsampling
(with ``+1e-8`` in the denominator, no channel skipped), the score is the target logit minus the clean
input's target logit, the averaged scores are turned into weights by a softmax across channels, and the map
is ``ReLU(sum_k w_k A_k)`` normalised at the layer's resolution, then upsampled. Each of these steps is one
method of a protocol object (:class:`ScoreProtocol`, :class:`TorchCAMProtocol`), so the shared machinery
below has no branch on the protocol.

Speed: every (image, channel, step) triple is one row of a work list that is forwarded in chunks of
``batch_size`` across channels, steps and images; constant channels are never forwarded, channels whose
min-max normalised activation maps are identical (so their masks agree up to float rounding) are forwarded
once and share the result, scores stay on the device until the end, every chunk's perturbed inputs are
built in place in the same buffer (:class:`iscam.batching.ChunkBuffer`), and ``amp="bf16"|"fp16"``,
``channels_last=True`` and ``compile=True`` speed up the perturbed forwards.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from iscam.batching import ChunkBuffer
from iscam.methods.base import (
    CAM,
    Target,
    _check_choice,
    _check_non_negative,
    _check_positive_int,
    _check_seed,
    _eval_mode,
    minmax_normalize,
    upsample,
)

__all__ = [
    "ISCAM",
    "ISCAMTrace",
    "SCORE_PROTOCOLS",
    "ScoreProtocol",
    "TorchCAMProtocol",
    "NOISE_MODES",
    "PROTOCOLS",
    "SCHEDULES",
    "SSCAM",
    "ScoreCAM",
    "iscam_coefficients",
    "sscam_noise_seed",
]

#: ``protocol=`` choices of the Score family.
PROTOCOLS: tuple[str, ...] = ("authors", "torchcam")
#: ``schedule=`` choices of IS-CAM (see :func:`iscam_coefficients`).
SCHEDULES: tuple[str, ...] = ("authors", "paper", "linear")
#: ``noise=`` choices of SS-CAM.
NOISE_MODES: tuple[str, ...] = ("sigma", "authors")

# Masks of this many float elements (all images of a group together) are materialised at once.
_MASK_BUDGET = {"cuda": 2**28, "cpu": 2**26}
# TorchCAM's epsilon in its min-max normalisation.
_TORCHCAM_EPS = 1e-8


def iscam_coefficients(N: int, schedule: str = "authors") -> list[float]:
    """The input scales ``a_1..a_N`` of IS-CAM's N forwards, ``alpha_k = mean_i p_c(a_i * X * M_k)``.

    - ``"authors"``: ``a_i = i(i+1)/(2N)`` -- the authors' code adds ``X*M_k*i/N`` to a running mask
      *before* scoring it (0.1, 0.3, ..., 5.5 for N=10);
    - ``"paper"``: ``a_i = i(i-1)/(2N)`` -- eq. 6-7 of the paper with ``M_0 = 0``, which scores the running
      mask before adding the step (0, 0.1, ..., 4.5 for N=10);
    - ``"linear"``: ``a_i = i/N`` -- the straight Integrated-Gradients path from 0 to ``X*M_k``.
    """
    _check_positive_int("N", N)
    _check_choice("schedule", schedule, SCHEDULES)
    steps = range(1, N + 1)
    if schedule == "authors":
        return [i * (i + 1) / (2 * N) for i in steps]
    if schedule == "paper":
        return [i * (i - 1) / (2 * N) for i in steps]
    return [i / N for i in steps]


def sscam_noise_seed(seed: int, channel: int) -> int:
    """Seed of the generator that draws SS-CAM's N noise tensors for one channel (same for every image)."""
    return (seed * 1_000_003 + channel) % (2**63)


# (pid, workers, pool): a forked child makes its own
_DRAW_POOL: tuple[int, int, ThreadPoolExecutor] | None = None


def _draw_in_parallel(draw: Callable[[list[Any]], None], jobs: list[Any], device: torch.device) -> None:
    """``draw(jobs)`` split over torch's intra-op threads on a CPU (on a GPU, one call: its draws are async).

    ``torch.randn`` is single-threaded on a CPU: SS-CAM's noise (N draws of the input's size per channel) took
    a third of its time with one core idle. Every job seeds its own generator, so the draws are the same
    whichever thread makes them and however many there are.
    """
    global _DRAW_POOL
    threads = min(torch.get_num_threads(), len(jobs)) if device.type == "cpu" else 1
    if threads <= 1:
        draw(jobs)
        return
    if _DRAW_POOL is None or _DRAW_POOL[0] != os.getpid() or _DRAW_POOL[1] < threads:
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="iscam-noise")
        _DRAW_POOL = (os.getpid(), threads, pool)
    share = -(-len(jobs) // threads)
    futures = [_DRAW_POOL[2].submit(draw, jobs[i:i + share]) for i in range(0, len(jobs), share)]
    for future in futures:
        future.result()


def _torchcam_normalise(activation: Tensor) -> Tensor:
    """TorchCAM's min-max normalisation of the low-resolution maps (an epsilon instead of a zero check)."""
    shifted = activation - activation.amin(dim=(-2, -1), keepdim=True)
    return shifted / (shifted.amax(dim=(-2, -1), keepdim=True) + _TORCHCAM_EPS)


class ScoreProtocol:
    """How the Score family turns masked inputs into a map: the authors' code (this class) or TorchCAM's
    (:class:`TorchCAMProtocol`). Every step where the two differ is one method here, so each algorithm reads
    straight through: masks and skipped channels, deduplication keys, the score of a perturbed input, the
    weights from the averaged scores, and the last, model-free steps of the map."""

    name: ClassVar[str] = "authors"
    #: SS-CAM's noise goes on the mask (TorchCAM) instead of on the masked input (the authors' SSCAM2).
    noise_on_mask: ClassVar[bool] = False

    @staticmethod
    def masks(activation: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Normalised masks ``[G, K, H, W]`` and the scored channels ``[G, K]``: ``U_k = up(A_k)``, min-max
        normalised after upsampling; a constant ``U_k`` is skipped (weight 0)."""
        masks = upsample(activation, size)
        if masks is activation:  # already at the input size: normalise a copy, not the activation
            masks = masks.clone()
        low = masks.amin(dim=(-2, -1), keepdim=True)
        span = masks.amax(dim=(-2, -1), keepdim=True) - low
        valid = span > 0
        masks.sub_(low).div_(torch.where(valid, span, torch.ones_like(span)))
        return masks.contiguous(), valid[..., 0, 0]

    @staticmethod
    def dedup_keys(activation: Tensor) -> Tensor:
        """Low-resolution keys ``[G, K, h, w]``: channels with equal keys have equal masks (up to rounding,
        since upsampling is linear and min-max normalisation scale- and shift-invariant); float64, so only
        maps whose normalised values agree to ~1e-16 merge."""
        return minmax_normalize(activation.to(torch.float64))

    @staticmethod
    def score(logits: Tensor, labels: Tensor, clean: Tensor) -> Tensor:
        """The score of each perturbed input: the softmax probability of its image's target class."""
        return torch.softmax(logits, 1).gather(1, labels[:, None]).squeeze(1)

    @staticmethod
    def weights(averaged: Tensor, valid: Tensor) -> Tensor:
        """The channel weights from the scores averaged over the steps: as they are, 0 for skipped channels."""
        return torch.where(valid, averaged, torch.zeros_like(averaged))

    @staticmethod
    def finish(raw: Tensor, size: tuple[int, int]) -> Tensor:
        """``minmax(ReLU(up(raw)))`` (ReLU after upsampling, which ``up(sum_k alpha_k A_k) = sum_k alpha_k
        U_k`` makes exact)."""
        return minmax_normalize(torch.relu(upsample(raw.unsqueeze(1), size))).squeeze(1)


class TorchCAMProtocol(ScoreProtocol):
    """TorchCAM 0.5.0's Score family: masks min-max normalised *before* upsampling with ``+1e-8`` (no channel
    skipped), the score is the target logit minus the clean input's, the weights a softmax across channels,
    and the map ``ReLU(sum_k w_k A_k)`` normalised at the layer's resolution, then upsampled."""

    name = "torchcam"
    noise_on_mask = True

    @staticmethod
    def masks(activation: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        masks = upsample(_torchcam_normalise(activation), size).contiguous()
        return masks, torch.ones(masks.shape[:2], dtype=torch.bool, device=masks.device)

    @staticmethod
    def dedup_keys(activation: Tensor) -> Tensor:
        return _torchcam_normalise(activation)  # masks are a function of these, bit for bit

    @staticmethod
    def score(logits: Tensor, labels: Tensor, clean: Tensor) -> Tensor:
        return logits.gather(1, labels[:, None]).squeeze(1) - clean

    @staticmethod
    def weights(averaged: Tensor, valid: Tensor) -> Tensor:
        return torch.softmax(averaged, dim=1)

    @staticmethod
    def finish(raw: Tensor, size: tuple[int, int]) -> Tensor:
        return upsample(_torchcam_normalise(torch.relu(raw.unsqueeze(1))), size).squeeze(1)


#: The Score family's protocols by ``protocol=`` name.
SCORE_PROTOCOLS: dict[str, type[ScoreProtocol]] = {p.name: p for p in (ScoreProtocol, TorchCAMProtocol)}


class _ScoreFamily(CAM):
    """Shared batching of the Score family; a subclass defines ``_steps`` and ``_perturb``."""

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        protocol: str = "authors",
        dedup: bool = True,
        batch_size: int | None = None,
        amp: str | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        self.protocol = _check_choice("protocol", protocol, PROTOCOLS)
        self._protocol = SCORE_PROTOCOLS[self.protocol]
        self.dedup = bool(dedup)
        self.compile = bool(compile)
        self._compiled: nn.Module | None = None
        super().__init__(model, target_layer, batch_size=batch_size, amp=amp, channels_last=channels_last)

    execution_params = CAM.execution_params | {"dedup", "compile"}

    # Perturbed inputs per mask: 1 for Score-CAM, N for SS-CAM and IS-CAM.
    _steps: int = 1
    # Whether duplicate channels must know their representative even without dedup (seeded noise).
    _needs_canonical: ClassVar[bool] = False

    def _perturb(
        self, inputs: Tensor, masks: Tensor, rows: Tensor, steps: Tensor, channels: list[int], first_step: int
    ) -> Tensor:
        """Perturbed inputs ``[n, 3, H, W]`` of one chunk, built in place in ``inputs``.

        ``inputs[j]`` / ``masks[j]`` (``[n, 3, H, W]`` / ``[n, 1, H, W]``, in the input's dtype) hold the
        image and the mask of row ``j``: scratch rows of a :class:`~iscam.batching.ChunkBuffer` that a
        method may overwrite. ``rows[j]`` is the chunk's (image, channel) pair of row ``j``, ``steps[j]``
        its step in ``0..N-1`` and ``channels[p]`` the channel of pair ``p`` (the first channel with the same
        mask). The chunk runs through its pairs in order, steps ``0..N-1`` each, starting at step
        ``first_step`` of pair 0 (the same on the host). The product of gathered rows equals the gathered
        product bit for bit, so filling in place gives the values of the allocating expressions it replaced
        (``(X * M)[rows]``).
        """
        return inputs.mul_(masks)

    # ------------------------------------------------------------------ public
    def channel_weights(self, x: Tensor, target: Target = None) -> Tensor:
        """The per-channel weights ``alpha_k`` (``[B, K]``) that combine the activation maps.

        Float64 when ``x`` is float64, else float32; skipped (constant) channels have weight 0.
        """
        self._check_open()
        x = self._check_input(x)
        start = self.forward_count
        with _eval_mode(self.model):
            weights, _ = self._weights(x, target)
        self.last_stats["forwards"] = self.forward_count - start
        return weights

    def _raw(self, x: Tensor, target: Target) -> Tensor:
        """``sum_k alpha_k A_k`` at the layer's resolution, before the ReLU (see :meth:`finish`)."""
        weights, activation = self._weights(x, target)
        return torch.einsum("bk,bkhw->bhw", weights.to(activation.dtype), activation)

    @classmethod
    def finish(cls, raw: Tensor, size: tuple[int, int], *, protocol: str = "authors", **_: Any) -> Tensor:
        """The map from the raw map, as the ``protocol`` finishes it (:meth:`ScoreProtocol.finish`)."""
        return SCORE_PROTOCOLS[_check_choice("protocol", protocol, PROTOCOLS)].finish(raw, size)

    def _finish_params(self) -> dict[str, Any]:
        return {"protocol": self.protocol}

    # ------------------------------------------------------------------ machinery
    def _perturbed_forward(self, inputs: Tensor) -> Tensor:
        """The model on a chunk of perturbed inputs: eager, or ``torch.compile``d once with ``compile=True``.

        Only these hook-free forwards are compiled; the clean forward that hooks the target layer stays
        eager, so the compiled graph never sees a hook (which would force recompilation).
        """
        if not self.compile:
            return self.model(inputs)
        if self._compiled is None:
            # dynamic: one compilation serves every chunk size (the last chunk of a call is shorter)
            self._compiled = torch.compile(self.model, dynamic=True)
        return self._compiled(inputs)

    def _weights(self, x: Tensor, target: Target) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            logits, activation = self._hooked_forward(x, grad=False)
        labels = self._resolve_target(target, logits)
        dtype = torch.promote_types(x.dtype, torch.float32)
        clean = logits.to(dtype).gather(1, labels[:, None]).squeeze(1)
        batch, channels = activation.shape[:2]
        size = (x.shape[-2], x.shape[-1])
        weights = torch.zeros(batch, channels, dtype=dtype, device=x.device)
        stats = {"channels": batch * channels, "skipped_constant": 0, "deduplicated": 0}
        budget = _MASK_BUDGET.get(x.device.type, _MASK_BUDGET["cpu"])
        group = max(1, budget // (channels * size[0] * size[1]))
        for start in range(0, batch, group):
            images = slice(start, min(start + group, batch))
            weights[images], counts = self._group_weights(
                x[images], activation[images].to(dtype), labels[images], clean[images], size
            )
            for key, value in counts.items():
                stats[key] += value
        self.last_stats = stats
        return weights, activation

    def _group_weights(
        self, x: Tensor, activation: Tensor, labels: Tensor, clean: Tensor, size: tuple[int, int]
    ) -> tuple[Tensor, dict[str, int]]:
        """Weights ``[G, K]`` of a group of images whose masks fit in memory together."""
        n_images, n_channels = activation.shape[:2]
        masks, valid = self._masks(activation, size)
        arange = torch.arange(n_channels, device=x.device)
        if self.dedup or self._needs_canonical:
            canonical = self._canonical(self._dedup_keys(activation), valid)
        else:
            canonical = arange.expand(n_images, n_channels)
        forwarded = valid & (canonical == arange) if self.dedup else valid
        pairs = forwarded.nonzero()  # [T, 2] (image, channel); the one host sync of the group
        pair_channels = canonical[pairs[:, 0], pairs[:, 1]].tolist()
        # masks as rows [G * K, 1, H, W] in the input's dtype, gathered per chunk by their flat index
        mask_rows = masks.to(x.dtype).view(n_images * n_channels, 1, *size)
        pair_masks = pairs[:, 0] * n_channels + pairs[:, 1]
        steps = self._steps
        total = pairs.shape[0] * steps
        scores = torch.empty(total, dtype=activation.dtype, device=x.device)
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        input_buffer = ChunkBuffer((x.shape[1], *size), x.dtype, x.device, layout)
        mask_buffer = ChunkBuffer((1, *size), x.dtype, x.device)

        def run(rows: slice) -> None:
            count = rows.stop - rows.start
            first, last = rows.start // steps, (rows.stop - 1) // steps + 1
            index = torch.arange(rows.start, rows.stop, device=x.device)
            pair_of_row = index // steps
            image_of_row = pairs[pair_of_row, 0]
            inputs = self._perturb(
                torch.index_select(x, 0, image_of_row, out=input_buffer.take(count)),
                torch.index_select(mask_rows, 0, pair_masks[pair_of_row], out=mask_buffer.take(count)),
                pair_of_row - first,
                index % steps,
                pair_channels[first:last],
                rows.start % steps,
            )
            with self._autocast(x.device):
                logits = self._perturbed_forward(self._layout(inputs)).to(activation.dtype)
            scores[rows] = self._protocol.score(logits, labels[image_of_row], clean[image_of_row])
            self.forward_count += count

        with torch.no_grad():
            self._run_chunks(total, x.device, run)
            weights = torch.zeros(n_images, n_channels, dtype=activation.dtype, device=x.device)
            weights[pairs[:, 0], pairs[:, 1]] = scores.view(-1, steps).mean(1)
            # A duplicate takes its representative's weight; a representative (or any channel) keeps its own.
            weights = self._protocol.weights(weights.gather(1, canonical), valid)
        counts = {
            "skipped_constant": int((~valid).sum()),
            "deduplicated": int((valid & (canonical != arange)).sum()) if self.dedup else 0,
        }
        return weights, counts

    def _masks(self, activation: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Normalised masks ``[G, K, H, W]`` and which channels are scored (``[G, K]`` bool)."""
        return self._protocol.masks(activation, size)

    def _dedup_keys(self, activation: Tensor) -> Tensor:
        """Low-resolution keys ``[G, K, h, w]``: two channels with equal keys have equal masks.

        Masks are a deterministic function of the min-max normalised activation map: bit for bit with
        ``protocol="torchcam"`` (it normalises before upsampling), and up to float rounding with the authors'
        order (upsample, then normalise), because bilinear upsampling is linear and min-max normalisation
        scale- and shift-invariant. So channels whose maps differ by a positive scale and shift -- the
        one-hot maps of a sparse ReLU layer, ~5 % of the Coral MobileNetV2's ``features.18`` channels on real
        images -- get one forward. Comparing 7x7 keys instead of 224x224 masks is also cheaper.
        """
        return self._protocol.dedup_keys(activation)

    @staticmethod
    def _canonical(keys: Tensor, valid: Tensor) -> Tensor:
        """For each channel, the first channel of the same image with an identical key (``[G, K]``).

        Rows (image, skipped flag, key) are grouped exactly by ``torch.unique``, which is cheap on the
        low-resolution keys; sum fingerprints would not do, since every one-hot map has the same sums
        wherever its pixel is. Skipped channels are their own representatives.
        """
        n_images, n_channels = valid.shape
        rows = n_images * n_channels
        index = torch.arange(rows, device=keys.device)
        image = index // n_channels
        # A skipped channel gets a value of its own in this column, so it matches no other channel.
        alone = torch.where(valid.reshape(rows), 0, 1 + index)
        table = torch.cat(
            [image[:, None].to(torch.float64), alone[:, None].to(torch.float64),
             keys.reshape(rows, -1).to(torch.float64)],
            dim=1,
        )
        _, inverse = torch.unique(table, dim=0, return_inverse=True)
        first = torch.full((rows,), rows, dtype=torch.long, device=keys.device)
        first = first.scatter_reduce(0, inverse, index, reduce="amin")
        return (first[inverse] - image * n_channels).view(n_images, n_channels)

    def _extra_repr(self) -> str:
        return f"target_layer={self.target_layer!r}, protocol={self.protocol!r}, batch_size={self.batch_size}"


class ScoreCAM(_ScoreFamily):
    r"""Score-CAM (Wang et al., CVPR-W 2020, https://arxiv.org/abs/1910.01279).

    $$ \alpha_k = p_c(X \odot M_k), \qquad
       L = \mathrm{minmax}\big(\mathrm{ReLU}(\textstyle\sum_k \alpha_k U_k)\big) $$

    with ``U_k`` the upsampled activation map of channel ``k``, ``M_k`` its min-max normalisation, ``X`` the
    normalised input (so masking moves pixels towards the mean colour) and ``p_c`` the softmax probability of
    the target class. This is the reference implementation the IS-CAM authors reused; see the module
    docstring for ``protocol="torchcam"``.

    Args:
        model, target_layer, batch_size, amp, channels_last: see :class:`iscam.methods.base.CAM`.
        protocol: ``"authors"`` (default) or ``"torchcam"``.
        dedup: forward once the channels whose min-max normalised activation maps are identical (their
            masks are equal up to float rounding, bit for bit with ``protocol="torchcam"``).
        compile: run the perturbed forwards through ``torch.compile(model)`` (compiled on the first call,
            about a minute for VGG-16; pays off on a GPU for long runs).
    """

    name = "scorecam"
    display_name = "Score-CAM"


class ISCAM(_ScoreFamily):
    r"""IS-CAM: Integrated Score-CAM (Naidu et al., 2020, https://arxiv.org/abs/2010.03023).

    $$ \alpha_k = \frac{1}{N}\sum_{i=1}^{N} p_c(a_i \, X \odot M_k), \qquad
       L = \mathrm{minmax}\big(\mathrm{ReLU}(\textstyle\sum_k \alpha_k U_k)\big) $$

    The scales ``a_i`` depend on ``schedule`` (:func:`iscam_coefficients`): ``"authors"`` (default,
    ``a_i = i(i+1)/(2N)``, the cumulative mask of the authors' code, which produced the paper's numbers),
    ``"paper"`` (``a_i = i(i-1)/(2N)``, eq. 6-7 of the paper, one step behind the code: its first forward sees
    the all-zero input) and ``"linear"`` (``a_i = i/N``, the Integrated-Gradients path). ``N = 10`` as in the
    paper and the authors' code. Cost: ``N`` forwards per scored channel.

    Args:
        model, target_layer, batch_size, amp, channels_last: see :class:`iscam.methods.base.CAM`.
        N: number of integration steps (> 0).
        schedule: ``"authors"``, ``"paper"`` or ``"linear"``.
        protocol: ``"authors"`` (default) or ``"torchcam"`` (TorchCAM's ISCAM: logit differences averaged
            over the steps, softmax across channels).
        dedup: forward once the channels whose min-max normalised activation maps are identical (their
            masks are equal up to float rounding, bit for bit with ``protocol="torchcam"``).
        compile: see :class:`ScoreCAM`.
    """

    name = "iscam"
    display_name = "IS-CAM"

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        N: int = 10,
        schedule: str = "authors",
        protocol: str = "authors",
        dedup: bool = True,
        batch_size: int | None = None,
        amp: str | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        self.N = _check_positive_int("N", N)
        self.schedule = _check_choice("schedule", schedule, SCHEDULES)
        self.coefficients = iscam_coefficients(N, schedule)
        self._scales: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._steps = N
        super().__init__(
            model,
            target_layer,
            protocol=protocol,
            dedup=dedup,
            batch_size=batch_size,
            amp=amp,
            channels_last=channels_last,
            compile=compile,
        )

    def _perturb(
        self, inputs: Tensor, masks: Tensor, rows: Tensor, steps: Tensor, channels: list[int], first_step: int
    ) -> Tensor:
        scales = self._scales.get((inputs.dtype, inputs.device))
        if scales is None:  # one host-to-device copy per dtype and device, not one per chunk
            scales = torch.tensor(self.coefficients, dtype=inputs.dtype, device=inputs.device)
            self._scales[(inputs.dtype, inputs.device)] = scales
        # (X * M)[rows] * a[steps], in place
        return inputs.mul_(masks).mul_(scales[steps].view(-1, 1, 1, 1))

    def trace(self, x: Tensor, target: Target = None, *, channels: int = 4) -> ISCAMTrace:
        """IS-CAM on one image ``[1, 3, H, W]``, with the per-step class scores of the ``channels``
        highest-weighted channels (:class:`ISCAMTrace`). The step scores are forwarded again from the same
        masks and checked against the weights the map uses, so a figure drawn from them shows what the method
        computes. Requires ``protocol="authors"`` (TorchCAM's scores are logit differences)."""
        if self.protocol != "authors":
            raise ValueError("trace() shows the authors' protocol (softmax scores); this IS-CAM uses 'torchcam'")
        x = self._check_input(x)
        if x.shape[0] != 1:
            raise ValueError(f"trace() explains one image, got a batch of {x.shape[0]}")
        _check_positive_int("channels", channels)
        with _eval_mode(self.model), torch.no_grad():
            start = self.forward_count
            weights, activation = self._weights(x, target)
            forwards = self.forward_count - start
            logits = self.model(x)
            label = int(self._resolve_target(target, logits)[0])
            probability = float(torch.softmax(logits.float(), 1)[0, label])
            raw = torch.einsum("bk,bkhw->bhw", weights.to(activation.dtype), activation)[0]
            order = torch.argsort(weights[0], descending=True, stable=True)[:channels]
            shown = activation[0, order].to(weights.dtype)
            masks = minmax_normalize(upsample(shown[None], (x.shape[-2], x.shape[-1])))[0]
            scales = torch.tensor(self.coefficients, dtype=x.dtype, device=x.device)
            inputs = (x * masks[:, None].to(x.dtype))[:, None] * scales.view(1, -1, 1, 1, 1)
            with self._autocast(x.device):
                step_logits = self.model(self._layout(inputs.flatten(0, 1)))
            steps = torch.softmax(step_logits.to(weights.dtype), 1)[:, label].view(len(order), self.N)
        expected = weights[0, order]
        if not torch.allclose(steps.mean(1), expected, rtol=1e-3, atol=1e-5):
            raise AssertionError(f"IS-CAM trace disagrees with its channel weights: {steps.mean(1)} vs {expected}")
        return ISCAMTrace(
            target=label, probability=probability, N=self.N, schedule=self.schedule,
            coefficients=tuple(self.coefficients), weights=weights[0].float().cpu(),
            channels=tuple(int(c) for c in order), activation=shown.float().cpu(),
            step_scores=steps.float().cpu(), raw=raw.float().cpu(), forwards=forwards,
        )

    def _extra_repr(self) -> str:
        return f"{super()._extra_repr()}, N={self.N}, schedule={self.schedule!r}"


@dataclass(frozen=True)
class ISCAMTrace:
    """What IS-CAM computes on one image, step by step (Fig. 1 of the paper, from real tensors).

    ``activation`` holds the shown channels' maps at the layer's resolution (their upsampled, normalised masks
    are ``minmax(up(activation))``), ``step_scores[c, i]`` is ``p_target(a_i X * M_c)`` and its mean over
    ``i`` is ``weights[channels[c]]``; ``raw`` is :meth:`ISCAM.raw_maps` of the image.
    """

    target: int
    probability: float  # softmax probability of target on the clean image
    N: int
    schedule: str
    coefficients: tuple[float, ...]  # a_1..a_N
    weights: Tensor  # [K] alpha_k of every channel
    channels: tuple[int, ...]  # the shown channels (largest weights first)
    activation: Tensor  # [C, h, w]
    step_scores: Tensor  # [C, N]
    raw: Tensor  # [h, w]
    forwards: int  # forward passes of the IS-CAM map (the step scores of the trace are not counted)


class SSCAM(_ScoreFamily):
    r"""SS-CAM: Smoothed Score-CAM (Wang et al., 2020, https://arxiv.org/abs/2006.14255), as the IS-CAM
    authors ran it (their "SSCAM2": noise on the masked input).

    $$ \alpha_k = \frac{1}{N}\sum_{i=1}^{N} p_c\big(X \odot M_k + \varepsilon_{k,i}\big), \quad
       \varepsilon_{k,i} \sim \mathcal{N}(0, s^2), \qquad
       L = \mathrm{minmax}\big(\mathrm{ReLU}(\textstyle\sum_k \alpha_k U_k)\big) $$

    The noise standard deviation ``s`` depends on ``noise``:

    - ``"sigma"`` (default): ``s = sigma``, as the SS-CAM and IS-CAM papers state (``sigma = 2``);
    - ``"authors"``: what the authors' notebook computes, ``s = (sigma / (max x - min x))**2`` with
      ``x = X * M_k`` (they rescale sigma by the masked input's range, then pass that as the *variance* to
      ``normal_``); a masked input of zero range gets no noise.

    ``N = 35`` follows the authors' notebook (the paper's text says N = 15 for its experiments: ``N=15``).
    Noise is drawn in float32 on ``x.device`` by a ``torch.Generator`` seeded with
    :func:`sscam_noise_seed(seed, k) <sscam_noise_seed>` for each channel ``k`` (``N`` tensors of shape
    ``[3, H, W]``; on a CPU the channels' draws are split over torch's intra-op threads), so the result is
    repeatable and does not depend on the input's dtype, the batch size, the thread count, the other images
    in the batch or deduplication (channels with identical normalised activation maps
    share their representative's noise). It does depend on the device type: CPU and CUDA generators draw
    different streams (drawing on the CPU and copying would cost more than the forwards on a GPU). With
    ``protocol="torchcam"`` the noise (std ``sigma``, shape ``[1, H, W]``) is added to the upsampled mask as
    in TorchCAM, scores are logit differences and weights a softmax across channels.

    Args:
        model, target_layer, batch_size, amp, channels_last: see :class:`iscam.methods.base.CAM`.
        N: noisy samples per channel (> 0).
        sigma: noise scale (>= 0; 0 gives Score-CAM's weights).
        noise: ``"sigma"`` or ``"authors"``.
        seed: seed of the noise.
        protocol: ``"authors"`` (default) or ``"torchcam"``.
        dedup: forward once the channels whose min-max normalised activation maps are identical (their
            masks are equal up to float rounding, bit for bit with ``protocol="torchcam"``).
        compile: see :class:`ScoreCAM`.
    """

    name = "sscam"
    display_name = "SS-CAM"
    stochastic = True
    _needs_canonical = True

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        N: int = 35,
        sigma: float = 2.0,
        noise: str = "sigma",
        seed: int = 0,
        protocol: str = "authors",
        dedup: bool = True,
        batch_size: int | None = None,
        amp: str | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        self.N = _check_positive_int("N", N)
        self.sigma = _check_non_negative("sigma", sigma)
        self.noise = _check_choice("noise", noise, NOISE_MODES)
        self.seed = _check_seed(seed)
        self._steps = N
        self._cut_draw: tuple[tuple[Any, ...], Tensor] | None = None
        super().__init__(
            model,
            target_layer,
            protocol=protocol,
            dedup=dedup,
            batch_size=batch_size,
            amp=amp,
            channels_last=channels_last,
            compile=compile,
        )

    def _noise(self, count: int, first_step: int, channels: list[int], shape: tuple[int, ...],
               like: Tensor) -> Tensor:
        """``[count, *shape]``: the noise of a chunk's rows, in ``like``'s dtype. The rows run through the pairs
        of ``channels`` in order, steps ``0..N-1`` each, from step ``first_step`` of the first; a row gets draw
        ``step`` of its channel.

        Channel ``k``'s ``N`` draws are one ``randn((N, *shape))`` of a generator seeded with
        ``sscam_noise_seed(seed, k)``: drawn straight into the rows when the chunk holds all of them (no
        stacked copy, no gather); a pair cut by the chunk's edge is drawn once into a scratch tensor that the
        next chunk, which starts with the rest of that pair, takes its remaining rows from.
        """
        out = torch.empty((count, *shape), dtype=torch.float32, device=like.device)
        generator = torch.Generator(device=like.device)
        whole: list[tuple[int, int]] = []  # (first row, channel) of the pairs the chunk holds all of
        row = 0
        for pair, channel in enumerate(channels):
            start = first_step if pair == 0 else 0
            take = min(self.N - start, count - row)
            if take == self.N:
                whole.append((row, channel))
            else:
                out[row:row + take] = self._cut_pair_noise(channel, shape, generator)[start:start + take]
            row += take
        if row != count:
            raise AssertionError(f"{count} rows, {row} from the {len(channels)} pairs of the chunk")
        _draw_in_parallel(self._draw_into, [(out[first:first + self.N], channel) for first, channel in whole],
                          like.device)
        # float32 draws whatever the input's dtype, so a float64 reference sees the same noise
        return out if like.dtype == torch.float32 else out.to(like.dtype)

    def _draw_into(self, jobs: list[tuple[Tensor, int]]) -> None:
        """Each job's ``N`` draws into its rows, from one generator reseeded per channel."""
        if not jobs:
            return
        generator = torch.Generator(device=jobs[0][0].device)
        for rows, channel in jobs:
            generator.manual_seed(sscam_noise_seed(self.seed, channel))
            torch.randn(rows.shape, generator=generator, out=rows)

    def _cut_pair_noise(self, channel: int, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        """The ``N`` draws of a channel whose rows two chunks share, drawn for the first and kept for the next."""
        key = (self.seed, channel, shape, generator.device)
        if self._cut_draw is None or self._cut_draw[0] != key:
            generator.manual_seed(sscam_noise_seed(self.seed, channel))
            self._cut_draw = (key, torch.randn((self.N, *shape), generator=generator, device=generator.device))
        return self._cut_draw[1]

    def _perturb(
        self, inputs: Tensor, masks: Tensor, rows: Tensor, steps: Tensor, channels: list[int], first_step: int
    ) -> Tensor:
        height, width = inputs.shape[-2:]
        count = inputs.shape[0]
        if self._protocol.noise_on_mask:
            # (M[rows] + sigma * noise) * X[rows], in place (the noise is fresh, free to scale)
            noise = self._noise(count, first_step, channels, (1, height, width), inputs)
            return inputs.mul_(masks.add_(noise.mul_(self.sigma)))
        masked = inputs.mul_(masks)
        noise = self._noise(count, first_step, channels, (3, height, width), inputs)
        if self.noise == "sigma":
            return masked.add_(noise.mul_(self.sigma))
        span = masked.amax(dim=(1, 2, 3)) - masked.amin(dim=(1, 2, 3))
        std = torch.where(span > 0, (self.sigma / torch.where(span > 0, span, 1.0)) ** 2, 0.0)
        return masked.add_(noise.mul_(std.view(-1, 1, 1, 1)))

    def _extra_repr(self) -> str:
        return (
            f"{super()._extra_repr()}, N={self.N}, sigma={self.sigma}, noise={self.noise!r}, seed={self.seed}"
        )
