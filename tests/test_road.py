"""iscam.road: the imputation against hand-solved systems, the curve against pytorch-grad-cam's ROAD."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from conftest import OnePixelModel
from torch import nn

from iscam import metrics, road
from iscam.data import IMAGENET_STD, ManifestDataset, Preprocess, sample_manifest

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

# Per channel (a, b, c) of the linear image a + b * row + c * column.
LINEAR = ((1.0, 0.3, -0.2), (-2.0, 0.05, 0.7), (0.5, -1.0, 1.0))


def _linear_image(height: int, width: int) -> torch.Tensor:
    rows = torch.arange(height, dtype=torch.float64)[:, None]
    cols = torch.arange(width, dtype=torch.float64)[None, :]
    return torch.stack([a + b * rows + c * cols for a, b, c in LINEAR])[None]


def _images(batch: int = 3, size: int = 10, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator, dtype=torch.float64)


def _saliency(batch: int = 3, size: int = 10, seed: int = 2) -> torch.Tensor:
    """Distinct values (no ties), so both orders are fixed by the values alone."""
    return torch.rand(batch, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class RecordingModel(nn.Module):
    """Keeps every image it is shown (in call order) and answers constant logits."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.extend(x.clone())
        return torch.zeros(x.shape[0], 2, dtype=x.dtype)


def _probability(model: nn.Module, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(images), dim=1)[torch.arange(images.shape[0]), target]


# --------------------------------------------------------------------------------------------------
# the imputation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("share", [0.05, 0.5, 0.95])
def test_linear_image_is_imputed_exactly_when_no_removed_pixel_is_on_the_border(share):
    """Every equation of a pixel away from the border has a point-symmetric neighbourhood, so the linear
    image solves the system; the system has one solution, so the imputation is the linear image again."""
    x = _linear_image(14, 17)
    generator = torch.Generator().manual_seed(3)
    removed = torch.rand(1, 14, 17, generator=generator) < share
    removed[:, [0, -1], :] = False
    removed[:, :, [0, -1]] = False
    out = road.linear_imputation(x, removed)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-11)
    assert torch.equal(out[:, :, ~removed[0]], x[:, :, ~removed[0]])  # kept pixels untouched, bit for bit


