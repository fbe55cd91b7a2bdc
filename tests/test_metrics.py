"""iscam.metrics against plain reference loops written here, hand-computed cases and bad input."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import OnePixelModel
from torch import nn

from iscam import metrics
from iscam.batching import ChunkBuffer

# --------------------------------------------------------------------------------------------------
# helpers: small inputs, reference loops
# --------------------------------------------------------------------------------------------------


def _images(batch: int = 3, size: int = 16, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator, dtype=torch.float64)


def _saliency_with_ties(batch: int = 3, size: int = 16, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Few distinct levels, so many pixels tie and the tie-breaking order matters.
    return torch.randint(0, 5, (batch, size, size), generator=generator).double() / 4


def _reference_order(saliency_map: torch.Tensor) -> list[int]:
    """Flat pixel indices by descending saliency, ties in raster order (Python's sort is stable)."""
    values = saliency_map.flatten().tolist()
    return sorted(range(len(values)), key=lambda p: -values[p])


def _reference_curve(model, x, saliency, target, step, background, insertion) -> torch.Tensor:
    """One frame at a time, pixels moved in plain Python, as in RISE's evaluation loop."""
    _, _, height, width = x.shape
    steps = math.ceil(height * width / step)
    curves = []
    for b in range(x.shape[0]):
        order = _reference_order(saliency[b])
        scores = []
        for t in range(steps + 1):
            frame = background[b].clone() if insertion else x[b].clone()
            source = x[b] if insertion else background[b]
            for pixel in order[: t * step]:
                row, col = divmod(pixel, width)
                frame[:, row, col] = source[:, row, col]
            with torch.no_grad():
                probabilities = torch.softmax(model(frame[None]), dim=1)
            scores.append(probabilities[0, target[b]].item())
        curves.append(scores)
    return torch.tensor(curves, dtype=torch.float64)


def _scipy_blur(x: torch.Tensor) -> torch.Tensor:
    """RISE's substrate spelt out: scipy's gkern, zero padding 5, per-channel correlation loops."""
    ndimage = pytest.importorskip("scipy.ndimage")
    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    kernel = ndimage.gaussian_filter(delta, 5)
    array = x.numpy()
    padded = np.pad(array, ((0, 0), (0, 0), (5, 5), (5, 5)))
    out = np.zeros_like(array)
    for row in range(array.shape[2]):
        for col in range(array.shape[3]):
            out[:, :, row, col] = (padded[:, :, row : row + 11, col : col + 11] * kernel).sum(axis=(2, 3))
    return torch.from_numpy(out)


class ConstantModel(nn.Module):
    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


# --------------------------------------------------------------------------------------------------
# insertion / deletion
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("insertion", [False, True])
@pytest.mark.parametrize("substrate", ["zeros", "blur", "callable"])
def test_curves_match_reference_loop(tiny_cnn, insertion, substrate):
    model = tiny_cnn.double()
    x, saliency = _images(), _saliency_with_ties()
    target = torch.tensor([0, 3, 4])
    step = 10  # 256 pixels -> n = 26 steps, the last one partial
    if substrate == "zeros":
        background = torch.zeros_like(x)
        argument = "zeros"
    elif substrate == "blur":
        background = _scipy_blur(x)
        argument = "blur"
    else:
        background = torch.full_like(x, 0.7)
        argument = lambda images: torch.full_like(images, 0.7)  # noqa: E731
    function = metrics.insertion_curve if insertion else metrics.deletion_curve
    curve = function(model, x, saliency, target, step=step, substrate=argument, batch_size=16)
    expected = _reference_curve(model, x, saliency, target, step, background, insertion)
    assert curve.shape == (3, 27)
    torch.testing.assert_close(curve, expected, rtol=0, atol=1e-12)


def test_curve_endpoints_are_image_and_substrate(tiny_cnn):
    model = tiny_cnn.double()
    x, saliency = _images(), _saliency_with_ties()
    target = torch.tensor([1, 2, 0])
    probability = torch.softmax(model(x), dim=1)[torch.arange(3), target].detach()
    probability_blur = torch.softmax(model(_scipy_blur(x)), dim=1)[torch.arange(3), target].detach()
    deletion = metrics.deletion_curve(model, x, saliency, target, step=7)
    insertion = metrics.insertion_curve(model, x, saliency, target, step=7)
    torch.testing.assert_close(deletion[:, 0], probability, rtol=0, atol=1e-12)
    torch.testing.assert_close(insertion[:, -1], probability, rtol=0, atol=1e-12)
    torch.testing.assert_close(insertion[:, 0], probability_blur, rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch_size", [1, 5, 27, 1000])
def test_chunk_size_does_not_change_curves(tiny_cnn, batch_size):
    model = tiny_cnn.double()
    x, saliency = _images(), _saliency_with_ties()
    reference = metrics.deletion_curve(model, x, saliency, 2, step=10, batch_size=81)
    curve = metrics.deletion_curve(model, x, saliency, 2, step=10, batch_size=batch_size)
    torch.testing.assert_close(curve, reference, rtol=0, atol=1e-13)


def test_batched_equals_per_image_float32(tiny_cnn):
    x, saliency = _images().float(), _saliency_with_ties().float()
    target = torch.tensor([4, 0, 1])
    batched = metrics.insertion_curve(tiny_cnn, x, saliency, target, step=13, batch_size=64)
    single = torch.cat([metrics.insertion_curve(tiny_cnn, x[i : i + 1], saliency[i : i + 1], int(target[i]),
                                                step=13, batch_size=1) for i in range(3)])
    assert batched.dtype == torch.float32
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-6)


def test_int_target_equals_tensor_target(tiny_cnn):
    x, saliency = _images().float(), _saliency_with_ties().float()
    as_int = metrics.deletion_curve(tiny_cnn, x, saliency, 3, step=32)
    as_tensor = metrics.deletion_curve(tiny_cnn, x, saliency, torch.tensor([3, 3, 3]), step=32)
    torch.testing.assert_close(as_int, as_tensor, rtol=0, atol=0)


def test_one_pixel_model_perfect_ranking_gives_analytic_auc():
    """Only pixel (5, 9) matters; the map ranks it first, so deletion kills the evidence at frame 1.

    p_0(frame 0) = sigmoid(g * v) = P; every later frame has the pixel at 0, p_0 = sigmoid(0) = 1/2.
    AUC = (sum - first/2 - last/2) / n = (P + n/2 - P/2 - 1/4) / n = (P/2 + (n - 1/2)/2) / n.
    Insertion onto zeros mirrors it: frame 0 = 1/2, frames 1..n = P, AUC = (1/4 + P (n - 1/2)) / n.
    """
    size, step = 12, 5
    model = OnePixelModel(row=5, col=9, gain=3.0)
    x = _images(batch=1, size=size)
    x[0, 0, 5, 9] = 1.5
    generator = torch.Generator().manual_seed(0)
    saliency = torch.rand(1, size, size, generator=generator, dtype=torch.float64) * 0.5
    saliency[0, 5, 9] = 1.0
    n = math.ceil(size * size / step)
    big_p = 1 / (1 + math.exp(-3.0 * 1.5))
    deletion = metrics.auc(metrics.deletion_curve(model, x, saliency, 0, step=step, substrate="zeros"))
    insertion = metrics.auc(metrics.insertion_curve(model, x, saliency, 0, step=step, substrate="zeros"))
    assert deletion.item() == pytest.approx((big_p / 2 + (n - 0.5) / 2) / n, abs=1e-12)
    assert insertion.item() == pytest.approx((0.25 + big_p * (n - 0.5)) / n, abs=1e-12)


def test_one_pixel_model_worst_ranking_deletes_the_pixel_last():
    size, step = 8, 3  # 64 pixels, n = 22; the last frame holds the pixel ranked 63
    model = OnePixelModel(row=2, col=2, gain=2.0)
    x = torch.zeros(1, 3, size, size, dtype=torch.float64)
    x[0, 0, 2, 2] = 1.0
    saliency = torch.ones(1, size, size, dtype=torch.float64)
    saliency[0, 2, 2] = 0.0
    curve = metrics.deletion_curve(model, x, saliency, 0, step=step)
    big_p = 1 / (1 + math.exp(-2.0))
    expected = torch.full((1, 23), big_p, dtype=torch.float64)
    expected[0, -1] = 0.5
    torch.testing.assert_close(curve, expected, rtol=0, atol=1e-12)


def test_constant_model_auc_equals_its_probability():
    model = ConstantModel([0.3, -1.0, 2.0])
    x, saliency = _images(batch=2, size=10), _saliency_with_ties(batch=2, size=10)
    probability = torch.softmax(torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64), dim=0)[2].item()
    for function in (metrics.deletion_curve, metrics.insertion_curve):
        areas = metrics.auc(function(model, x, saliency, 2, step=7))
        expected = torch.full((2,), probability, dtype=torch.float64)
        torch.testing.assert_close(areas, expected, rtol=0, atol=1e-15)


