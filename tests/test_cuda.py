"""CUDA agreement: every method gives the CPU's maps on a GPU, and bf16 maps keep the fp32 ranking.

Skipped without a CUDA device (CI has none); run on a lent GPU with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torchvision

from iscam import methods, metrics, models
from iscam.data import ManifestDataset, iter_batches, sample_manifest

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 would make CUDA float32 differ from the CPU by ~1e-3: compare true float32 arithmetic."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def resnet_pair():
    torch.manual_seed(0)
    cpu = torchvision.models.resnet18(weights=None).eval().double()
    return cpu, copy.deepcopy(cpu).float().cuda()


# SS-CAM draws its noise on the device (CPU and CUDA generators differ), so it is checked separately.
DEVICE_INDEPENDENT = [name for name in (*methods.METHOD_NAMES, "random") if name != "sscam"]


@pytest.mark.parametrize("name", DEVICE_INDEPENDENT)
def test_cuda_float32_matches_cpu_float64(resnet_pair, name: str) -> None:
    cpu_model, cuda_model = resnet_pair
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = {"N": 3} if name in ("iscam", "sscam") else {"n_samples": 3} if name == "smoothgradcampp" else {}
    with methods.get(name, cpu_model, "layer3", **params) as cam:
        reference = cam(x, target=[3, 7])
    with methods.get(name, cuda_model, "layer3", **params) as cam:
        result = cam(x.float().cuda(), target=torch.tensor([3, 7], device="cuda"))
    assert result.device.type == "cuda" and result.dtype == torch.float32
    torch.testing.assert_close(result.cpu(), reference.float(), atol=1e-4, rtol=0)


def test_cuda_sscam_is_repeatable_and_chunk_independent(resnet_pair) -> None:
    _, cuda_model = resnet_pair
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3)).cuda()
    with methods.SSCAM(cuda_model, "layer3", N=4, batch_size=5) as cam:
        first = cam.channel_weights(x, target=1)
    with methods.SSCAM(cuda_model, "layer3", N=4, batch_size=64) as cam:
        second = cam.channel_weights(x, target=1)
    torch.testing.assert_close(first, second, atol=1e-6, rtol=0)
    with methods.SSCAM(cuda_model, "layer3", N=4, sigma=0.0) as cam:
        noiseless = cam.channel_weights(x, target=1)
    with methods.ScoreCAM(cuda_model, "layer3") as cam:
        torch.testing.assert_close(noiseless, cam.channel_weights(x, target=1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["scorecam", "iscam"])
def test_cuda_channel_weights_match_cpu(resnet_pair, name: str) -> None:
    cpu_model, cuda_model = resnet_pair
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    params = {} if name == "scorecam" else {"N": 4}
    with methods.get(name, cpu_model, "layer3", **params) as cam:
        reference = cam.channel_weights(x, target=5)
    with methods.get(name, cuda_model, "layer3", batch_size=7, **params) as cam:
        result = cam.channel_weights(x.float().cuda(), target=5)
    torch.testing.assert_close(result.double().cpu(), reference, atol=1e-5, rtol=0)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float(ra @ rb / (ra.norm() * rb.norm()))


@pytest.mark.skipif(not os.environ.get("ISCAM_DATA"), reason="needs the data root with the Coral model")
# bf16 Score-CAM misses the AUC bar on the Coral model (max |dAUC| 0.011 on 8 images, H200): its single
# forward per channel does not average bfloat16's ~3-digit probabilities the way IS-CAM's N steps do.
@pytest.mark.parametrize(("name", "amp"), [("iscam", "bf16"), ("scorecam", "fp16"), ("iscam", "fp16")])
def test_low_precision_maps_keep_fp32_ranking_and_aucs(name: str, amp: str) -> None:
    """Issue 7's fidelity bar on real data: Spearman >= 0.99 and AUC changes <= 0.005."""
    loaded = models.load("mobilenet_v2_coral", device="cuda")
    dataset = ManifestDataset(sample_manifest(), loaded.preprocess, limit=4)
    x = next(iter(iter_batches(dataset, batch_size=4))).x.cuda()
    with torch.no_grad():
        target = loaded.model(x).argmax(1)
    with methods.get(name, loaded.model) as cam:
        fp32 = cam(x, target)
    with methods.get(name, loaded.model, amp=amp, channels_last=True) as cam:
        low = cam(x, target)
    loaded.model.to(memory_format=torch.contiguous_format)
    for reference, candidate in zip(fp32, low):
        assert _spearman(reference, candidate) >= 0.99
    for curve in (metrics.insertion_curve, metrics.deletion_curve):
        change = metrics.auc(curve(loaded.model, x, fp32, target)) - metrics.auc(curve(loaded.model, x, low, target))
        assert float(change.abs().max()) <= 0.005


def test_cuda_road_curve_matches_cpu(resnet_pair) -> None:
    """ROAD imputes on the CPU and draws its noise from CPU generators: the GPU curve is the CPU's."""
    cpu_model, cuda_model = resnet_pair
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    saliency = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(6))
    options = {"order": "lerf", "fractions": (0.2, 0.6), "seed": [1, 2]}
    reference = metrics.road_curve(cpu_model, x, saliency.double(), torch.tensor([3, 7]), **options)
    result = metrics.road_curve(cuda_model, x.float().cuda(), saliency.cuda(),
                                torch.tensor([3, 7], device="cuda"), **options)
    assert result.device.type == "cuda" and result.shape == (2, 2)
    torch.testing.assert_close(result.cpu().double(), reference, atol=1e-5, rtol=0)