def test_border_pixels_follow_the_renormalised_rule():
    """ROAD drops out-of-image neighbours: a top-edge pixel sees weights 1/6, 1/6 (row 0) and 1/12, 1/6,
    1/12 (row 1), mean = f + b (1/3) / (2/3) = f + b / 2; the corner (0, 0) sees 1/6, 1/6, 1/12 at
    (0, 1), (1, 0), (1, 1): mean = f + (b + c) (1/4) / (5/12) = f + 0.6 (b + c)."""
    x = _linear_image(6, 7)
    b = torch.tensor([coefficients[1] for coefficients in LINEAR], dtype=torch.float64)
    c = torch.tensor([coefficients[2] for coefficients in LINEAR], dtype=torch.float64)
    edge = torch.zeros(1, 6, 7, dtype=torch.bool)
    edge[0, 0, 3] = True
    corner = torch.zeros(1, 6, 7, dtype=torch.bool)
    corner[0, 0, 0] = True
    torch.testing.assert_close(road.linear_imputation(x, edge)[0, :, 0, 3], x[0, :, 0, 3] + b / 2,
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(road.linear_imputation(x, corner)[0, :, 0, 0], x[0, :, 0, 0] + 0.6 * (b + c),
                               rtol=0, atol=1e-12)


def _neighbour_sum(image: torch.Tensor, row: int, col: int,
                   skip: tuple[int, int] | None = None) -> torch.Tensor:
    """Sum of weight * value over the in-image neighbours of (row, col), leaving out ``skip``."""
    total = torch.zeros(image.shape[0], dtype=image.dtype)
    for (dr, dc), weight in road.ROAD_NEIGHBOUR_WEIGHTS:
        if (row + dr, col + dc) != skip:
            total += weight * image[:, row + dr, col + dc]
    return total


def test_one_removed_pixel_is_the_weighted_mean_of_its_neighbours():
    x = _images(batch=1, size=6)
    removed = torch.zeros(1, 6, 6, dtype=torch.bool)
    removed[0, 2, 3] = True
    expected = _neighbour_sum(x[0], 2, 3)  # interior weights sum to 1
    torch.testing.assert_close(road.linear_imputation(x, removed)[0, :, 2, 3], expected, rtol=0, atol=1e-12)


def test_two_adjacent_removed_pixels_are_solved_jointly():
    """u = (2, 2), v = (2, 3): u = m_u + v / 6 and v = m_v + u / 6 (m = the known neighbours' part), so
    u = (m_u + m_v / 6) / (1 - 1/36) -- not the one-at-a-time value."""
    x = _images(batch=1, size=6, seed=4)
    removed = torch.zeros(1, 6, 6, dtype=torch.bool)
    removed[0, 2, 2] = removed[0, 2, 3] = True
    m_u = _neighbour_sum(x[0], 2, 2, skip=(2, 3))
    m_v = _neighbour_sum(x[0], 2, 3, skip=(2, 2))
    out = road.linear_imputation(x, removed)[0]
    torch.testing.assert_close(out[:, 2, 2], (m_u + m_v / 6) / (1 - 1 / 36), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[:, 2, 3], (m_v + m_u / 6) / (1 - 1 / 36), rtol=0, atol=1e-12)


def test_float32_images_are_solved_in_float64_and_returned_in_float32():
    x = _linear_image(9, 9).float()
    removed = torch.zeros(1, 9, 9, dtype=torch.bool)
    removed[0, 2:7, 2:7] = True
    out = road.linear_imputation(x, removed)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# which pixels are removed
# --------------------------------------------------------------------------------------------------


def test_removal_masks_follow_saliency_order_and_floor_counts():
    saliency = _saliency(batch=2, size=10)
    # 0.57 * 100 = 56.99999999999999 in floating point: still 57 pixels; 0.256 * 100 rounds down (floor)
    fractions = (0.0, 0.1, 0.256, 0.57, 0.9)
    morf = road.removal_masks(saliency, fractions, order="morf")
    lerf = road.removal_masks(saliency, fractions, order="lerf")
    assert morf.shape == (2, 5, 10, 10) and morf.dtype == torch.bool
    for b in range(2):
        values = saliency[b].flatten()
        for f, count in enumerate((0, 10, 25, 57, 90)):
            assert int(morf[b, f].sum()) == count == int(lerf[b, f].sum())
            if count:
                assert values[morf[b, f].flatten()].min() > values[~morf[b, f].flatten()].max()
                assert values[lerf[b, f].flatten()].max() < values[~lerf[b, f].flatten()].min()
    assert (morf[:, :-1] <= morf[:, 1:]).all() and (lerf[:, :-1] <= lerf[:, 1:]).all()  # nested


def test_integer_maps_are_ranked_like_float_maps():
    levels = torch.randint(1, 256, (2, 6, 6), generator=torch.Generator().manual_seed(8))
    levels[:, 2, 1:4] = 0  # uint8 negation keeps 0 at 0 but wraps 1..255 to 255..1: 0 would go last
    for order in ("morf", "lerf"):
        as_float = road.removal_masks(levels.double(), (0.3, 0.7), order=order)
        for dtype in (torch.uint8, torch.int64):
            assert torch.equal(road.removal_masks(levels.to(dtype), (0.3, 0.7), order=order), as_float)


def test_ties_are_removed_in_raster_order_in_both_orders():
    saliency = torch.zeros(1, 4, 5)
    saliency[0, 3, 4] = 1.0  # one top pixel; the 19 others tie at 0
    morf = road.removal_masks(saliency, (0.25,), order="morf")[0, 0].flatten()
    lerf = road.removal_masks(saliency, (0.25,), order="lerf")[0, 0].flatten()
    assert torch.nonzero(morf).flatten().tolist() == [0, 1, 2, 3, 19]  # the top pixel, then raster order
    assert torch.nonzero(lerf).flatten().tolist() == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------------------------------
# the curve
# --------------------------------------------------------------------------------------------------


def test_curve_without_noise_is_the_probability_on_the_imputed_images(tiny_cnn):
    model = tiny_cnn.double()
    x, saliency = _images(), _saliency()
    target = torch.tensor([0, 3, 4])
    fractions = (0.1, 0.5, 0.9)
    for order in ("morf", "lerf"):
        curve = road.road_curve(model, x, saliency, target, order=order, fractions=fractions, noise=0.0,
                                batch_size=4)
        masks = road.removal_masks(saliency, fractions, order=order)
        expected = torch.stack([_probability(model, road.linear_imputation(x, masks[:, f]), target)
                                for f in range(3)], dim=1)
        assert curve.shape == (3, 3) and curve.dtype == torch.float64
        torch.testing.assert_close(curve, expected, rtol=0, atol=1e-12)
        again = road.road_curve(model, x, saliency, target, order=order, fractions=fractions, noise=0.0,
                                seed=99, batch_size=4)
        assert torch.equal(curve, again)  # without noise the seed is irrelevant


def test_fraction_zero_is_the_clean_image(tiny_cnn):
    model = tiny_cnn.double()
    x, saliency = _images(), _saliency()
    curve = road.road_curve(model, x, saliency, 2, fractions=(0.0,), seed=5)
    torch.testing.assert_close(curve[:, 0], _probability(model, x, torch.full((3,), 2)), rtol=0, atol=1e-12)


def test_noise_is_drawn_per_image_from_its_seed_on_the_removed_pixels_only():
    """Frame (image i, fraction k) = imputation + std_c * z, z the k-th [C, n] float32 draw of image i's
    generator seeded with seed[i]: recorded frames rebuilt by hand."""
    x, saliency = _images(batch=2, size=8), _saliency(batch=2, size=8)
    fractions, noise, seeds = (0.3, 0.6), (0.5, 0.0, 2.0), [11, 2**64 - 1]
    model = RecordingModel()
    road.road_curve(model, x, saliency, 0, order="lerf", fractions=fractions, noise=noise, seed=seeds,
                    batch_size=3)
    assert len(model.seen) == 4
    masks = road.removal_masks(saliency, fractions, order="lerf")
    scale = torch.tensor(noise, dtype=torch.float64)[:, None]
    for i in range(2):
        generator = torch.Generator().manual_seed(seeds[i])
        for k in range(2):
            removed = masks[i, k]
            frame = road.linear_imputation(x[i : i + 1], removed[None])[0]
            draw = torch.randn((3, int(removed.sum())), generator=generator, dtype=torch.float32)
            frame[:, removed] += scale * draw.double()
            torch.testing.assert_close(model.seen[2 * i + k], frame, rtol=0, atol=1e-12)
            assert torch.equal(model.seen[2 * i + k][:, ~removed], x[i][:, ~removed])


def test_seeded_noise_is_reproducible_and_independent_of_the_batch(tiny_cnn):
    model = tiny_cnn.double()
    x, saliency = _images(), _saliency()
    target = torch.tensor([1, 2, 0])
    seeds = [7, 8, 9]
    curve = road.road_curve(model, x, saliency, target, seed=seeds, batch_size=5)
    assert torch.equal(curve, road.road_curve(model, x, saliency, target, seed=seeds, batch_size=5))
    for batch_size in (1, 27):
        torch.testing.assert_close(road.road_curve(model, x, saliency, target, seed=seeds,
                                                   batch_size=batch_size), curve, rtol=0, atol=1e-13)
    alone = road.road_curve(model, x[1:2], saliency[1:2], target[1:2], seed=[8])
    torch.testing.assert_close(alone, curve[1:2], rtol=0, atol=1e-13)
    reordered = road.road_curve(model, x[[2, 1, 0]], saliency[[2, 1, 0]], target[[2, 1, 0]], seed=seeds[::-1])
    torch.testing.assert_close(reordered, curve[[2, 1, 0]], rtol=0, atol=1e-13)
    # the noise matters: another seed moves the curve, noise=0 gives yet another
    assert not torch.equal(road.road_curve(model, x, saliency, target, seed=[1, 2, 3], batch_size=5), curve)
    assert not torch.equal(road.road_curve(model, x, saliency, target, noise=0.0, batch_size=5), curve)


def test_one_int_seed_gives_every_image_the_same_stream(tiny_cnn):
    model = tiny_cnn.double()
    x = _images(batch=1).expand(2, -1, -1, -1)
    saliency = _saliency(batch=1).expand(2, -1, -1)
    curve = road.road_curve(model, x, saliency, 3, seed=42)
    assert torch.equal(curve[0], curve[1])
    torch.testing.assert_close(curve, road.road_curve(model, x, saliency, 3, seed=[42, 42]), rtol=0, atol=0)


def test_morf_and_lerf_on_a_model_that_reads_one_pixel():
    """The model reads pixel p = (4, 6), the only non-zero pixel of the image, and the map ranks p first.
    MoRF removes p at every fraction; all known pixels are 0, so the (noise-free) imputation is 0
    everywhere and p_0 = sigmoid(0) = 1/2. LeRF removes p last, i.e. never below 100 %, so p keeps its
    value v and p_0 = sigmoid(g v). The gap of road_scores is sigmoid(g v) - 1/2."""
    size, gain, value = 9, 2.0, 1.5
    model = OnePixelModel(row=4, col=6, gain=gain)
    x = torch.zeros(2, 3, size, size, dtype=torch.float64)
    x[:, 0, 4, 6] = value
    saliency = _saliency(batch=2, size=size) * 0.5
    saliency[:, 4, 6] = 1.0
    morf = road.road_curve(model, x, saliency, 0, order="morf", noise=0.0)
    lerf = road.road_curve(model, x, saliency, 0, order="lerf", noise=0.0)
    high = 1 / (1 + math.exp(-gain * value))
    torch.testing.assert_close(morf, torch.full((2, 9), 0.5, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(lerf, torch.full((2, 9), high, dtype=torch.float64), rtol=0, atol=1e-12)
    scores = road.road_scores(morf, lerf)
    torch.testing.assert_close(scores.gap, torch.full((2,), high - 0.5, dtype=torch.float64), rtol=0,
                               atol=1e-12)


def test_road_scores_are_the_means_and_their_gap():
    morf = torch.tensor([[0.2, 0.4], [0.0, 1.0]])
    lerf = torch.tensor([[0.9, 0.7], [0.5, 0.5]])
    scores = road.road_scores(morf, lerf)
    torch.testing.assert_close(scores.morf, torch.tensor([0.3, 0.5]))
    torch.testing.assert_close(scores.lerf, torch.tensor([0.8, 0.5]))
    torch.testing.assert_close(scores.gap, torch.tensor([0.5, 0.0]))


def test_model_mode_is_restored_and_dropout_is_off(tiny_cnn):
    model = nn.Sequential(tiny_cnn, nn.Dropout(0.5)).double().train()
    x, saliency = _images(batch=1), _saliency(batch=1)
    first = road.road_curve(model, x, saliency, 1, fractions=(0.5,), noise=0.0)
    assert model.training and model[1].training
    assert torch.equal(first, road.road_curve(model, x, saliency, 1, fractions=(0.5,), noise=0.0))


def test_defaults_are_road_s_and_the_metrics_module_re_exports():
    parameters = inspect.signature(road.road_curve).parameters
    assert parameters["fractions"].default == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    assert parameters["noise"].default == pytest.approx([0.01 / s for s in IMAGENET_STD])
    assert parameters["batch_size"].default == metrics.DEFAULT_BATCH_SIZE
    assert road.road_noise((0.5, 0.25, 1.0)) == pytest.approx((0.02, 0.04, 0.01))
    assert sum(weight for _, weight in road.ROAD_NEIGHBOUR_WEIGHTS) == pytest.approx(1.0)
    assert metrics.road_curve is road.road_curve and metrics.road_scores is road.road_scores
    assert {"road_curve", "road_scores"} <= set(metrics.__all__)


# --------------------------------------------------------------------------------------------------
# bad input: a clear error before any work
# --------------------------------------------------------------------------------------------------


class NeverCalled(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the model ran before the arguments were checked")


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"x": torch.zeros(3, 10, 10)}, ValueError, "4-D batch"),
        ({"x": torch.zeros(3, 3, 10, 10, dtype=torch.long)}, ValueError, "floating-point"),
        ({"saliency": torch.zeros(3, 9, 10)}, ValueError, "shape"),
        ({"saliency": -torch.ones(3, 10, 10)}, ValueError, "non-negative"),
        ({"target": 1.5}, TypeError, "target"),
        ({"target": torch.tensor([0, 1])}, ValueError, "shape"),
        ({"order": "MoRF"}, ValueError, "'morf'"),
        ({"fractions": (0.5, 1.0)}, ValueError, r"\[0, 1\)"),
        ({"fractions": (-0.1,)}, ValueError, r"\[0, 1\)"),
        ({"fractions": (float("nan"),)}, ValueError, r"\[0, 1\)"),
        ({"fractions": ()}, ValueError, "empty"),
        ({"fractions": 0.5}, TypeError, "sequence"),
        ({"fractions": (True,)}, TypeError, "real numbers"),
        ({"noise": -0.1}, ValueError, ">= 0"),
        ({"noise": (0.1, 0.1)}, ValueError, "one per channel"),
        ({"noise": float("inf")}, ValueError, "finite"),
        ({"seed": -1}, ValueError, r"2\*\*64"),
        ({"seed": 2**64}, ValueError, r"2\*\*64"),
        ({"seed": [1, 2]}, ValueError, "one int per image"),
        ({"seed": 1.0}, TypeError, "seed"),
        ({"seed": True}, TypeError, "seed"),
        ({"seed": torch.tensor([1.0, 2.0, 3.0])}, ValueError, "integer tensor"),
        ({"batch_size": 0}, ValueError, "batch_size"),
    ],
)
def test_bad_arguments_raise_before_any_work(change, error, match):
    arguments = {"x": _images(), "saliency": _saliency(), "target": 0}
    arguments.update(change)
    options = {key: arguments.pop(key) for key in ("order", "fractions", "noise", "seed", "batch_size")
               if key in arguments}
    with pytest.raises(error, match=match):
        road.road_curve(NeverCalled(), arguments["x"], arguments["saliency"], arguments["target"], **options)


