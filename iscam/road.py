"""ROAD (Rong et al., ICML 2022): remove-and-debias curves with noisy linear imputation, one row per image.

Rong, Leemann, Borisov, Kasneci & Kasneci, *A Consistent and Efficient Evaluation Strategy for Attribution
Methods*, ICML 2022, https://arxiv.org/abs/2202.00449 (code: github.com/tleemann/road_evaluation). A
fraction of the pixels is removed in most-relevant-first (MoRF) or least-relevant-first (LeRF) order and
replaced by a *noisy linear imputation*, so that the shape of the removed region leaks as little
information as possible; the curve is the model's probability of the class at each fraction.

:func:`road_curve` is the metric (re-exported by :mod:`iscam.metrics`), :func:`road_scores` summarises a
MoRF and a LeRF curve, :func:`removal_masks` and :func:`linear_imputation` expose the two steps, and
:func:`road_noise` converts ROAD's pixel-space noise to the units of a normalised input.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
from torch import Tensor

from iscam.data import IMAGENET_STD

# The input checks, pixel_ranks and the model-evaluation helpers are iscam.metrics' (each rule lives
# there once). iscam.metrics re-exports road_curve and road_scores from this module, so the functions
# below import them when called: module-level imports in both directions would fail for whichever of the
# two modules is imported first.

__all__ = [
    "ROAD_FRACTIONS",
    "ROAD_NEIGHBOUR_WEIGHTS",
    "ROAD_PIXEL_NOISE",
    "ROAD_VERSION",
    "RoadScores",
    "linear_imputation",
    "removal_masks",
    "road_curve",
    "road_noise",
    "road_scores",
]

Order = Literal["morf", "lerf"]
Seed = int | Sequence[int] | Tensor

#: Bumped whenever a change to this module changes a ROAD value; the runner stores it with every row of the
#: store's ``road`` table, so rows of older code are recomputed, never mixed.
ROAD_VERSION = 1

#: The removal fractions of ROAD's benchmark (and pytorch-grad-cam's ``ROAD*Average``): 10 %, ..., 90 %.
ROAD_FRACTIONS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

#: ``((row offset, column offset), weight)`` of the 8 neighbours in ROAD's imputation: 1/6 for the four
#: direct neighbours, 1/12 for the four diagonal ones (they sum to 1), as ROAD's ``neighbors_weights``.
ROAD_NEIGHBOUR_WEIGHTS: tuple[tuple[tuple[int, int], float], ...] = (
    ((-1, -1), 1 / 12), ((-1, 0), 1 / 6), ((-1, 1), 1 / 12),
    ((0, -1), 1 / 6), ((0, 1), 1 / 6),
    ((1, -1), 1 / 12), ((1, 0), 1 / 6), ((1, 1), 1 / 12),
)

#: Standard deviation of ROAD's imputation noise, in pixel units of a [0, 1] image (``noise=0.01``).
ROAD_PIXEL_NOISE = 0.01

# floor(fraction * pixels) must not lose a pixel to binary rounding (0.57 * 100 = 56.99999999999999).
_COUNT_SLACK = 1e-9
_MAX_SEED = 2**64


def road_noise(std: Sequence[float], pixel_noise: float = ROAD_PIXEL_NOISE) -> tuple[float, ...]:
    """ROAD's noise in the units of an input normalised as ``(pixel - mean) / std``: ``pixel_noise / std_c``.

    ROAD imputes the [0, 1] image *before* normalising it (``transform_test`` runs after the imputation in
    ``road.run_road``), so its ``noise=0.01`` is 0.01 of the pixel range. The imputation itself commutes
    with a per-channel affine normalisation (its weights sum to 1), only the noise must be rescaled:
    pass ``road_noise(preprocess.std)`` as ``road_curve(..., noise=...)``.
    """
    values = tuple(float(s) for s in std)
    if not values or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"std must hold one positive, finite value per channel, got {std!r}")
    if not (math.isfinite(pixel_noise) and pixel_noise >= 0):
        raise ValueError(f"pixel_noise must be a finite number >= 0, got {pixel_noise!r}")
    return tuple(pixel_noise / s for s in values)


#: :data:`ROAD_PIXEL_NOISE` for inputs normalised with the ImageNet mean/std (the metrics' convention).
_IMAGENET_NOISE = road_noise(IMAGENET_STD)


# --------------------------------------------------------------------------------------------------
# Argument checks specific to ROAD (the image/saliency/target checks are iscam.metrics')
# --------------------------------------------------------------------------------------------------

def _check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence):
        raise TypeError(f"fractions must be a sequence of numbers in [0, 1), got {fractions!r}")
    if len(fractions) == 0:
        raise ValueError("fractions is empty: give at least one removal fraction, e.g. ROAD_FRACTIONS")
    for fraction in fractions:
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
            raise TypeError(f"fractions must be real numbers, got {fraction!r}")
        if not (math.isfinite(fraction) and 0 <= fraction < 1):
            raise ValueError(f"every fraction must lie in [0, 1) (removing every pixel leaves nothing to "
                             f"impute from), got {fraction!r}")
    return tuple(float(fraction) for fraction in fractions)


def _removed_counts(fractions: tuple[float, ...], pixels: int) -> list[int]:
    """``floor(fraction * pixels)`` per fraction, as ROAD's ``int(width * height * th_p)``."""
    return [math.floor(fraction * pixels + _COUNT_SLACK) for fraction in fractions]