def test_auc_hand_computed():
    curves = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.5, 0.0]], dtype=torch.float64)
    # (0 + 1 + 1 - 0 - 0.5) / 2 = 0.75 ; (1 + 0.5 + 0 - 0.5 - 0) / 2 = 0.5
    torch.testing.assert_close(metrics.auc(curves), torch.tensor([0.75, 0.5], dtype=torch.float64))
    assert metrics.auc(torch.tensor([0.2, 0.4])).item() == pytest.approx(0.3)
    with pytest.raises(ValueError, match="at least 2 points"):
        metrics.auc(torch.tensor([[0.5]]))
    with pytest.raises(ValueError, match="NaN"):
        metrics.auc(torch.tensor([0.5, float("nan")]))


def test_pixel_ranks_stable_descending():
    saliency = torch.tensor([[[0.5, 1.0], [0.5, 0.0]]])
    # order: (0,1)=1.0, then the tie (0,0) before (1,0), then (1,1)
    assert metrics.pixel_ranks(saliency).tolist() == [[1, 0, 2, 3]]


def test_gaussian_kernel_matches_scipy_gkern():
    ndimage = pytest.importorskip("scipy.ndimage")
    for size, sigma in [(11, 5.0), (5, 1.0), (7, 30.0)]:
        delta = np.zeros((size, size))
        delta[size // 2, size // 2] = 1
        expected = torch.from_numpy(ndimage.gaussian_filter(delta, sigma))
        torch.testing.assert_close(metrics.gaussian_kernel(size, sigma, dtype=torch.float64), expected,
                                   rtol=0, atol=1e-15)


def test_model_mode_restored_and_eval_used():
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.9), nn.Linear(3 * 8 * 8, 4)).double()
    model.train()
    model[1].eval()  # a mixed state must come back unchanged
    x, saliency = _images(batch=2, size=8), _saliency_with_ties(batch=2, size=8)
    first = metrics.deletion_curve(model, x, saliency, 1, step=16)
    second = metrics.deletion_curve(model, x, saliency, 1, step=16)
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # dropout off during evaluation
    assert model.training and model[2].training and not model[1].training
    assert not first.requires_grad


