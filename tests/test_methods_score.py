"""Score-CAM, SS-CAM and IS-CAM against plain per-channel float64 loops, TorchCAM, and themselves
(batched vs single image, chunk sizes, deduplication)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from conftest import DeadCNN, Perturb, iscam_inputs, score_reference, scorecam_inputs

from iscam import methods
from iscam.batching import ChunkBuffer
from iscam.methods.score import iscam_coefficients, sscam_noise_seed


def sscam_inputs(n: int, sigma: float, seed: int, noise: str, masks_seen: dict[int, Tensor]) -> Perturb:
    """Noise of channel k from its own seeded generator; a channel whose mask equals an earlier one's
    uses that channel's noise (the documented dedup-independence rule)."""

    def perturb(image: Tensor, mask: Tensor, k: int) -> list[Tensor]:
        source = next((j for j, seen in sorted(masks_seen.items()) if j < k and torch.equal(seen, mask)), k)
        masks_seen[k] = mask
        generator = torch.Generator().manual_seed(sscam_noise_seed(seed, source))
        draws = torch.randn((n, *image.shape), generator=generator).to(image.dtype)
        masked = image * mask
        if noise == "sigma":
            std = sigma
        else:
            std = (sigma / (masked.max() - masked.min())) ** 2
        return [masked + std * draws[i] for i in range(n)]

    return perturb


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def tiny64() -> nn.Module:
    from conftest import TinyCNN

    torch.manual_seed(0)
    return TinyCNN().eval().double()


@pytest.fixture(scope="module")
def resnet64() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval().double()


def tiny_input(batch: int = 2, size: int = 16) -> Tensor:
    return torch.randn(batch, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


# ResNet-18 at 16x16: "layer1" gives 64 channels of 4x4 maps, small enough for a per-channel float64 loop.
RESNET_LAYER, RESNET_SIZE = "layer1", 16


# ---------------------------------------------------------------------------- against the reference loop
@pytest.mark.parametrize("schedule", ["authors", "paper", "linear"])
def test_iscam_matches_reference_loop_on_tiny_cnn(tiny64: nn.Module, schedule: str) -> None:
    x = tiny_input()
    with methods.ISCAM(tiny64, "features.4", N=10, schedule=schedule) as cam:
        weights = cam.channel_weights(x)
        maps = cam(x)
    ref_weights, ref_maps = score_reference(tiny64, tiny64.features[4], x, iscam_inputs(schedule, 10))
    assert weights.dtype == torch.float64
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=1e-6)
    torch.testing.assert_close(maps, ref_maps.float(), rtol=0, atol=1e-5)


def test_scorecam_matches_reference_loop_on_tiny_cnn(tiny64: nn.Module) -> None:
    x = tiny_input()
    with methods.ScoreCAM(tiny64, "features.4") as cam:
        weights, maps = cam.channel_weights(x), cam(x)
    ref_weights, ref_maps = score_reference(tiny64, tiny64.features[4], x, scorecam_inputs)
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=1e-6)
    torch.testing.assert_close(maps, ref_maps.float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("noise", ["sigma", "authors"])
def test_sscam_matches_reference_loop_on_tiny_cnn(tiny64: nn.Module, noise: str) -> None:
    x = tiny_input()
    with methods.SSCAM(tiny64, "features.4", N=5, sigma=2.0, noise=noise, seed=3) as cam:
        weights, maps = cam.channel_weights(x), cam(x)
    ref_weights = torch.zeros_like(weights)
    ref_maps = torch.zeros_like(maps)
    for b in range(x.shape[0]):  # masks_seen is per image
        w, m = score_reference(tiny64, tiny64.features[4], x[b : b + 1], sscam_inputs(5, 2.0, 3, noise, {}))
        ref_weights[b], ref_maps[b] = w[0], m[0].float()
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=1e-6)
    torch.testing.assert_close(maps, ref_maps, rtol=0, atol=1e-5)