def test_target_beyond_the_logits_is_an_error(tiny_cnn):
    with pytest.raises(ValueError, match="out of range"):
        road.road_curve(tiny_cnn.double(), _images(), _saliency(), 5, fractions=(0.5,))


def test_bad_masks_and_curves_raise():
    x = _images(batch=2, size=5)
    everything = torch.zeros(2, 5, 5, dtype=torch.bool)
    everything[1] = True
    with pytest.raises(ValueError, match=r"image\(s\) \[1\] have every pixel removed"):
        road.linear_imputation(x, everything)
    with pytest.raises(TypeError, match="bool tensor"):
        road.linear_imputation(x, torch.zeros(2, 5, 5))
    with pytest.raises(ValueError, match="shape"):
        road.linear_imputation(x, torch.zeros(2, 5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="same images and fractions"):
        road.road_scores(torch.zeros(2, 9), torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"NaN or inf values in image\(s\) \[1\]"):
        road.road_scores(torch.zeros(2, 9), torch.tensor([[0.0] * 9, [math.nan] * 9]))
    with pytest.raises(ValueError, match="at least one fraction"):
        road.road_scores(torch.zeros(2, 0), torch.zeros(2, 0))
    with pytest.raises(ValueError, match="positive"):
        road.road_noise((0.2, 0.0, 0.2))


# --------------------------------------------------------------------------------------------------
# against pytorch-grad-cam's ROAD (independent reference, test-only)
# --------------------------------------------------------------------------------------------------

REFERENCE_SIZE = 48


@pytest.fixture(scope="module")
def three_sample_images(assets):
    """3 real ILSVRC2012-val sample images at 48x48 with a smooth, tie-free saliency map each."""
    dataset = ManifestDataset(sample_manifest(assets), Preprocess(REFERENCE_SIZE, "stretch"), limit=3)
    x = torch.stack([dataset[i].image for i in range(3)])
    # the local brightness, min-max normalised: a smooth map like a CAM's, computed in float64
    brightness = nn.functional.avg_pool2d(x.double().mean(1, keepdim=True), 7, 1, 3, count_include_pad=False)
    saliency = brightness[:, 0] - brightness.amin(dim=(1, 2, 3))[:, None, None]
    saliency = saliency / saliency.amax(dim=(1, 2))[:, None, None]
    assert all(saliency[i].unique().numel() == REFERENCE_SIZE**2 for i in range(3))  # no ties
    return x, saliency


@pytest.fixture
def sharp_tiny_cnn(tiny_cnn):
    """The tiny CNN with a 30x head: its probabilities move with the image, so the curves are informative."""
    with torch.no_grad():
        tiny_cnn.classifier.weight.mul_(30.0)
    return tiny_cnn


def _grad_cam_removed_fraction(saliency: np.ndarray, percentile: int) -> float:
    """pytorch-grad-cam keeps the pixels strictly below np.percentile(map, p): removed share of the image."""
    kept = int((saliency < np.percentile(saliency, percentile)).sum())
    return (saliency.size - kept) / saliency.size


@pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")  # numpy on grad-cam's torch maps
def test_equals_pytorch_grad_cam_road_without_noise(three_sample_images, sharp_tiny_cnn, one_thread):
    """Conventions mapped: grad-cam's ``percentile`` p is the share *kept* (both orders), and its count is
    #(map < np.percentile(map, p)) -- one pixel off floor((1 - p/100) HW) for some p -- so each p is passed
    to us as that exact removed share; its score is ClassifierOutputSoftmaxTarget (softmax probability);
    its imputation is cast to float32. Tolerance 1e-6: float32 rounding of the imputed values and of
    differently batched float32 forwards (measured: at most 1.8e-7)."""
    road_metric = pytest.importorskip("pytorch_grad_cam.metrics.road")
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    x, saliency = three_sample_images
    model = sharp_tiny_cnn
    target = model(x).argmax(dim=1).detach()
    maps = saliency.numpy()
    percentiles = tuple(range(10, 100, 10))  # its ROAD*Average set: removed shares 90 %, ..., 10 %
    fractions = [_grad_cam_removed_fraction(maps[0], p) for p in percentiles]
    assert all(_grad_cam_removed_fraction(maps[i], p) == f  # the same counts for all three maps
               for i in (1, 2) for p, f in zip(percentiles, fractions))
    for order, removal in (("morf", RemoveMostRelevantFirst), ("lerf", RemoveLeastRelevantFirst)):
        reference = torch.tensor(np.stack([
            PerturbationConfidenceMetric(removal(p, road_metric.NoisyLinearImputer(noise=0.0)))(
                x, maps, [ClassifierOutputSoftmaxTarget(int(c)) for c in target], model, return_diff=False)
            for p in percentiles], axis=1))
        ours = road.road_curve(model, x, saliency, target, order=order, fractions=fractions, noise=0.0)
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
        assert float(ours.max() - ours.min()) > 0.1  # the curves move: the comparison has teeth


@pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")
def test_equals_pytorch_grad_cam_road_with_its_noise(three_sample_images, sharp_tiny_cnn, one_thread):
    """With noise, seeding torch's global generator with s before grad-cam's imputer draws the same
    values as our generator seeded with s: grad-cam adds ``noise * randn_like(res.t())`` in the units
    of its input tensor, so noise=0.01 here (not ROAD's 0.01 of the pixel range, our default)."""
    road_metric = pytest.importorskip("pytorch_grad_cam.metrics.road")
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )

    x, saliency = three_sample_images
    for i, (order, removal, percentile) in enumerate((("morf", RemoveMostRelevantFirst, 80),
                                                      ("lerf", RemoveLeastRelevantFirst, 20),
                                                      ("morf", RemoveMostRelevantFirst, 40))):
        seed = 1000 + i
        torch.manual_seed(seed)
        theirs = removal(percentile, road_metric.NoisyLinearImputer(noise=0.01))(x[i], saliency[i])
        model = RecordingModel()
        fraction = _grad_cam_removed_fraction(saliency[i].numpy(), percentile)
        road.road_curve(model, x[i : i + 1], saliency[i : i + 1], 0, order=order, fractions=(fraction,),
                        noise=0.01, seed=seed)
        (ours,) = model.seen
        changed = ours != x[i]
        assert int(changed.any(dim=0).sum()) == round(fraction * REFERENCE_SIZE**2)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_imputation_equals_quantus_noisy_linear_imputation(three_sample_images):
    """Quantus' ``noisy_linear_imputation`` (its ROAD's perturbation; noise=0 here) on the same masks, in
    float64: the same system, solved by SciPy's spsolve instead of our SPD LU. Quantus' ROAD metric itself
    is not comparable: it scores top-1 correctness (argmax == label), not the probability, in MoRF only."""
    from quantus.functions import perturb_func as perturb  # a test extra: CI must run this, never skip it
    x, saliency = three_sample_images
    x = x.double()
    masks = road.removal_masks(saliency, (0.1, 0.5, 0.9), order="lerf")
    for f in range(3):
        ours = road.linear_imputation(x, masks[:, f])
        for i in range(3):
            indices = torch.nonzero(masks[i, f].flatten()).flatten().numpy()
            theirs = perturb.noisy_linear_imputation(x[i].numpy(), indices, noise=0.0)
            torch.testing.assert_close(ours[i], torch.from_numpy(theirs), rtol=0, atol=1e-10)
