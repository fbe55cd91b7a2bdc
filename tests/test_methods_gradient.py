"""Grad-CAM, Grad-CAM++ and Smooth Grad-CAM++ against TorchCAM, hand-computed cases and autograd loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from conftest import torchcam_gradcam

from iscam import methods
from iscam.methods.gradient import gradcampp_alpha


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


def images(batch: int = 2, size: int = 64, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7), dtype=dtype)


def reference_gradients(model: nn.Module, layer: nn.Module, x: Tensor, target: Tensor | None = None):
    """Activation and gradient of the target logit: a full backward with ``retain_grad``, image by image."""
    activations, gradients, labels = [], [], []
    for b in range(x.shape[0]):
        store: list[Tensor] = []

        def keep(_m: nn.Module, _i: object, out: Tensor, store: list[Tensor] = store) -> None:
            out.retain_grad()
            store.append(out)

        handle = layer.register_forward_hook(keep)
        inp = x[b : b + 1].clone().requires_grad_(True)
        logits = model(inp)
        handle.remove()
        c = int(logits.argmax(1)) if target is None else int(target[b])
        logits[0, c].backward()
        activations.append(store[0].detach()[0])
        gradients.append(store[0].grad[0])
        labels.append(c)
    return torch.stack(activations), torch.stack(gradients), labels


def to_map(weights: Tensor, activation: Tensor, size: int) -> Tensor:
    cam = torch.relu((weights[:, :, None, None] * activation).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    low = cam.amin(dim=(1, 2), keepdim=True)
    high = cam.amax(dim=(1, 2), keepdim=True)
    return torch.where(high > low, (cam - low) / (high - low), torch.zeros_like(cam))


def test_gradcam_agrees_with_torchcam(resnet: nn.Module) -> None:
    x = images()
    theirs = torchcam_gradcam(resnet, "layer3", x)
    with methods.GradCAM(resnet, "layer3") as cam:
        ours = cam(x)
    assert (ours - theirs).abs().max() <= 1e-4


def test_gradcam_and_gradcampp_match_autograd_reference(resnet: nn.Module) -> None:
    model = resnet.double()
    try:
        x = images(dtype=torch.float64)
        target = torch.tensor([3, 8])
        activation, gradient, _ = reference_gradients(model, model.layer3, x, target)
        with methods.GradCAM(model, "layer3") as cam:
            torch.testing.assert_close(
                cam(x, target), to_map(gradient.mean((2, 3)), activation, 64).float(), rtol=0, atol=1e-5
            )
        # Grad-CAM++ written out per channel: alpha = g^2 / (2 g^2 + sum(A) g^3), w = sum alpha relu(g)
        weights = torch.zeros(activation.shape[:2], dtype=torch.float64)
        for b in range(2):
            for k in range(activation.shape[1]):
                g, total = gradient[b, k], activation[b, k].sum()
                denominator = 2 * g**2 + total * g**3
                alpha = g**2 / torch.where(denominator != 0, denominator, torch.ones_like(denominator))
                weights[b, k] = (alpha * torch.relu(g)).sum()
        with methods.GradCAMpp(model, "layer3") as cam:
            torch.testing.assert_close(
                cam(x, target), to_map(weights, activation, 64).float(), rtol=0, atol=1e-5
            )
    finally:
        resnet.float()


def test_gradcampp_alpha_by_hand() -> None:
    activation = torch.tensor([[[[1.0, -3.0]]]])  # sum over the map = -2
    grad = torch.tensor([[[[1.0, 0.0]]]])
    # pixel 0: g=1 -> denominator 2*1 + (-2)*1 = 0 -> replaced by 1 -> alpha = 1; pixel 1: g=0 -> alpha = 0
    torch.testing.assert_close(gradcampp_alpha(activation, grad**2, grad**3), torch.tensor([[[[1.0, 0.0]]]]))
    grad = torch.tensor([[[[2.0, -1.0]]]])
    # pixel 0: 4 / (8 + (-2)(8)) = -0.5; pixel 1: 1 / (2 + (-2)(-1)) = 0.25
    torch.testing.assert_close(
        gradcampp_alpha(activation, grad**2, grad**3), torch.tensor([[[[-0.5, 0.25]]]])
    )


def test_smooth_gradcampp_matches_a_per_sample_loop(resnet: nn.Module) -> None:
    model = resnet.double()
    try:
        x = images(batch=2, size=32, dtype=torch.float64)
        n, std, seed = 3, 0.5, 9
        # the documented noise: float32 draws from a CPU generator seeded with `seed`, whatever x's dtype
        noise = torch.randn((n, 3, 32, 32), generator=torch.Generator().manual_seed(seed)).double() * std
        clean_activation, _, labels = reference_gradients(model, model.layer3, x)
        weights = torch.zeros(clean_activation.shape[:2], dtype=torch.float64)
        for b in range(2):
            grads = []
            for j in range(n):
                noisy = (x[b] + noise[j])[None]
                grads.append(reference_gradients(model, model.layer3, noisy, torch.tensor([labels[b]]))[1][0])
            g1, g2, g3 = (sum(g**p for g in grads) / n for p in (1, 2, 3))
            alpha = gradcampp_alpha(clean_activation[b], g2, g3)
            weights[b] = (alpha * torch.relu(g1)).sum((1, 2))
        expected = to_map(weights, clean_activation, 32).float()
        with methods.SmoothGradCAMpp(
            model, "layer3", n_samples=n, noise_std=std, seed=seed, batch_size=4
        ) as cam:
            torch.testing.assert_close(cam(x), expected, rtol=0, atol=1e-5)
            assert cam.forward_count == 2 + 2 * n
    finally:
        resnet.float()


def test_smooth_gradcampp_without_noise_is_gradcampp(resnet: nn.Module) -> None:
    x = images()
    smooth = methods.SmoothGradCAMpp(resnet, "layer3", n_samples=1, noise_std=0.0)
    with smooth, methods.GradCAMpp(resnet, "layer3") as plain:
        torch.testing.assert_close(smooth(x), plain(x), rtol=0, atol=1e-5)


def test_smooth_gradcampp_is_seeded_batch_and_chunk_independent(resnet: nn.Module) -> None:
    x = images(batch=3, size=32)
    with methods.SmoothGradCAMpp(resnet, "layer3", n_samples=4, seed=1, batch_size=5) as cam:
        batched = cam(x)
        torch.testing.assert_close(cam(x), batched, rtol=0, atol=0)
        singles = torch.cat([cam(x[i : i + 1]) for i in range(3)])
        torch.testing.assert_close(singles, batched, rtol=0, atol=1e-5)
        cam.batch_size = 12
        torch.testing.assert_close(cam(x), batched, rtol=0, atol=1e-5)
    with methods.SmoothGradCAMpp(resnet, "layer3", n_samples=4, seed=2) as other:
        assert not torch.equal(other(x), batched)


def test_noisy_argmax_option_backpropagates_each_noisy_copys_top_class(resnet: nn.Module) -> None:
    x = images(batch=1, size=32)
    with methods.SmoothGradCAMpp(resnet, "layer3", n_samples=2, noise_std=0.0, noisy_target="argmax") as cam:
        argmax_map = cam(x)
    with methods.SmoothGradCAMpp(resnet, "layer3", n_samples=2, noise_std=0.0) as cam:
        # without noise every copy's top class is the clean argmax, so both readings agree
        torch.testing.assert_close(cam(x), argmax_map, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [methods.GradCAM, methods.GradCAMpp, methods.SmoothGradCAMpp])
def test_gradient_methods_work_with_frozen_weights_and_in_no_grad(resnet: nn.Module, cls: type) -> None:
    x = images(batch=1, size=32)
    resnet.zero_grad(set_to_none=True)  # the reference loops above back-propagate into the weights
    with cls(resnet, "layer3") as cam:
        expected = cam(x)
    flags = [p.requires_grad for p in resnet.parameters()]
    resnet.requires_grad_(False)
    try:
        with cls(resnet, "layer3") as cam, torch.no_grad():
            torch.testing.assert_close(cam(x), expected, rtol=0, atol=1e-6)
        with cls(resnet, "layer3") as cam, torch.inference_mode():
            torch.testing.assert_close(cam(x), expected, rtol=0, atol=1e-6)
    finally:
        for p, flag in zip(resnet.parameters(), flags):
            p.requires_grad_(flag)
    assert all(p.grad is None for p in resnet.parameters())
