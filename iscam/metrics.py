"""The paper's five metrics as pure, batched functions returning one value per image.

- Insertion / Deletion AUC (Table III): :func:`insertion_curve`, :func:`deletion_curve`, :func:`auc`.
- Average Drop and Increase in Confidence (Table I): :func:`confidence`, :func:`average_drop`,
  :func:`increase_in_confidence`.
- Win % (Table I): :func:`win_rate`, :func:`win_rate_ci`.
- Energy-based pointing game (Table II): :func:`energy_pointing_game`.
- ROAD (Rong et al. 2022, new; implemented in :mod:`iscam.road`): :func:`road_curve`, :func:`road_scores`; the
  runner stores it from the base rows' maps in the store's ``road`` table (config ``road:``).
- Confidence intervals (new): :func:`bootstrap_ci`, :func:`paired_bootstrap_diff` (from :mod:`iscam.stats`).

Conventions shared by every function:

- ``x`` is a batch ``[B, C, H, W]`` of *normalised* images (ImageNet mean/std), so 0 is the mean colour;
  ``saliency`` is ``[B, H, W]``, finite and non-negative (the CAM methods emit maps in [0, 1]).
- ``target`` is explicit: an ``int`` for every image or a ``LongTensor[B]``. In the paper's protocol it is
  the argmax of the model's logits on the clean image (the class the map explains); the caller passes it.
- Scores are softmax probabilities of the target class. The model runs under :func:`torch.no_grad` in
  eval mode; the train/eval state of every submodule is restored afterwards.
- Everything runs on ``x.device``; nothing is moved to a hard-coded device and no global state is kept.
- Frames and images go through the model ``batch_size`` at a time by the methods' chunk loop
  (:func:`iscam.batching.run_chunks`: halved and retried on CUDA out-of-memory), each chunk filling the
  same buffers in place (:class:`iscam.batching.ChunkBuffer`); neither changes a value.
- Bad input raises :class:`ValueError` naming the problem (and the image index where there is one):
  these functions never return a silent NaN.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iscam.batching import ChunkBuffer, run_chunks
from iscam.road import road_curve, road_scores  # ROAD (Rong et al. 2022), implemented in iscam.road
from iscam.stats import CI, bootstrap_ci, paired_bootstrap_diff

__all__ = [
    "METRICS_VERSION",
    "CI",
    "Confidence",
    "SUBSTRATES",
    "WinRate",
    "auc",
    "average_drop",
    "blur_substrate",
    "bootstrap_ci",
    "confidence",
    "deletion_curve",
    "energy_pointing_game",
    "gaussian_kernel",
    "increase_in_confidence",
    "insertion_curve",
    "paired_bootstrap_diff",
    "pixel_ranks",
    "road_curve", "road_scores",
    "win_rate",
    "win_rate_ci",
    "zeros_substrate",
]

Target = Union[int, Tensor]
Substrate = Union[str, Callable[[Tensor], Tensor]]

#: Frames (insertion/deletion) or images (confidence) sent through the model per forward pass.
DEFAULT_BATCH_SIZE = 128
#: Bumped whenever a change to this module changes a metric's values; stored with every row (see
#: :data:`iscam.store.STAMP_COLUMNS`), so rows of older metric code are recomputed, never mixed in a table.
METRICS_VERSION = 1

#: RISE's blur: an 11x11 Gaussian with sigma 5 (``gkern(klen=11, nsig=5)`` in RISE's evaluation.py).
BLUR_KERNEL_SIZE = 11
BLUR_SIGMA = 5.0


# --------------------------------------------------------------------------------------------------
# Input checks and model evaluation shared by the metrics
# --------------------------------------------------------------------------------------------------

def _check_images(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor [B, C, H, W], got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"x must be a 4-D batch [B, C, H, W] of normalised images, "
                         f"got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor (normalised images), got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch (B = 0)")
    bad = _non_finite_images(x)
    if bad:
        raise ValueError(f"x has NaN or inf values in image(s) {bad}")


def _non_finite_images(tensor: Tensor) -> list[int]:
    finite = torch.isfinite(tensor).flatten(1).all(dim=1)
    return torch.nonzero(~finite).flatten().tolist()[:10]


def _check_saliency(saliency: Tensor, shape: tuple[int, int, int] | None = None) -> None:
    """Saliency must be ``[B, H, W]`` (equal to ``shape`` when given), finite and non-negative."""
    if not isinstance(saliency, Tensor):
        raise TypeError(f"saliency must be a torch.Tensor [B, H, W], got {type(saliency).__name__}")
    if shape is not None and tuple(saliency.shape) != shape:
        raise ValueError(f"saliency must have shape [B, H, W] = {list(shape)} to match x, "
                         f"got {list(saliency.shape)}")
    if saliency.ndim != 3:
        raise ValueError(f"saliency must be a 3-D batch of maps [B, H, W], got shape {tuple(saliency.shape)}")
    if saliency.is_complex() or saliency.dtype == torch.bool:
        raise ValueError(f"saliency must be a real-valued tensor, got dtype {saliency.dtype}")
    bad = _non_finite_images(saliency)
    if bad:
        raise ValueError(f"saliency has NaN or inf values in image(s) {bad}")
    negative = torch.nonzero((saliency < 0).flatten(1).any(dim=1)).flatten().tolist()[:10]
    if negative:
        raise ValueError(f"saliency must be non-negative; image(s) {negative} have negative values "
                         f"(apply ReLU / min-max normalisation as the CAM methods do)")


def _as_target(target: Target, batch: int, device: torch.device) -> Tensor:
    """``target`` as a ``LongTensor[batch]`` on ``device``; the upper bound is checked against the logits."""
    if isinstance(target, bool):
        raise TypeError("target must be an int class index or a LongTensor[B], got a bool")
    if isinstance(target, numbers.Integral):
        indices = torch.full((batch,), int(target), dtype=torch.long, device=device)
    elif isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
        indices = target.to(device=device, dtype=torch.long)
        if indices.ndim == 0:
            indices = indices.expand(batch)
        if tuple(indices.shape) != (batch,):
            raise ValueError(f"target must be an int or a LongTensor of shape [{batch}] (one class per "
                             f"image), got shape {tuple(target.shape)}")
    else:
        raise TypeError(f"target must be an int or a LongTensor[B], got {type(target).__name__}")
    if (indices < 0).any():
        raise ValueError(f"target class indices must be >= 0, got {indices.min().item()}")
    return indices


@contextmanager
def _evaluating(model: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Run ``model`` in eval mode without gradients, restoring every submodule's train/eval flag."""
    modes = [(module, module.training) for module in model.modules()] if isinstance(model, nn.Module) else []
    if isinstance(model, nn.Module):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _target_probability(model: Callable[[Tensor], Tensor], images: Tensor, target: Tensor) -> Tensor:
    """Softmax probability of ``target[i]`` for each image (float32 at least, float64 kept)."""
    return _probability_of(model(images), images.shape[0], target)