# --------------------------------------------------------------------------------------------------
# reused chunk buffers and the shared chunk loop
# --------------------------------------------------------------------------------------------------


class RecordingModel(nn.Module):
    """Forwards to ``model`` and keeps a copy of every batch of frames it saw."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.model(x)


def _fresh_nan_rows(self: ChunkBuffer, rows: int) -> torch.Tensor:
    """``ChunkBuffer.take`` without reuse: a new tensor of junk per chunk (NaN; -1 ranks; True masks)."""
    junk = float("nan") if self.dtype.is_floating_point else (True if self.dtype == torch.bool else -1)
    return torch.full((rows, *self.shape), junk, dtype=self.dtype, device=self.device)


def _all_metrics(model, x, saliency, target, batch_size) -> dict[str, torch.Tensor]:
    return {
        "deletion": metrics.deletion_curve(model, x, saliency, target, step=10, batch_size=batch_size),
        "insertion": metrics.insertion_curve(model, x, saliency, target, step=10, batch_size=batch_size),
        "confidence": torch.stack(metrics.confidence(model, x, saliency, target, batch_size=batch_size)),
        "confidence-masked": torch.stack(metrics.confidence(model, x, saliency, target, target_from="masked",
                                                            batch_size=batch_size)),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_frames_filled_in_place_equal_the_allocating_expression(tiny_cnn, dtype):
    """Every frame the model sees is bit for bit ``torch.where(ranks[image] < revealed, shown, hidden)``."""
    model = RecordingModel(copy.deepcopy(tiny_cnn).to(dtype))
    x, saliency = _images().to(dtype), _saliency_with_ties().to(dtype)
    target = torch.tensor([0, 3, 4])
    for insertion in (False, True):
        model.inputs.clear()
        function = metrics.insertion_curve if insertion else metrics.deletion_curve
        function(model, x, saliency, target, step=10, batch_size=16)
        background = metrics.blur_substrate(x) if insertion else torch.zeros_like(x)
        shown, hidden = (x, background) if insertion else (background, x)
        flat_index = torch.arange(3 * 27)
        image, revealed = flat_index // 27, (flat_index % 27) * 10
        mask = (metrics.pixel_ranks(saliency)[image] < revealed[:, None]).view(-1, 1, 16, 16)
        expected = torch.where(mask, shown[image], hidden[image])
        assert [len(frames) for frames in model.inputs] == [16] * 5 + [1]
        assert torch.equal(torch.cat(model.inputs), expected)
    model.inputs.clear()
    metrics.confidence(model, x, saliency, target, batch_size=4)  # chunks of 2 images, then 1
    expected = [torch.cat([x[chunk], saliency[chunk, None] * x[chunk]])
                for chunk in (slice(0, 2), slice(2, 3))]
    assert len(model.inputs) == 2 and all(torch.equal(a, b) for a, b in zip(model.inputs, expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_reused_buffers_give_the_results_of_fresh_ones(tiny_cnn, dtype, monkeypatch):
    """Curves and confidences are bit-identical with reused chunk buffers and with a fresh NaN-filled
    tensor per chunk, at every chunk size, and chunk sizes agree to rounding."""
    model = copy.deepcopy(tiny_cnn).to(dtype)
    x, saliency = _images().to(dtype), _saliency_with_ties().to(dtype)
    target = torch.tensor([0, 3, 4])
    reference = _all_metrics(model, x, saliency, target, 1000)
    for batch_size in (1, 2, 5, 1000):
        reused = _all_metrics(model, x, saliency, target, batch_size)
        with monkeypatch.context() as patch:
            patch.setattr(ChunkBuffer, "take", _fresh_nan_rows)
            fresh = _all_metrics(model, x, saliency, target, batch_size)
        for name, values in reused.items():
            assert values.dtype == dtype and torch.isfinite(values).all()
            assert torch.equal(values, fresh[name]), name
            torch.testing.assert_close(values, reference[name], rtol=0, atol=1e-6)


class FussyModel(nn.Module):
    """Raises CUDA's out-of-memory error (simulated on the CPU) for batches above ``limit``."""

    def __init__(self, model: nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit, self.refused = model, limit, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            self.refused += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.model(x)


def test_out_of_memory_halves_the_metric_chunks(tiny_cnn):
    """The metrics share the methods' chunk loop: a chunk that runs out of memory is halved and retried."""
    model = tiny_cnn.double()
    x, saliency = _images(), _saliency_with_ties()
    expected = _all_metrics(model, x, saliency, 2, 4)  # chunks of 4 frames, of 2 images (4 rows)
    fussy = FussyModel(model, limit=4)
    result = _all_metrics(fussy, x, saliency, 2, 64)
    # each curve: 64 -> 32 -> 16 -> 8 -> 4 frames; each confidence: 32 -> 16 -> 8 -> 4 -> 2 images (all
    # but the last give the 3 images, 6 rows)
    assert fussy.refused == 2 * 4 + 2 * 4
    for name, values in result.items():
        assert torch.equal(values, expected[name]), name


# --------------------------------------------------------------------------------------------------
# Average Drop, Increase in Confidence, Win %
# --------------------------------------------------------------------------------------------------


def test_confidence_matches_loop(tiny_cnn):
    model = tiny_cnn.double()
    x, saliency = _images(batch=5), _saliency_with_ties(batch=5)
    target = torch.tensor([0, 1, 2, 3, 4])
    clean, masked = metrics.confidence(model, x, saliency, target, batch_size=4)
    for b in range(5):
        with torch.no_grad():
            y = torch.softmax(model(x[b : b + 1]), dim=1)[0, target[b]].item()
            o = torch.softmax(model(x[b : b + 1] * saliency[b]), dim=1)[0, target[b]].item()
        assert clean[b].item() == pytest.approx(y, abs=1e-12)
        assert masked[b].item() == pytest.approx(o, abs=1e-12)


def test_confidence_target_from_masked(tiny_cnn):
    model = tiny_cnn.double()
    x, saliency = _images(batch=4), _saliency_with_ties(batch=4)
    clean, masked = metrics.confidence(model, x, saliency, 1, target_from="masked", batch_size=3)
    with torch.no_grad():
        masked_probabilities = torch.softmax(model(x * saliency[:, None]), dim=1)
        clean_probabilities = torch.softmax(model(x), dim=1)
    torch.testing.assert_close(masked, masked_probabilities.max(dim=1).values, rtol=0, atol=1e-12)
    torch.testing.assert_close(clean, clean_probabilities[:, 1], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="target_from"):
        metrics.confidence(model, x, saliency, 1, target_from="argmax")


def test_average_drop_and_increase_hand_computed():
    clean = torch.tensor([0.5, 0.8, 0.2, 0.4])
    masked = torch.tensor([0.25, 0.9, 0.2, 0.0])
    torch.testing.assert_close(metrics.average_drop(clean, masked), torch.tensor([0.5, 0.0, 0.0, 1.0]))
    increase = metrics.increase_in_confidence(clean, masked)
    torch.testing.assert_close(increase, torch.tensor([0.0, 1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"image\(s\) \[1\]"):
        metrics.average_drop(torch.tensor([0.5, 0.0]), torch.tensor([0.1, 0.1]))
    with pytest.raises(ValueError, match="same images"):
        metrics.average_drop(torch.tensor([0.5, 0.2]), torch.tensor([0.1]))
    with pytest.raises(ValueError, match="NaN"):
        metrics.increase_in_confidence(torch.tensor([0.5]), torch.tensor([float("nan")]))


def test_win_rate_hand_computed():
    change_a = torch.tensor([0.1, 0.2, 0.3, 0.4, -0.2])
    change_b = torch.tensor([0.2, 0.2, 0.1, 0.5, -0.1])  # both confidences rose on the last image: A wins
    assert metrics.win_rate(change_a, change_b) == metrics.WinRate(60.0, 20.0, 20.0, 5)
    assert metrics.win_rate(change_b, change_a) == metrics.WinRate(20.0, 20.0, 60.0, 5)
    interval = metrics.win_rate_ci(change_a, change_b, n_boot=2000)
    assert interval.estimate == pytest.approx(60.0)
    assert 0.0 <= interval.low <= 60.0 <= interval.high <= 100.0
    with pytest.raises(ValueError, match="empty"):
        metrics.win_rate(torch.tensor([]), torch.tensor([]))


# --------------------------------------------------------------------------------------------------
# energy pointing game
# --------------------------------------------------------------------------------------------------


def _reference_proportion(saliency_map: torch.Tensor, boxes: list[list[float]]) -> float:
    height, width = saliency_map.shape
    inside = total = 0.0
    for row in range(height):
        for col in range(width):
            value = saliency_map[row, col].item()
            total += value
            if any(x0 <= col + 0.5 < x1 and y0 <= row + 0.5 < y1 for x0, y0, x1, y1 in boxes):
                inside += value
    return inside / total if total else 0.0


def test_energy_pointing_game_matches_loop():
    generator = torch.Generator().manual_seed(3)
    saliency = torch.rand(3, 9, 13, generator=generator, dtype=torch.float64)
    boxes = [
        [[1.2, 0.0, 5.7, 4.5]],
        [[0.0, 0.0, 3.0, 3.0], [2.0, 2.0, 7.4, 8.1]],  # overlapping: the union, counted once
        [[-4.0, 6.0, 20.0, 30.0]],  # partly outside: clipped to the frame
    ]
    result = metrics.energy_pointing_game(saliency, [torch.tensor(b) for b in boxes])
    expected = [_reference_proportion(saliency[i], boxes[i]) for i in range(3)]
    torch.testing.assert_close(result, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_energy_pointing_game_known_answers():
    saliency = torch.zeros(3, 6, 8)
    saliency[0, 1:4, 2:7] = torch.rand(3, 5) + 0.1  # exactly the box (x = column 2..6, y = row 1..3)
    saliency[1, 5, 0] = 1.0  # outside the box
    boxes = [torch.tensor([[2.0, 1.0, 7.0, 4.0]])] * 3
    result = metrics.energy_pointing_game(saliency, boxes)
    torch.testing.assert_close(result, torch.tensor([1.0, 0.0, 0.0]))  # the zero map gives 0


def test_energy_pointing_game_half_open_on_pixel_centres():
    saliency = torch.arange(1.0, 17.0).view(1, 4, 4)
    # Centres 0.5 and 1.5 lie in [0.5, 2.5); centre 2.5 does not: rows/columns 0 and 1 only.
    result = metrics.energy_pointing_game(saliency, [torch.tensor([[0.5, 0.5, 2.5, 2.5]])])
    assert result.item() == pytest.approx((1 + 2 + 5 + 6) / 136)


def test_energy_pointing_game_x_is_column():
    saliency = torch.zeros(1, 4, 6)
    saliency[0, 0, 4] = 1.0  # row 0, column 4
    wide = torch.tensor([[3.0, 0.0, 6.0, 1.0]])  # columns 3..5, row 0
    transposed = torch.tensor([[0.0, 3.0, 1.0, 6.0]])
    assert metrics.energy_pointing_game(saliency, [wide]).item() == 1.0
    # Read as (y, x) the box would cover the salient pixel; read as (x, y) it is column 0, rows 3..5.
    assert metrics.energy_pointing_game(saliency, [transposed]).item() == 0.0
    with pytest.raises(ValueError, match="entirely outside"):  # rows 3..5 do not exist in a 2-row map
        metrics.energy_pointing_game(torch.zeros(1, 2, 6), [transposed])


def test_energy_pointing_game_bad_boxes():
    saliency = torch.rand(2, 5, 5)
    good = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    with pytest.raises(ValueError, match="image 1 has no bounding box"):
        metrics.energy_pointing_game(saliency, [good, torch.zeros(0, 4)])
    with pytest.raises(ValueError, match="image 0 lie entirely outside"):
        metrics.energy_pointing_game(saliency, [torch.tensor([[5.0, 0.0, 9.0, 2.0]]), good])
    with pytest.raises(ValueError, match="empty or inverted"):
        metrics.energy_pointing_game(saliency, [good, torch.tensor([[3.0, 0.0, 1.0, 2.0]])])
    with pytest.raises(ValueError, match="one \\[m, 4\\] tensor per image"):
        metrics.energy_pointing_game(saliency, [good])
    with pytest.raises(ValueError, match=r"\[m, 4\]"):
        metrics.energy_pointing_game(saliency, [good, torch.tensor([1.0, 2.0, 3.0, 4.0])])
    with pytest.raises(ValueError, match="negative"):
        metrics.energy_pointing_game(-saliency, [good, good])


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(saliency=torch.rand(2, 16, 15)), "shape"),
        (dict(saliency=torch.rand(2, 16, 16) - 0.5), "non-negative"),
        (dict(saliency=torch.full((2, 16, 16), float("nan"))), "NaN"),
        (dict(step=0), "step"),
        (dict(step=-3), "step"),
        (dict(step=2.5), "step"),
        (dict(target=5), "out of range"),
        (dict(target=-1), ">= 0"),
        (dict(target=torch.tensor([0, 1, 2])), "shape"),
        (dict(target=torch.tensor([0.0, 1.0])), "integer"),
        (dict(x=torch.randn(3, 16, 16)), "4-D"),
        (dict(substrate="noise"), "unknown substrate"),
        (dict(substrate=lambda images: images[:, :1]), "shaped like x"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_curves_reject_bad_input(tiny_cnn, change, message):
    arguments = dict(x=torch.randn(2, 3, 16, 16), saliency=torch.rand(2, 16, 16), target=1, step=8)
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        x, saliency, target = arguments.pop("x"), arguments.pop("saliency"), arguments.pop("target")
        metrics.deletion_curve(tiny_cnn, x, saliency, target, **arguments)


def test_confidence_rejects_bad_input(tiny_cnn):
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="shape"):
        metrics.confidence(tiny_cnn, x, torch.rand(2, 8, 8), 0)
    with pytest.raises(ValueError, match="out of range"):
        metrics.confidence(tiny_cnn, x, torch.rand(2, 16, 16), 7)
    with pytest.raises(ValueError, match="NaN"):
        metrics.confidence(tiny_cnn, x * float("nan"), torch.rand(2, 16, 16), 0)


# --------------------------------------------------------------------------------------------------
# device agreement (runs when a GPU is present)
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tiny_cnn):
    x, saliency = _images().float(), _saliency_with_ties().float()
    target = torch.tensor([0, 2, 4])
    boxes = [torch.tensor([[1.0, 2.0, 9.5, 12.0]])] * 3
    cuda_model = copy.deepcopy(tiny_cnn).cuda()
    for function, substrate in [(metrics.deletion_curve, "zeros"), (metrics.insertion_curve, "blur")]:
        cpu = function(tiny_cnn, x, saliency, target, step=10, substrate=substrate)
        gpu = function(cuda_model, x.cuda(), saliency.cuda(), target.cuda(), step=10, substrate=substrate)
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-5)
    cpu_pair = metrics.confidence(tiny_cnn, x, saliency, target)
    gpu_pair = metrics.confidence(cuda_model, x.cuda(), saliency.cuda(), target.cuda())
    for cpu_values, gpu_values in zip(cpu_pair, gpu_pair):
        torch.testing.assert_close(gpu_values.cpu(), cpu_values, rtol=0, atol=1e-5)
    torch.testing.assert_close(metrics.energy_pointing_game(saliency.cuda(), [b.cuda() for b in boxes]).cpu(),
                               metrics.energy_pointing_game(saliency, boxes), rtol=0, atol=1e-6)


def test_curves_under_autocast_keep_the_inputs_dtype(tiny_cnn) -> None:
    """Under bf16 autocast the blurred substrate comes out in bf16; the frames stay in x's dtype (they did
    when torch.where promoted them, before the frames were built in reused buffers)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    saliency = torch.rand(2, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        curve = metrics.insertion_curve(tiny_cnn, x, saliency, 1, step=32, substrate="blur")
    assert curve.shape == (2, 9) and torch.isfinite(curve).all()