def test_scorecam_and_iscam_match_reference_loop_on_resnet18(resnet64: nn.Module) -> None:
    x = tiny_input(batch=1, size=RESNET_SIZE)
    layer = resnet64.get_submodule(RESNET_LAYER)
    with methods.ScoreCAM(resnet64, RESNET_LAYER) as cam:
        weights, maps = cam.channel_weights(x), cam(x)
    ref_weights, ref_maps = score_reference(resnet64, layer, x, scorecam_inputs)
    assert (ref_weights > 0).sum() > 10  # the check is not vacuous
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=1e-6)
    torch.testing.assert_close(maps, ref_maps.float(), rtol=0, atol=1e-5)
    for schedule in ("authors", "paper", "linear"):
        with methods.ISCAM(resnet64, RESNET_LAYER, N=2, schedule=schedule) as cam:
            weights, maps = cam.channel_weights(x), cam(x)
        ref_weights, ref_maps = score_reference(resnet64, layer, x, iscam_inputs(schedule, 2))
        torch.testing.assert_close(weights, ref_weights, rtol=0, atol=1e-6)
        torch.testing.assert_close(maps, ref_maps.float(), rtol=0, atol=1e-5)


def test_sscam_matches_reference_loop_on_resnet18(resnet64: nn.Module) -> None:
    x = tiny_input(batch=1, size=RESNET_SIZE)
    with methods.SSCAM(resnet64, RESNET_LAYER, N=2, sigma=0.5, seed=11) as cam:
        weights, maps = cam.channel_weights(x), cam(x)
    layer = resnet64.get_submodule(RESNET_LAYER)
    ref_weights, ref_maps = score_reference(resnet64, layer, x, sscam_inputs(2, 0.5, 11, "sigma", {}))
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=1e-6)
    torch.testing.assert_close(maps, ref_maps.float(), rtol=0, atol=1e-5)


def test_iscam_coefficients_by_hand() -> None:
    assert iscam_coefficients(10, "authors") == pytest.approx(
        [0.1, 0.3, 0.6, 1.0, 1.5, 2.1, 2.8, 3.6, 4.5, 5.5]
    )
    assert iscam_coefficients(10, "paper") == pytest.approx(
        [0.0, 0.1, 0.3, 0.6, 1.0, 1.5, 2.1, 2.8, 3.6, 4.5]
    )
    assert iscam_coefficients(4, "linear") == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_sscam_without_noise_is_scorecam(tiny64: nn.Module) -> None:
    x = tiny_input()
    with (
        methods.SSCAM(tiny64, "features.4", N=3, sigma=0.0) as smooth,
        methods.ScoreCAM(tiny64, "features.4") as plain,
    ):
        torch.testing.assert_close(smooth.channel_weights(x), plain.channel_weights(x), rtol=0, atol=1e-12)


def test_sscam_noise_is_the_same_drawn_by_one_thread_or_several(tiny64: nn.Module) -> None:
    """The channels' draws are split over torch's intra-op threads; each seeds its own generator."""
    from iscam.methods import score

    x = tiny_input()
    threads = torch.get_num_threads()
    maps = {}
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            with methods.SSCAM(tiny64, "features.4", N=3, seed=7, batch_size=16) as cam:
                maps[count] = cam.channel_weights(x)
            if count == 3:
                assert score._DRAW_POOL is not None and score._DRAW_POOL[1] >= 2
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(maps[1], maps[3]) and maps[1].abs().sum() > 0