def _check_order(order: str) -> bool:
    """True for MoRF, False for LeRF."""
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' (most relevant first) or 'lerf' (least relevant first), "
                         f"got {order!r}")
    return order == "morf"


def _check_noise(noise: float | Sequence[float], channels: int) -> tuple[float, ...]:
    if isinstance(noise, numbers.Real):
        values: tuple[object, ...] = (noise,) * channels
    elif isinstance(noise, Sequence) and not isinstance(noise, (str, bytes)):
        values = tuple(noise)
    else:
        raise TypeError(f"noise must be a number or one number per channel, got {noise!r}")
    if len(values) != channels:
        raise ValueError(f"noise must be one number or one per channel ({channels}), "
                         f"got {len(values)} values")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"noise must hold real numbers (standard deviations), got {value!r}")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"noise standard deviations must be finite and >= 0, got {value!r}")
    return tuple(float(value) for value in values)  # type: ignore[arg-type]


def _check_seeds(seed: Seed, batch: int) -> list[int]:
    if isinstance(seed, Tensor):
        if seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool or seed.ndim != 1:
            raise ValueError(f"a seed tensor must be a 1-D integer tensor (one seed per image), got "
                             f"dtype {seed.dtype}, shape {tuple(seed.shape)}")
        seeds: list[object] = seed.tolist()
    elif isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        seeds = [int(seed)] * batch
    elif isinstance(seed, Sequence) and not isinstance(seed, (str, bytes)):
        seeds = list(seed)
    else:
        raise TypeError(f"seed must be an int or one int per image, got {seed!r}")
    if len(seeds) != batch:
        raise ValueError(f"seed must be an int or one int per image ({batch}), got {len(seeds)} seeds")
    for value in seeds:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < _MAX_SEED:
            raise ValueError(f"seeds must be integers in [0, 2**64), got {value!r}")
    return [int(value) for value in seeds]  # type: ignore[call-overload]


# --------------------------------------------------------------------------------------------------
# Removal order and imputation
# --------------------------------------------------------------------------------------------------

def _removal_ranks(saliency: Tensor, most_relevant_first: bool) -> Tensor:
    """Removal rank of every pixel ``[B, H*W]`` (0 = removed first); ties in raster order."""
    from iscam.metrics import pixel_ranks

    # Negating an unsigned integer map would wrap around (-1 -> 255): rank integer maps as float64.
    values = saliency if saliency.is_floating_point() else saliency.double()
    return pixel_ranks(values if most_relevant_first else -values)


def removal_masks(saliency: Tensor, fractions: Sequence[float] = ROAD_FRACTIONS, *,
                  order: Order = "morf") -> Tensor:
    """Which pixels ROAD removes, ``[B, len(fractions), H, W]`` bool (True = removed and imputed).

    At fraction f the :math:`k = \\lfloor f \\cdot HW \\rfloor` first pixels of the order are removed: by
    descending saliency for ``"morf"``, ascending for ``"lerf"``, ties in raster order (row-major; the
    earlier pixel goes first, in both orders), as :func:`iscam.metrics.pixel_ranks` orders insertion and
    deletion. The masks of increasing fractions are nested.
    """
    from iscam.metrics import _check_saliency

    _check_saliency(saliency)
    most_relevant_first = _check_order(order)
    batch, height, width = saliency.shape
    counts = _removed_counts(_check_fractions(fractions), height * width)
    ranks = _removal_ranks(saliency, most_relevant_first)
    limits = torch.tensor(counts, device=ranks.device)
    return (ranks[:, None, :] < limits[None, :, None]).view(batch, len(counts), height, width)