def _probability_of(logits: Tensor, count: int, target: Tensor) -> Tensor:
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != count:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"the model must return logits of shape [N, classes] for N images, got {shape}")
    classes = logits.shape[1]
    if (target >= classes).any():
        raise ValueError(f"target class index {target.max().item()} is out of range for a model with "
                         f"{classes} classes")
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # softmax of bf16/fp16 logits loses the small probabilities
    return torch.softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


# --------------------------------------------------------------------------------------------------
# Insertion and deletion (RISE)
# --------------------------------------------------------------------------------------------------

def gaussian_kernel(kernel_size: int = BLUR_KERNEL_SIZE, sigma: float = BLUR_SIGMA, *,
                    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """RISE's ``gkern``: ``scipy.ndimage.gaussian_filter`` applied to a centred delta, ``[k, k]``.

    SciPy's filter (truncate 4, ``mode="reflect"``) folds the Gaussian's tails back into the window, so
    this is *not* a sampled Gaussian renormalised to the window; it is reproduced here exactly (in float64,
    then cast) without importing SciPy. The kernel sums to 1.
    """
    odd = isinstance(kernel_size, int) and not isinstance(kernel_size, bool) and kernel_size % 2 == 1
    if not odd or kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * offsets**2 / sigma**2)
    weights /= weights.sum()
    # Output sample i collects the weight of every offset j whose reflected source index i + j is the
    # centre (scipy's "reflect" = half-sample symmetric: d c b a | a b c d | d c b a, period 2k).
    positions = torch.arange(kernel_size)[:, None] + torch.arange(-radius, radius + 1)[None, :]
    folded = positions % (2 * kernel_size)
    folded = torch.where(folded >= kernel_size, 2 * kernel_size - 1 - folded, folded)
    profile = (weights[None, :] * (folded == kernel_size // 2)).sum(dim=1)
    return torch.outer(profile, profile).to(dtype=dtype, device=device)


def zeros_substrate(x: Tensor) -> Tensor:
    """Zero in normalised space, i.e. the dataset's mean colour (the IS-CAM authors' substrate)."""
    return torch.zeros_like(x)


def blur_substrate(x: Tensor, kernel_size: int = BLUR_KERNEL_SIZE, sigma: float = BLUR_SIGMA) -> Tensor:
    """RISE's blurred image: each channel of the normalised ``x`` convolved with :func:`gaussian_kernel`.

    As in RISE's ``evaluation.py`` (``conv2d(x, kern, padding=klen // 2)`` with a channel-diagonal kernel),
    borders are zero-padded, i.e. padded with the mean colour, so the blur darkens towards it near edges.
    """
    channels = x.shape[1]
    kernel = gaussian_kernel(kernel_size, sigma, dtype=x.dtype, device=x.device)
    weight = kernel.expand(channels, 1, kernel_size, kernel_size)
    return F.conv2d(x, weight, padding=kernel_size // 2, groups=channels)


#: Named substrates accepted by :func:`deletion_curve` and :func:`insertion_curve`.
SUBSTRATES: dict[str, Callable[[Tensor], Tensor]] = {"zeros": zeros_substrate, "blur": blur_substrate}


def _substrate_images(substrate: Substrate, x: Tensor) -> Tensor:
    if isinstance(substrate, str):
        if substrate not in SUBSTRATES:
            raise ValueError(f"unknown substrate {substrate!r}; choose one of {sorted(SUBSTRATES)} or pass a "
                             f"callable substrate(x) -> tensor shaped like x")
        return SUBSTRATES[substrate](x)
    if not callable(substrate):
        raise TypeError(f"substrate must be a name in {sorted(SUBSTRATES)} or a callable, got {substrate!r}")
    with torch.no_grad():
        result = substrate(x)
    if not isinstance(result, Tensor) or result.shape != x.shape:
        shape = tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
        raise ValueError(f"the substrate callable must return a tensor shaped like x {tuple(x.shape)}, "
                         f"got {shape}")
    bad = _non_finite_images(result)
    if bad:
        raise ValueError(f"the substrate has NaN or inf values in image(s) {bad}")
    return result.to(device=x.device, dtype=x.dtype)


def pixel_ranks(saliency: Tensor) -> Tensor:
    """Rank of every pixel in descending saliency order, ``[B, H*W]`` (0 = most salient).

    Ties keep raster order (row-major: the earlier pixel ranks first), so the order is deterministic and
    identical on every device.
    """
    flat = saliency.flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def _causal_curve(model: Callable[[Tensor], Tensor], x: Tensor, saliency: Tensor, target: Target, step: int,
                  substrate: Substrate, batch_size: int, insertion: bool) -> Tensor:
    _check_images(x)
    batch, _, height, width = x.shape
    saliency = saliency.to(x.device) if isinstance(saliency, Tensor) else saliency
    _check_saliency(saliency, (batch, height, width))
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step <= 0:
        raise ValueError(f"step must be a positive integer number of pixels, got {step!r}")
    step = int(step)
    _check_batch_size(batch_size)
    classes = _as_target(target, batch, x.device)

    steps = math.ceil(height * width / step)
    frames_per_image = steps + 1
    # in x's dtype: under autocast a blurred substrate comes out in bf16/fp16 (torch.where promoted it before)
    background = _substrate_images(substrate, x).to(x.dtype)
    ranks = pixel_ranks(saliency)
    # Frame t shows ``shown`` at the pixels ranked < t * step and ``hidden`` elsewhere.
    shown, hidden = (x, background) if insertion else (background, x)

    total = batch * frames_per_image
    scores: list[Tensor] = []
    # every chunk fills the same scratch rows (see iscam.batching.ChunkBuffer): frames, the frames' pixels
    # of the image shown, their pixel ranks and the reveal mask
    frame_buffer = ChunkBuffer(tuple(x.shape[1:]), x.dtype, x.device)
    shown_buffer = ChunkBuffer(tuple(x.shape[1:]), x.dtype, x.device)
    rank_buffer = ChunkBuffer((height * width,), ranks.dtype, x.device)
    mask_buffer = ChunkBuffer((height * width,), torch.bool, x.device)

    def step_frames(rows: slice) -> None:
        count = rows.stop - rows.start
        flat_index = torch.arange(rows.start, rows.stop, device=x.device)
        image = flat_index // frames_per_image
        revealed = (flat_index % frames_per_image) * step
        # torch.where(ranks[image] < revealed, shown[image], hidden[image]), without a fresh tensor
        ranks_of_frame = torch.index_select(ranks, 0, image, out=rank_buffer.take(count))
        mask = torch.lt(ranks_of_frame, revealed[:, None], out=mask_buffer.take(count))
        frames = torch.index_select(hidden, 0, image, out=frame_buffer.take(count))
        shown_pixels = torch.index_select(shown, 0, image, out=shown_buffer.take(count))
        torch.where(mask.view(-1, 1, height, width), shown_pixels, frames, out=frames)
        scores.append(_target_probability(model, frames, classes[image]))

    with _evaluating(model):
        run_chunks(total, batch_size, step_frames)
    return torch.cat(scores).view(batch, frames_per_image)


def deletion_curve(model: Callable[[Tensor], Tensor], x: Tensor, saliency: Tensor, target: Target,
                   step: int = 224, substrate: Substrate = "zeros",
                   batch_size: int = DEFAULT_BATCH_SIZE) -> Tensor:
    """RISE deletion curve: probability of ``target`` as the most salient pixels are removed, ``[B, n+1]``.

    Petsiuk, Das & Saenko, *RISE*, BMVC 2018, https://arxiv.org/abs/1806.07421. With
    :math:`n = \\lceil HW / \\text{step} \\rceil`, frame :math:`t = 0..n` replaces the :math:`t \\cdot
    \\text{step}` most salient pixels (all channels; descending saliency, ties in raster order, see
    :func:`pixel_ranks`) by the substrate: frame 0 is ``x``, frame n is the substrate. A good map makes
    the curve fall fast, i.e. a *low* :func:`auc`.

    ``substrate``: ``"zeros"`` (default; zero in normalised space, the mean colour, as in the IS-CAM
    authors' code and RISE's deletion), ``"blur"`` (:func:`blur_substrate`) or a callable
    ``substrate(x) -> tensor shaped like x``. The ``B * (n+1)`` frames are built on the fly and sent
    through the model ``batch_size`` at a time (fewer after a CUDA out-of-memory error); the result equals a one-frame-at-a-time loop up to the
    rounding of batch-size-dependent kernels (about 1e-7 in float32 on CPU, 1e-5 with cuDNN's default TF32
    convolutions on a GPU; set ``torch.backends.cudnn.allow_tf32 = False`` for float32-exact scores).
    """
    return _causal_curve(model, x, saliency, target, step, substrate, batch_size, insertion=False)


def insertion_curve(model: Callable[[Tensor], Tensor], x: Tensor, saliency: Tensor, target: Target,
                    step: int = 224, substrate: Substrate = "blur",
                    batch_size: int = DEFAULT_BATCH_SIZE) -> Tensor:
    """RISE insertion curve: probability of ``target`` as the most salient pixels are restored, ``[B, n+1]``.

    Petsiuk, Das & Saenko, *RISE*, BMVC 2018, https://arxiv.org/abs/1806.07421. Frame :math:`t = 0..n`
    starts from the substrate and copies the :math:`t \\cdot \\text{step}` most salient pixels of ``x``
    onto it: frame 0 is the substrate, frame n is ``x``. A good map makes the curve rise fast, i.e. a
    *high* :func:`auc`.

    ``substrate`` defaults to ``"blur"`` (RISE's 11x11, sigma-5 blur of the normalised image); the IS-CAM
    authors' code inserted onto ``"zeros"`` instead -- pass ``substrate="zeros"`` to reproduce it.
    Batching as in :func:`deletion_curve`.
    """
    return _causal_curve(model, x, saliency, target, step, substrate, batch_size, insertion=True)


def auc(curve: Tensor) -> Tensor:
    """Area under insertion/deletion curves ``[B, n+1]`` (or one curve ``[n+1]``), trapezoid on [0, 1].

    :math:`\\text{AUC} = (\\sum_t s_t - s_0/2 - s_n/2) / n`, as RISE's ``auc``: the n+1 frames are
    equally spaced on [0, 1]. Returns ``[B]`` (a 0-d tensor for a single curve).
    """
    if not isinstance(curve, Tensor) or curve.ndim not in (1, 2):
        raise ValueError(f"curve must be a tensor [B, n+1] or [n+1], got "
                         f"{tuple(curve.shape) if isinstance(curve, Tensor) else type(curve).__name__}")
    if curve.shape[-1] < 2:
        raise ValueError(f"a curve needs at least 2 points (n >= 1 steps), got {curve.shape[-1]}")
    if not torch.isfinite(curve).all():
        raise ValueError("curve has NaN or inf values")
    intervals = curve.shape[-1] - 1
    return (curve.sum(dim=-1) - curve[..., 0] / 2 - curve[..., -1] / 2) / intervals


# --------------------------------------------------------------------------------------------------
# Average Drop, Increase in Confidence, Win % (Grad-CAM++)
# --------------------------------------------------------------------------------------------------

class Confidence(NamedTuple):
    """Softmax probability of the target on the clean image (``Y``) and on the explanation map (``O``)."""

    clean: Tensor
    masked: Tensor


def confidence(model: Callable[[Tensor], Tensor], x: Tensor, saliency: Tensor, target: Target, *,
               target_from: Literal["clean", "masked"] = "clean",
               batch_size: int = DEFAULT_BATCH_SIZE) -> Confidence:
    """``(Y, O)``: probability of class c on ``x`` and on the explanation map ``E = L * x``, each ``[B]``.

    Chattopadhyay et al., *Grad-CAM++*, WACV 2018, https://arxiv.org/abs/1710.11063, section 5.1:
    :math:`Y_c = p_c(X)`, :math:`O_c = p_c(L \\circ X)`, with L the saliency ``[B, H, W]`` broadcast over
    channels and X the *normalised* image (so masked-out pixels become the mean colour), and the same class
    c = ``target`` for both. Feed the pair to :func:`average_drop`, :func:`increase_in_confidence` and, as
    ``Y - O``, to :func:`win_rate`.

    ``target_from="masked"`` reproduces the IS-CAM authors' notebook instead: O is the probability of the
    argmax class *of the masked image* (Y still uses ``target``). That is a departure from Grad-CAM++
    which lowers Average Drop whenever masking changes the prediction; it is off by default.
    """
    if target_from not in ("clean", "masked"):
        raise ValueError(f"target_from must be 'clean' or 'masked', got {target_from!r}")
    _check_images(x)
    batch, _, height, width = x.shape
    saliency = saliency.to(x.device) if isinstance(saliency, Tensor) else saliency
    _check_saliency(saliency, (batch, height, width))
    _check_batch_size(batch_size)
    classes = _as_target(target, batch, x.device)

    # Clean and masked images of a chunk share one forward pass of up to ``batch_size`` images, stacked in
    # scratch rows that every chunk refills (see iscam.batching.ChunkBuffer).
    clean: list[Tensor] = []
    masked: list[Tensor] = []
    stack_buffer = ChunkBuffer(tuple(x.shape[1:]), x.dtype, x.device)

    def step_images(chunk: slice) -> None:
        size = chunk.stop - chunk.start
        images = x[chunk]
        # torch.cat([images, saliency * images])
        stacked = stack_buffer.take(2 * size)
        stacked[:size].copy_(images)
        torch.mul(saliency[chunk, None].to(x.dtype), images, out=stacked[size:])
        if target_from == "clean":
            probabilities = _target_probability(model, stacked, classes[chunk].repeat(2))
        else:
            logits = model(stacked)
            masked_class = logits[size:].argmax(dim=1)
            probabilities = _probability_of(logits, 2 * size, torch.cat([classes[chunk], masked_class]))
        clean.append(probabilities[:size])
        masked.append(probabilities[size:])

    with _evaluating(model):
        run_chunks(batch, max(1, batch_size // 2), step_images)
    return Confidence(torch.cat(clean), torch.cat(masked))


def _check_pair(first: Tensor, second: Tensor, names: tuple[str, str]) -> None:
    for value, name in zip((first, second), names):
        if not isinstance(value, Tensor) or value.ndim != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a 1-D tensor (one value per image), got {shape}")
        bad = torch.nonzero(~torch.isfinite(value)).flatten().tolist()[:10]
        if bad:
            raise ValueError(f"{name} has NaN or inf values at image(s) {bad}")
    if first.shape != second.shape:
        raise ValueError(f"{names[0]} and {names[1]} must cover the same images, got {first.numel()} "
                         f"and {second.numel()} values")
    if first.numel() == 0:
        raise ValueError(f"{names[0]} and {names[1]} are empty")


def average_drop(clean: Tensor, masked: Tensor) -> Tensor:
    """Per-image Average Drop :math:`\\max(0, Y - O) / Y` (Grad-CAM++), ``[B]``; lower is better.

    The paper's tables report ``100 * mean`` (the authors' notebook forgot to divide by N); use
    ``bootstrap_ci(100 * average_drop(Y, O))`` for the table value with its 95% interval. ``Y`` must be
    positive: a zero clean probability (underflow) raises instead of producing NaN.
    """
    _check_pair(clean, masked, ("Y (clean)", "O (masked)"))
    zero = torch.nonzero(clean <= 0).flatten().tolist()[:10]
    if zero:
        raise ValueError(f"clean probability Y must be > 0 for Average Drop; image(s) {zero} have Y <= 0")
    return torch.clamp(clean - masked, min=0) / clean


def increase_in_confidence(clean: Tensor, masked: Tensor) -> Tensor:
    """Per-image Increase in Confidence :math:`[Y < O]` as float 0/1 (Grad-CAM++), ``[B]``; higher is better.

    Strict inequality: an unchanged probability is no increase. Tables report ``100 * mean``.
    """
    _check_pair(clean, masked, ("Y (clean)", "O (masked)"))
    return (clean < masked).to(clean.dtype)


class WinRate(NamedTuple):
    """Percent of images where method A's confidence change is smaller than B's (win), equal, or larger."""

    win: float
    tie: float
    loss: float
    n: int


def win_rate(change_a: Tensor, change_b: Tensor) -> WinRate:
    """Win % of method A over B on the same images (IS-CAM paper, Table I), in percent.

    ``change = Y - O`` per image (*unclipped*, as in the authors' code, so images where both maps raise the
    confidence still count). A wins image i if ``change_a[i] < change_b[i]`` strictly, ties are exact
    floating-point equality (e.g. both maps identical), and ``win + tie + loss = 100``.
    """
    _check_pair(change_a, change_b, ("change_a", "change_b"))
    n = change_a.numel()
    wins = int((change_a < change_b).sum())
    ties = int((change_a == change_b).sum())
    losses = n - wins - ties
    return WinRate(100.0 * wins / n, 100.0 * ties / n, 100.0 * losses / n, n)


def win_rate_ci(change_a: Tensor, change_b: Tensor, *, n_boot: int = 10000, seed: int = 0,
                level: float = 0.95) -> CI:
    """Win % of A over B (as :func:`win_rate`) with its percentile-bootstrap interval over images."""
    _check_pair(change_a, change_b, ("change_a", "change_b"))
    return bootstrap_ci(100.0 * (change_a < change_b).double(), n_boot=n_boot, seed=seed, level=level)


# --------------------------------------------------------------------------------------------------
# Energy-based pointing game (Score-CAM)
# --------------------------------------------------------------------------------------------------

def _box_union_mask(boxes: Tensor, height: int, width: int, image: int) -> Tensor:
    """Pixels whose centre lies in at least one box ``[x0, x1) x [y0, y1)``, ``[H, W]`` bool."""
    if not isinstance(boxes, Tensor):
        boxes = torch.as_tensor(boxes, dtype=torch.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes of image {image} must be a tensor [m, 4] of (x0, y0, x1, y1), "
                         f"got shape {tuple(boxes.shape)}")
    if boxes.shape[0] == 0:
        raise ValueError(f"image {image} has no bounding box: the energy pointing game needs at least one")
    boxes = boxes.to(torch.float64)
    if not torch.isfinite(boxes).all():
        raise ValueError(f"boxes of image {image} have NaN or inf coordinates")
    x0, y0, x1, y1 = boxes.unbind(dim=1)
    degenerate = torch.nonzero((x1 <= x0) | (y1 <= y0)).flatten().tolist()
    if degenerate:
        raise ValueError(f"box(es) {degenerate} of image {image} are empty or inverted (need x0 < x1 and "
                         f"y0 < y1): {boxes[degenerate].tolist()}")
    outside = torch.nonzero((x1 <= 0) | (y1 <= 0) | (x0 >= width) | (y0 >= height)).flatten().tolist()
    if outside:
        raise ValueError(f"box(es) {outside} of image {image} lie entirely outside the {width}x{height} "
                         f"frame (x = column): {boxes[outside].tolist()}")
    # Boxes partly outside the frame are clipped implicitly: only pixels of the frame are tested.
    columns = torch.arange(width, dtype=torch.float64, device=boxes.device) + 0.5
    rows = torch.arange(height, dtype=torch.float64, device=boxes.device) + 0.5
    in_columns = (columns >= x0[:, None]) & (columns < x1[:, None])
    in_rows = (rows >= y0[:, None]) & (rows < y1[:, None])
    return (in_rows[:, :, None] & in_columns[:, None, :]).any(dim=0)


def energy_pointing_game(saliency: Tensor, boxes: Sequence[Tensor]) -> Tensor:
    """Energy-based pointing game (Score-CAM): share of the saliency inside the union of the boxes, ``[B]``.

    Wang et al., *Score-CAM*, CVPR-W 2020, https://arxiv.org/abs/1910.01279, section 4.2:
    :math:`\\text{proportion} = \\sum_{(i,j) \\in \\text{bbox}} L_{ij} / \\sum_{(i,j)} L_{ij}`.

    ``boxes[b]`` is a float tensor ``[m, 4]`` of ``(x0, y0, x1, y1)`` in the pixel frame of the saliency map
    (x = column, y = row; continuous coordinates, the pixel (row r, col c) covering
    ``[c, c+1) x [r, r+1)``). A pixel belongs to a box when its centre ``(c + 0.5, r + 0.5)`` lies in
    ``[x0, x1) x [y0, y1)``; an image with several boxes uses their union (Score-CAM issue #23), not only
    the first box, and the box is *not* transposed (the reference code indexed ``mask[x0:x1, y0:y1]``).
    The map is used as is, not binarised. Values: a zero map gives 0; a map entirely inside the boxes
    gives 1.

    Errors (:class:`ValueError`, naming the image): an empty box list, a box with ``x1 <= x0`` or
    ``y1 <= y0``, a box lying entirely outside the frame; boxes partly outside are clipped to it.
    """
    if not isinstance(saliency, Tensor):
        raise TypeError(f"saliency must be a torch.Tensor [B, H, W], got {type(saliency).__name__}")
    _check_saliency(saliency)
    batch, height, width = saliency.shape
    if len(boxes) != batch:
        raise ValueError(f"boxes must hold one [m, 4] tensor per image: got {len(boxes)} for {batch} maps")
    inside = torch.stack([_box_union_mask(image_boxes, height, width, index).to(saliency.device)
                          for index, image_boxes in enumerate(boxes)])
    values = saliency if saliency.is_floating_point() else saliency.double()
    total = values.flatten(1).sum(dim=1)
    in_boxes = (values * inside).flatten(1).sum(dim=1)
    # A zero map puts no energy anywhere: 0, not 0/0.
    return torch.where(total > 0, in_boxes / torch.where(total > 0, total, torch.ones_like(total)),
                       torch.zeros_like(total))