def test_iscam_with_one_linear_step_is_scorecam(tiny64: nn.Module) -> None:
    x = tiny_input()
    integrated = methods.ISCAM(tiny64, "features.4", N=1, schedule="linear")
    with integrated, methods.ScoreCAM(tiny64, "features.4") as plain:
        torch.testing.assert_close(integrated(x), plain(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------- TorchCAM 0.5.0
def torchcam_weights(
    extractor_cls: type, model: nn.Module, layer: str, x: Tensor, **kwargs: object
) -> Tensor:
    with extractor_cls(model, layer, input_shape=tuple(x.shape[1:]), **kwargs) as extractor:
        with torch.no_grad():
            logits = model(x)
        return extractor._get_weights(logits.argmax(1).tolist(), logits)[0]


@pytest.mark.parametrize("which", ["scorecam", "iscam"])
def test_torchcam_protocol_equals_torchcam_weights(resnet64: nn.Module, which: str) -> None:
    from torchcam.methods import ISCAM as TorchISCAM
    from torchcam.methods import ScoreCAM as TorchScoreCAM

    x = tiny_input(batch=1, size=RESNET_SIZE)
    if which == "scorecam":
        expected = torchcam_weights(TorchScoreCAM, resnet64, RESNET_LAYER, x, batch_size=32)
        cam = methods.ScoreCAM(resnet64, RESNET_LAYER, protocol="torchcam", batch_size=50)
    else:
        expected = torchcam_weights(TorchISCAM, resnet64, RESNET_LAYER, x, batch_size=32, num_samples=3)
        cam = methods.ISCAM(resnet64, RESNET_LAYER, N=3, protocol="torchcam", batch_size=50)
    with cam:
        weights = cam.channel_weights(x)
        maps = cam(x)
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-5)
    assert weights.sum(1).sub(1).abs().max() < 1e-9  # a softmax across channels
    assert maps.shape == (1, RESNET_SIZE, RESNET_SIZE) and maps.min() >= 0 and maps.max() <= 1


def test_torchcam_protocol_map_is_torchcams_map_upsampled(tiny64: nn.Module) -> None:
    from torchcam.methods import ScoreCAM as TorchScoreCAM

    x = tiny_input()
    with TorchScoreCAM(tiny64, "features.4", input_shape=(3, 16, 16)) as extractor:
        with torch.no_grad():
            logits = tiny64(x)
        expected = extractor(logits.argmax(1).tolist(), logits)[0]
    expected = F.interpolate(expected[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    with methods.ScoreCAM(tiny64, "features.4", protocol="torchcam") as cam:
        torch.testing.assert_close(cam(x), expected.float(), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- batching and chunking
@pytest.mark.parametrize(
    "make",
    [
        lambda m: methods.ScoreCAM(m, "features.4"),
        lambda m: methods.ISCAM(m, "features.4", N=4),
        lambda m: methods.SSCAM(m, "features.4", N=4, seed=5),
        lambda m: methods.SSCAM(m, "features.4", N=4, noise="authors", protocol="torchcam"),
    ],
    ids=["scorecam", "iscam", "sscam", "sscam-torchcam"],
)
def test_batched_equals_single_and_chunk_sizes_agree(tiny_cnn: nn.Module, make: Callable) -> None:
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 4, 2])
    with make(tiny_cnn) as cam:
        batched = cam(x, target)
        weights = cam.channel_weights(x, target)
        singles = torch.cat([cam(x[i : i + 1], int(target[i])) for i in range(3)])
        torch.testing.assert_close(batched, singles, rtol=0, atol=1e-5)
        for size in (1, 3, 7, 1000):
            cam.batch_size = size
            torch.testing.assert_close(cam.channel_weights(x, target), weights, rtol=0, atol=1e-6)
            torch.testing.assert_close(cam(x, target), batched, rtol=0, atol=1e-5)


def test_sscam_is_repeatable_and_seed_dependent(tiny_cnn: nn.Module) -> None:
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with (
        methods.SSCAM(tiny_cnn, "features.4", N=3, seed=1) as first,
        methods.SSCAM(tiny_cnn, "features.4", N=3, seed=1) as again,
        methods.SSCAM(tiny_cnn, "features.4", N=3, seed=2) as other,
    ):
        a, b, c = first.channel_weights(x), again.channel_weights(x), other.channel_weights(x)
        assert torch.equal(a, b)
        assert torch.equal(first.channel_weights(x), a)  # calls do not consume randomness
        assert not torch.equal(a, c)


def test_forward_count_counts_clean_and_masked_images(tiny_cnn: nn.Module) -> None:
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with methods.ISCAM(tiny_cnn, "features.4", N=4) as cam:
        cam(x)
        stats = dict(cam.last_stats)
        scored = stats["channels"] - stats["skipped_constant"] - stats["deduplicated"]
        assert stats["channels"] == 2 * 6
        assert stats["forwards"] == 2 + 4 * scored
        assert cam.forward_count == stats["forwards"]
        cam(x[:1])
        assert cam.forward_count == stats["forwards"] + cam.last_stats["forwards"]


# ---------------------------------------------------------------------------- skipping and deduplication
class ExtendedLayer(nn.Module):
    """TinyCNN whose target layer ("mix") holds its 6 feature maps followed by the channels ``extra(maps)``."""

    def __init__(self, extra: Callable[[Tensor], list[Tensor]]) -> None:
        super().__init__()
        from conftest import TinyCNN

        torch.manual_seed(0)
        self.body = TinyCNN().features
        self.extra = extra
        self.mix = nn.Identity()
        self.head = nn.Linear(6 + len(extra(torch.zeros(1, 6, 8, 8))), 5)

    def forward(self, x: Tensor) -> Tensor:
        a = self.body(x)
        a = torch.cat([a, *self.extra(a)], dim=1)
        return self.head(self.mix(a).mean(dim=(2, 3)))


def redundant_channels(a: Tensor) -> list[Tensor]:
    """Channels 0 and 1 again, an all-zero channel and a constant one."""
    return [a[:, :1], a[:, 1:2], torch.zeros_like(a[:, :1]), torch.full_like(a[:, :1], 3.0)]


def proportional_channels(a: Tensor) -> list[Tensor]:
    """Channel 0 times 4, and two pairs of one-hot maps of different heights: maps that differ only by a
    positive scale, as a sparse ReLU6 layer produces (the Coral MobileNetV2's features.18)."""
    # two positions in the same half of the map: equal sums, so a sum fingerprint cannot tell them apart
    first, second = torch.zeros_like(a[:, :1]), torch.zeros_like(a[:, :1])
    first[..., 1, 2], second[..., 2, 1] = 1.0, 1.0
    return [4.0 * a[:, :1], 2.7 * first, 0.3 * first, 1.5 * second, 0.9 * second]


@pytest.mark.parametrize(
    "make",
    [
        lambda m, d: methods.ScoreCAM(m, "mix", dedup=d),
        lambda m, d: methods.ISCAM(m, "mix", N=3, dedup=d),
        lambda m, d: methods.SSCAM(m, "mix", N=3, seed=4, dedup=d),
        lambda m, d: methods.ISCAM(m, "mix", N=3, dedup=d, protocol="torchcam"),
    ],
    ids=["scorecam", "iscam", "sscam", "iscam-torchcam"],
)
def test_dedup_and_skipping_change_cost_not_results(make: Callable) -> None:
    model = ExtendedLayer(redundant_channels).eval().double()
    x = tiny_input(batch=2)
    with make(model, True) as fast, make(model, False) as slow:
        torch.testing.assert_close(fast.channel_weights(x), slow.channel_weights(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(fast(x), slow(x), rtol=0, atol=0)
        assert fast.forward_count < slow.forward_count
        assert fast.last_stats["deduplicated"] >= 2 * 2  # the two repeated channels of both images
        weights = fast.channel_weights(x)
        if fast.protocol == "authors":
            assert fast.last_stats["skipped_constant"] == 2 * 2
            assert torch.all(weights[:, 8:] == 0)
        else:  # TorchCAM scores constant channels (as an all-zero mask); they share one forward
            assert fast.last_stats["skipped_constant"] == 0
            torch.testing.assert_close(weights[:, 8], weights[:, 9], rtol=0, atol=0)
        torch.testing.assert_close(weights[:, 6:8], weights[:, 0:2], rtol=0, atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda m, d: methods.ScoreCAM(m, "mix", dedup=d),
        lambda m, d: methods.ISCAM(m, "mix", N=3, dedup=d),
        lambda m, d: methods.SSCAM(m, "mix", N=3, seed=4, dedup=d),
    ],
    ids=["scorecam", "iscam", "sscam"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dedup_merges_proportional_maps_at_rounding_cost(make: Callable, dtype: torch.dtype) -> None:
    model = ExtendedLayer(proportional_channels).eval().to(dtype)
    x = tiny_input(batch=2).to(dtype)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    with make(model, True) as fast, make(model, False) as slow:
        weights = fast.channel_weights(x)
        # the scaled copy of channel 0 and the second map of each one-hot pair are not forwarded
        assert fast.last_stats["deduplicated"] == 2 * 3
        torch.testing.assert_close(weights, slow.channel_weights(x), rtol=0, atol=tolerance)
        torch.testing.assert_close(weights[:, 6], weights[:, 0], rtol=0, atol=0)
        torch.testing.assert_close(weights[:, 8], weights[:, 7], rtol=0, atol=0)
        torch.testing.assert_close(weights[:, 10], weights[:, 9], rtol=0, atol=0)
        assert not torch.equal(weights[:, 9], weights[:, 7])
        torch.testing.assert_close(fast(x), slow(x), rtol=0, atol=tolerance)
        assert slow.forward_count - fast.forward_count == 2 * (2 * 3) * fast._steps  # two calls


def test_all_constant_activation_gives_an_all_zero_map() -> None:
    model = DeadCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    for cam in (methods.ScoreCAM(model, "features"), methods.ISCAM(model, "features", N=2)):
        with cam:
            saliency = cam(x)
            assert torch.equal(saliency, torch.zeros(2, 8, 8))
            assert cam.last_stats["skipped_constant"] == 8 and cam.last_stats["forwards"] == 2


def test_out_of_memory_halves_the_batch_and_keeps_the_result(tiny_cnn: nn.Module) -> None:
    """A CUDA out-of-memory error (simulated on the CPU) halves the chunk and retries the same rows."""

    class Fussy(nn.Module):
        def __init__(self, model: nn.Module, limit: int) -> None:
            super().__init__()
            self.model, self.limit, self.refused = model, limit, 0

        def forward(self, x: Tensor) -> Tensor:
            if x.shape[0] > self.limit:
                self.refused += 1
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return self.model(x)

    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with methods.ISCAM(tiny_cnn, "features.4", N=5) as plain:
        expected = plain.channel_weights(x)
    fussy = Fussy(tiny_cnn, limit=7)
    with methods.ISCAM(fussy, "model.features.4", N=5, batch_size=64) as cam:
        torch.testing.assert_close(cam.channel_weights(x), expected, rtol=0, atol=1e-6)
        assert cam.batch_size == 4 and fussy.refused == 4  # 64 -> 32 -> 16 -> 8 -> 4
        assert cam.forward_count == plain.forward_count  # refused chunks are not counted


# ---------------------------------------------------------------------------- reused chunk buffers
def fresh_nan_rows(self: ChunkBuffer, rows: int) -> Tensor:
    """``ChunkBuffer.take`` without reuse: a new tensor per chunk, full of NaN, so a stale read shows."""
    return torch.full((rows, *self.shape), float("nan"), dtype=self.dtype, device=self.device).contiguous(
        memory_format=self.memory_format
    )


PERTURBERS = {
    "scorecam": lambda m: methods.ScoreCAM(m, "features.4"),
    "scorecam-torchcam": lambda m: methods.ScoreCAM(m, "features.4", protocol="torchcam"),
    "iscam": lambda m: methods.ISCAM(m, "features.4", N=4),
    "iscam-torchcam": lambda m: methods.ISCAM(m, "features.4", N=3, protocol="torchcam"),
    "sscam": lambda m: methods.SSCAM(m, "features.4", N=3, seed=5),
    "sscam-authors": lambda m: methods.SSCAM(m, "features.4", N=3, noise="authors"),
    "sscam-torchcam": lambda m: methods.SSCAM(m, "features.4", N=3, protocol="torchcam"),
}


def stacked_noise(cam: methods.SSCAM, channels: list[int], shape: tuple[int, ...], like: Tensor) -> Tensor:
    """``[P, N, *shape]``: each listed channel's N draws from its own seeded generator, stacked."""
    draws = [torch.randn((cam.N, *shape), generator=torch.Generator().manual_seed(sscam_noise_seed(cam.seed, c)))
             for c in channels]
    return torch.stack(draws).to(like.dtype)


def allocating_perturb(cam: methods.CAM, images: Tensor, masks: Tensor, rows: Tensor, steps: Tensor,
                       channels: list[int]) -> Tensor:
    """The perturbed inputs as the Score family computed them before the buffers, one fresh tensor per op
    (SS-CAM's noise: every pair's draws stacked, then gathered by row and step)."""
    height, width = images.shape[-2:]
    if isinstance(cam, methods.ISCAM):
        scales = torch.tensor(cam.coefficients, dtype=images.dtype)
        return (images * masks)[rows] * scales[steps].view(-1, 1, 1, 1)
    if isinstance(cam, methods.SSCAM):
        if cam.protocol == "torchcam":
            noise = stacked_noise(cam, channels, (1, height, width), images)[rows, steps]
            return (masks[rows] + cam.sigma * noise) * images[rows]
        masked = (images * masks)[rows]
        noise = stacked_noise(cam, channels, (3, height, width), images)[rows, steps]
        if cam.noise == "sigma":
            return masked + cam.sigma * noise
        span = masked.amax(dim=(1, 2, 3)) - masked.amin(dim=(1, 2, 3))
        std = torch.where(span > 0, (cam.sigma / torch.where(span > 0, span, 1.0)) ** 2, 0.0)
        return masked + std.view(-1, 1, 1, 1) * noise
    return (images * masks)[rows]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(PERTURBERS))
def test_in_place_perturbation_equals_the_allocating_expressions(
    tiny_cnn: nn.Module, name: str, dtype: torch.dtype
) -> None:
    """Rows filled in place hold bit for bit what ``(X * M)[rows] ...`` computed, in both dtypes, for chunks
    cut anywhere in the (pair, step) rows: a pair whole, or split between two chunks."""
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(4, 3, 8, 8, generator=generator).to(dtype)
    masks = torch.rand(4, 1, 8, 8, generator=generator).to(dtype)
    masks[2] = 0.0  # an all-zero mask: zero span, no noise with noise="authors"
    channels = [4, 1, 3, 4]  # the same channel twice: two images of a group
    with PERTURBERS[name](tiny_cnn) as cam:
        steps_per_pair = getattr(cam, "N", 1)
        total = len(channels) * steps_per_pair
        for cuts in ([0, total], [0, 2, 7, total], [0, 1, 3, 5, 9, total], [0, total - 1, total]):
            cuts = sorted({min(cut, total) for cut in cuts})
            for start, stop in zip(cuts, cuts[1:]):
                index = torch.arange(start, stop)
                first, last = start // steps_per_pair, (stop - 1) // steps_per_pair + 1
                rows, steps = index // steps_per_pair - first, index % steps_per_pair
                chunk = (images[first:last], masks[first:last], channels[first:last])
                expected = allocating_perturb(cam, chunk[0], chunk[1], rows, steps, chunk[2])
                buffered = cam._perturb(chunk[0][rows], chunk[1][rows], rows, steps, chunk[2],
                                        start % steps_per_pair)
                assert buffered.dtype == dtype and torch.equal(buffered, expected), (cuts, start)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(PERTURBERS))
def test_reused_buffers_give_the_results_of_fresh_ones(
    tiny_cnn: nn.Module, name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Maps and weights are bit-identical with reused chunk buffers and with a fresh NaN-filled tensor per
    chunk, at every chunk size (the last chunk of a call is shorter and reuses the first chunk's rows)."""
    model = copy.deepcopy(tiny_cnn).to(dtype)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    target = torch.tensor([0, 4, 2])
    results = {}
    for reuse in (True, False):
        with monkeypatch.context() as patch:
            if not reuse:
                patch.setattr(ChunkBuffer, "take", fresh_nan_rows)
            with PERTURBERS[name](model) as cam:
                for size in (1, 3, 7, 1000):
                    cam.batch_size = size
                    results[reuse, size] = (cam(x, target), cam.channel_weights(x, target))
    for size in (1, 3, 7, 1000):
        (map_reused, weights_reused), (map_fresh, weights_fresh) = results[True, size], results[False, size]
        assert weights_reused.dtype == dtype and torch.isfinite(weights_reused).all()
        assert torch.equal(weights_reused, weights_fresh) and torch.equal(map_reused, map_fresh)
        torch.testing.assert_close(weights_reused, results[True, 1000][1], rtol=0, atol=1e-6)  # chunk parity


class RecordingModel(nn.Module):
    """Forwards to ``model``; keeps a copy of every input batch it saw and whether it was channels-last."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.inputs: list[Tensor] = []
        self.channels_last: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.inputs.append(x.detach().clone())
        self.channels_last.append(x.is_contiguous(memory_format=torch.channels_last))
        return self.model(x)


def test_channels_last_chunks_are_filled_in_the_models_layout(tiny_cnn: nn.Module) -> None:
    """With ``channels_last`` the buffer itself is channels-last and holds the same values as without."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    recorders = {}
    for channels_last in (False, True):
        recorders[channels_last] = RecordingModel(copy.deepcopy(tiny_cnn))
        cam = methods.ISCAM(recorders[channels_last], "model.features.4", N=3, batch_size=5,
                            channels_last=channels_last)
        with cam:
            cam(x)
    plain, laid_out = recorders[False], recorders[True]
    assert len(plain.inputs) == len(laid_out.inputs) > 3  # the clean forward, then the chunks
    assert all(torch.equal(a, b) for a, b in zip(plain.inputs, laid_out.inputs))
    assert all(laid_out.channels_last[1:]) and not any(plain.channels_last[1:])