def _imputed_values(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Noise-free linear imputation of one image: values ``[n, C]`` of its ``n`` removed pixels, raster order.

    ``image`` is float64 ``[C, H, W]``, ``removed`` bool ``[H, W]`` with at least one pixel kept. Unknown
    u satisfies :math:`s_u x_u - \\sum_{v \\in N(u) \\cap R} w_{uv} x_v = \\sum_{v \\in N(u) \\setminus R}
    w_{uv} x_v` with N(u) the in-image neighbours and :math:`s_u = \\sum_{v \\in N(u)} w_{uv}`. The matrix
    is symmetric (w depends on the offset only and w(d) = w(-d)) and diagonally dominant, strictly so in
    a row next to a known pixel; every 8-connected group of removed pixels touches a known pixel when any
    is kept, so it is positive definite. One sparse LU factorisation (SuperLU, minimum-degree ordering of
    A + A^T, no pivoting: the matrix is SPD) serves the C right-hand sides.
    """
    channels, height, width = image.shape
    rows, cols = np.nonzero(removed)  # raster order, as ROAD's np.argwhere(mask.flatten() == 0)
    count = rows.size
    index = np.full((height, width), -1, dtype=np.int64)
    index[rows, cols] = np.arange(count)
    diagonal = np.zeros(count)
    rhs = np.zeros((count, channels))
    equations, variables, weights = [np.arange(count)], [np.arange(count)], [diagonal]
    for (row_offset, col_offset), weight in ROAD_NEIGHBOUR_WEIGHTS:
        neighbour_rows, neighbour_cols = rows + row_offset, cols + col_offset
        inside = ((neighbour_rows >= 0) & (neighbour_rows < height)
                  & (neighbour_cols >= 0) & (neighbour_cols < width))
        equation = np.flatnonzero(inside)
        neighbour_rows, neighbour_cols = neighbour_rows[inside], neighbour_cols[inside]
        # Out-of-image neighbours drop out and the rest keep their weights: s_u renormalises them.
        diagonal[equation] += weight
        neighbour = index[neighbour_rows, neighbour_cols]
        unknown = neighbour >= 0
        equations.append(equation[unknown])
        variables.append(neighbour[unknown])
        weights.append(np.full(int(unknown.sum()), -weight))
        known = ~unknown
        rhs[equation[known]] += weight * image[:, neighbour_rows[known], neighbour_cols[known]].T
    entries = (np.concatenate(equations), np.concatenate(variables))
    matrix = scipy.sparse.csc_matrix((np.concatenate(weights), entries), shape=(count, count))
    factor = scipy.sparse.linalg.splu(matrix, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                                      options={"SymmetricMode": True})
    return factor.solve(rhs)


def _check_removed(removed: Tensor, shape: tuple[int, int, int]) -> None:
    if not isinstance(removed, Tensor) or removed.dtype != torch.bool:
        kind = f"dtype {removed.dtype}" if isinstance(removed, Tensor) else type(removed).__name__
        raise TypeError(f"removed must be a bool tensor [B, H, W] (True = removed), got {kind}")
    if tuple(removed.shape) != shape:
        raise ValueError(f"removed must have shape [B, H, W] = {list(shape)} to match x, got "
                         f"{list(removed.shape)}")
    everything = torch.nonzero(removed.flatten(1).all(dim=1)).flatten().tolist()[:10]
    if everything:
        raise ValueError(f"image(s) {everything} have every pixel removed: the imputation needs at least one "
                         f"kept pixel")


def linear_imputation(x: Tensor, removed: Tensor) -> Tensor:
    """ROAD's linear imputation without noise: ``x`` with every removed pixel re-estimated, ``[B, C, H, W]``.

    Each removed pixel equals the weighted mean of its 8 neighbours (:data:`ROAD_NEIGHBOUR_WEIGHTS`),
    removed neighbours included, all removed pixels of an image solved jointly (see ``_imputed_values``);
    kept pixels are returned unchanged. **Border:** neighbours outside the image are left out and the
    weights of the others renormalised, as in ROAD's code. Hence the imputation of a linear image
    :math:`a + b r + c q` (row r, column q) is exact when no removed pixel lies on the image border (every
    equation then has a point-symmetric neighbourhood, which the linear image satisfies); a removed border
    pixel is pulled towards the interior (the top-edge pixel of a linear image gets :math:`+ b / 2`) and
    that error spreads to the removed pixels connected to it. Solved in float64 on the CPU with SciPy,
    returned in ``x``'s dtype on ``x.device``.
    """
    from iscam.metrics import _check_images

    _check_images(x)
    batch, _, height, width = x.shape
    removed = removed.to(x.device) if isinstance(removed, Tensor) else removed
    _check_removed(removed, (batch, height, width))
    images = x.detach().to("cpu", torch.float64).numpy()
    masks = removed.cpu().numpy()
    out = x.detach().clone()
    for i in range(batch):
        if masks[i].any():
            values = torch.from_numpy(_imputed_values(images[i], masks[i]))
            out[i][:, removed[i]] = values.t().to(device=x.device, dtype=x.dtype)
    return out


# --------------------------------------------------------------------------------------------------
# The metric
# --------------------------------------------------------------------------------------------------

def road_curve(model: Callable[[Tensor], Tensor], x: Tensor, saliency: Tensor, target: int | Tensor, *,
               order: Order = "morf", fractions: Sequence[float] = ROAD_FRACTIONS,
               noise: float | Sequence[float] = _IMAGENET_NOISE, seed: Seed = 0,
               batch_size: int = 128) -> Tensor:  # 128 = metrics.DEFAULT_BATCH_SIZE (tested)
    """ROAD curve: probability of ``target`` once each fraction of pixels is imputed, ``[B, len(fractions)]``.

    Rong et al., ICML 2022, https://arxiv.org/abs/2202.00449. For fraction f the
    :math:`\\lfloor f \\cdot HW \\rfloor` first pixels of the order (see :func:`removal_masks`) are removed,
    in all channels, and replaced by :func:`linear_imputation` plus Gaussian noise; the value is the
    softmax probability of ``target`` on that image (as every :mod:`iscam.metrics` score). A faithful map
    makes the MoRF curve fall fast (low mean) and the LeRF curve stay high; :func:`road_scores` summarises.

    Conventions (and where they depart from ROAD's code, ``road/imputations.py`` / ``imputed_dataset.py``):

    - ``order``: ``"morf"`` removes by descending saliency, ``"lerf"`` by ascending saliency; ``fractions``
      is the share *removed* in both orders. (ROAD's ``th_p`` is the share removed for MoRF but *kept* for
      LeRF; pytorch-grad-cam's ``percentile`` is the share kept in both.) Default: 10 %, ..., 90 %.
    - Removed count :math:`\\lfloor f \\cdot HW \\rfloor` as ROAD's ``int()``; pytorch-grad-cam instead
      keeps the pixels strictly below ``np.percentile(map, p)``, which can differ by one pixel.
    - Ties: raster order (stable sort), so a constant map removes the top rows first in both orders.
      ROAD instead adds a fixed random perturbation of std 1e-4 to the min-max-rescaled map (shared by
      all images of a dataset); pytorch-grad-cam keeps every pixel tied at its threshold.
    - Imputation: 8 neighbours, direct 1/6, diagonal 1/12, border neighbours dropped, solved jointly
      (:func:`linear_imputation`), as ROAD. Done on ``x`` as given, i.e. in normalised space, which
      gives the same imputation as ROAD's [0, 1] space since it commutes with a per-channel affine map.
    - ``noise``: standard deviation, in the units of ``x``, of the Gaussian noise added to the imputed
      pixels only; one number or one per channel. The default is ROAD's 0.01 of the [0, 1] pixel range
      for ImageNet mean/std normalisation, ``road_noise(IMAGENET_STD)`` = (0.0437, 0.0446, 0.0444); pass
      ``road_noise(preprocess.std)`` for other normalisations and ``noise=0`` for a deterministic curve.
      pytorch-grad-cam adds its 0.01 in the units of its input tensor (normalised, so ~4.4x less).
    - ``seed``: an int (every image uses it) or one int per image, in [0, 2**64). Image i draws its noise
      from its own ``torch.Generator`` seeded with its seed, fraction after fraction: a ``[C, n]`` float32
      standard normal per fraction (n removed pixels in raster order), the values ROAD's
      ``randn_like(res.t())`` draws from the same seed (for n * C >= 16). A row therefore depends on its
      image, map, target and seed only, never on the other images of the batch or on ``batch_size``, and
      is the same on every device.
    - ``batch_size``: imputed images per forward pass; the ``B * len(fractions)`` images are imputed on the
      CPU (SciPy) one at a time and sent through the model on ``x.device`` ``batch_size`` at a time.
      Cost: one sparse factorisation per (image, fraction), measured in ``benchmarks/road_cpu.py``.

    Inputs are checked as in :mod:`iscam.metrics` (``[B, C, H, W]`` float ``x``, ``[B, H, W]`` finite
    non-negative ``saliency``, int or ``LongTensor[B]`` ``target``); errors come before any work.
    """
    from iscam.metrics import (
        _as_target,
        _check_batch_size,
        _check_images,
        _check_saliency,
        _evaluating,
        _target_probability,
    )

    _check_images(x)
    batch, channels, height, width = x.shape
    saliency = saliency.to(x.device) if isinstance(saliency, Tensor) else saliency
    _check_saliency(saliency, (batch, height, width))
    most_relevant_first = _check_order(order)
    counts = _removed_counts(_check_fractions(fractions), height * width)
    noise_std = _check_noise(noise, channels)
    seeds = _check_seeds(seed, batch)
    _check_batch_size(batch_size)
    classes = _as_target(target, batch, x.device)

    ranks = _removal_ranks(saliency, most_relevant_first).cpu()
    images = x.detach().to("cpu", torch.float64).numpy()
    scale = np.asarray(noise_std)
    noisy = bool(scale.any())
    frames: list[Tensor] = []
    frame_images: list[int] = []
    scores: list[Tensor] = []

    def forward() -> None:
        scores.append(_target_probability(model, torch.stack(frames), classes[frame_images]))
        frames.clear()
        frame_images.clear()

    with _evaluating(model):
        for i in range(batch):
            generator = torch.Generator().manual_seed(seeds[i])
            for count in counts:
                removed = (ranks[i] < count).view(height, width)
                frame = x[i].detach().clone()
                if count > 0:
                    values = _imputed_values(images[i], removed.numpy())
                    if noisy:
                        draw = torch.randn((channels, count), generator=generator, dtype=torch.float32)
                        values = values + draw.t().double().numpy() * scale
                    frame[:, removed.to(x.device)] = torch.from_numpy(values).t().to(x.device, x.dtype)
                frames.append(frame)
                frame_images.append(i)
                if len(frames) == batch_size:
                    forward()
        if frames:
            forward()
    return torch.cat(scores).view(batch, len(counts))


class RoadScores(NamedTuple):
    """Per-image summaries of a MoRF and a LeRF curve, each ``[B]``."""

    morf: Tensor  #: mean of the MoRF curve over its fractions (lower is better)
    lerf: Tensor  #: mean of the LeRF curve over its fractions (higher is better)
    gap: Tensor  #: ``lerf - morf`` (higher is better)


def road_scores(curve_morf: Tensor, curve_lerf: Tensor) -> RoadScores:
    """Mean MoRF, mean LeRF and their gap per image, from two :func:`road_curve` results ``[B, F]``.

    The mean over the fractions weighs each fraction equally, as pytorch-grad-cam's
    ``ROADMostRelevantFirstAverage`` / ``ROADLeastRelevantFirstAverage``; its ``ROADCombined`` is
    ``gap / 2``. Both curves must cover the same images and fractions.
    """
    for curve, name in ((curve_morf, "curve_morf"), (curve_lerf, "curve_lerf")):
        if not isinstance(curve, Tensor) or curve.ndim != 2 or curve.shape[1] == 0:
            shape = tuple(curve.shape) if isinstance(curve, Tensor) else type(curve).__name__
            raise ValueError(f"{name} must be a ROAD curve [B, fractions] with at least one fraction, "
                             f"got {shape}")
        bad = torch.nonzero(~torch.isfinite(curve).all(dim=1)).flatten().tolist()[:10]
        if bad:
            raise ValueError(f"{name} has NaN or inf values in image(s) {bad}")
    if curve_morf.shape != curve_lerf.shape:
        raise ValueError(f"curve_morf and curve_lerf must cover the same images and fractions, got "
                         f"{tuple(curve_morf.shape)} and {tuple(curve_lerf.shape)}")
    morf, lerf = curve_morf.mean(dim=1), curve_lerf.mean(dim=1)
    return RoadScores(morf, lerf, lerf - morf)
