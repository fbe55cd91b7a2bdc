"""The gradient family: Grad-CAM, Grad-CAM++ and Smooth Grad-CAM++, all from the logit of the target class.

Each weights the target layer's activation maps ``A_k`` (``[B, K, h, w]``) by statistics of the gradient
``g = dy_c / dA`` of the target logit ``y_c``; the map is ``minmax(up(ReLU(sum_k w_k A_k)))`` (combined at
the layer's resolution, bilinearly upsampled with ``align_corners=False``, one global min-max; an all-zero
map stays zero). Gradients are taken with respect to the activation only, so frozen weights are fine and
nothing upstream of the target layer is back-propagated.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from iscam.methods.base import (
    CAM,
    Target,
    _check_choice,
    _check_non_negative,
    _check_positive_int,
    _check_seed,
)

__all__ = ["NOISY_TARGETS", "GradCAM", "GradCAMpp", "SmoothGradCAMpp", "gradcampp_alpha"]

#: ``noisy_target=`` choices of Smooth Grad-CAM++.
NOISY_TARGETS: tuple[str, ...] = ("target", "argmax")


def gradcampp_alpha(activation: Tensor, grad2: Tensor, grad3: Tensor) -> Tensor:
    """Grad-CAM++'s pixel weights ``alpha = g^2 / (2 g^2 + sum_ab(A) g^3)``.

    A zero denominator is replaced by 1 (as in the Grad-CAM++ authors' code), so ``alpha`` is then ``g^2``
    (0 where the gradient vanishes) instead of NaN.
    """
    denominator = 2 * grad2 + activation.sum(dim=(-2, -1), keepdim=True) * grad3
    return grad2 / torch.where(denominator != 0, denominator, torch.ones_like(denominator))


class _GradientFamily(CAM):
    """Shared forward/backward of the gradient methods; a subclass computes the channel weights."""

    def _activation_and_gradient(self, x: Tensor, target: Target) -> tuple[Tensor, Tensor, Tensor]:
        """Clean forward + backward: (activation ``[B,K,h,w]``, gradient of the target logits, targets)."""
        with torch.inference_mode(False), torch.enable_grad(), self._autocast(x.device):
            logits, activation = self._hooked_forward(self._layout(x.clone()), grad=True)
            labels = self._resolve_target(target, logits)
            (gradient,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), activation)
        return activation.detach(), gradient.detach(), labels

    def _raw(self, x: Tensor, target: Target) -> Tensor:
        """``sum_k w_k A_k`` at the layer's resolution; :meth:`CAM.finish` applies ReLU, upsampling, min-max."""
        weights, activation = self._channel_weights(x, target)
        dtype = torch.promote_types(activation.dtype, torch.float32)
        return torch.einsum("bk,bkhw->bhw", weights.to(dtype), activation.to(dtype))

    def _channel_weights(self, x: Tensor, target: Target) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class GradCAM(_GradientFamily):
    r"""Grad-CAM (Selvaraju et al., ICCV 2017, https://arxiv.org/abs/1610.02391).

    $$ w_k = \frac{1}{hw}\sum_{a,b} \frac{\partial y_c}{\partial A_k(a,b)}, \qquad
       L = \mathrm{minmax}\big(\mathrm{up}(\mathrm{ReLU}(\textstyle\sum_k w_k A_k))\big) $$

    with ``y_c`` the logit (pre-softmax score) of the target class.
    """

    name = "gradcam"
    display_name = "Grad-CAM"

    def _channel_weights(self, x: Tensor, target: Target) -> tuple[Tensor, Tensor]:
        activation, gradient, _ = self._activation_and_gradient(x, target)
        dtype = torch.promote_types(gradient.dtype, torch.float32)
        return gradient.to(dtype).mean(dim=(-2, -1)), activation


class GradCAMpp(_GradientFamily):
    r"""Grad-CAM++ (Chattopadhay et al., WACV 2018, https://arxiv.org/abs/1710.11063).

    $$ \alpha_k(a,b) = \frac{g_k(a,b)^2}{2 g_k(a,b)^2 + \sum_{i,j} A_k(i,j)\, g_k(a,b)^3}, \qquad
       w_k = \sum_{a,b} \alpha_k(a,b)\,\mathrm{ReLU}(g_k(a,b)) $$

    with ``g = dy_c/dA`` the gradient of the target logit. The Grad-CAM++ authors' code passes the logit
    through ``exp`` first; that multiplies every ``w_k`` of an image by the same positive ``exp(y_c)``, which
    the final min-max removes, so it is left out (it also overflows float32 for logits above ~88). Zero
    denominators are replaced by 1 (:func:`gradcampp_alpha`).
    """

    name = "gradcampp"
    display_name = "Grad-CAM++"

    def _channel_weights(self, x: Tensor, target: Target) -> tuple[Tensor, Tensor]:
        activation, gradient, _ = self._activation_and_gradient(x, target)
        dtype = torch.promote_types(gradient.dtype, torch.float32)
        gradient, activation_f = gradient.to(dtype), activation.to(dtype)
        alpha = gradcampp_alpha(activation_f, gradient**2, gradient**3)
        return (alpha * torch.relu(gradient)).sum(dim=(-2, -1)), activation


class SmoothGradCAMpp(_GradientFamily):
    r"""Smooth Grad-CAM++ (Omeiza et al., 2019, https://arxiv.org/abs/1908.01224).

    Grad-CAM++ with the gradient powers averaged over ``n_samples`` noisy copies ``X + eps_j`` of the input,
    ``eps_j ~ N(0, noise_std^2)`` in normalised-input space:

    $$ \alpha_k(a,b) = \frac{\overline{g^2}_k(a,b)}{2\,\overline{g^2}_k(a,b) + \sum_{i,j} A_k(i,j)\,
       \overline{g^3}_k(a,b)}, \qquad w_k = \sum_{a,b} \alpha_k(a,b)\,\mathrm{ReLU}(\overline{g}_k(a,b)) $$

    where bars are means over the samples and ``A`` is the clean input's activation. Defaults follow the
    IS-CAM authors' notebook: ``n_samples=35``, ``noise_std=4.0`` (TorchCAM uses 4 and 0.3). The noise is
    drawn in float32 on the CPU from ``torch.Generator().manual_seed(seed)`` (``[n_samples, 3, H, W]``, the same
    draws for every image), so results repeat and do not depend on the batch, the device or the dtype.

    ``noisy_target``: ``"target"`` (default) back-propagates the requested class on every noisy copy;
    ``"argmax"`` back-propagates each noisy copy's own top class, as the authors' notebook does.

    The noisy passes are batched ``batch_size`` at a time across images and samples.
    """

    name = "smoothgradcampp"
    display_name = "Smooth Grad-CAM++"
    stochastic = True

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        n_samples: int = 35,
        noise_std: float = 4.0,
        seed: int = 0,
        noisy_target: str = "target",
        batch_size: int | None = None,
        amp: str | None = None,
        channels_last: bool = False,
    ) -> None:
        self.n_samples = _check_positive_int("n_samples", n_samples)
        self.noise_std = _check_non_negative("noise_std", noise_std)
        self.seed = _check_seed(seed)
        self.noisy_target = _check_choice("noisy_target", noisy_target, NOISY_TARGETS)
        super().__init__(model, target_layer, batch_size=batch_size, amp=amp, channels_last=channels_last)

    def _channel_weights(self, x: Tensor, target: Target) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            logits, activation = self._hooked_forward(self._layout(x), grad=False)
        labels = self._resolve_target(target, logits)
        batch, samples = x.shape[0], self.n_samples
        generator = torch.Generator().manual_seed(self.seed)
        # float32 draws on the CPU whatever x is, so float64 tests and CUDA runs see the same noise
        noise = torch.randn((samples, *x.shape[1:]), generator=generator, dtype=torch.float32)
        noise = noise.to(device=x.device, dtype=x.dtype).mul_(self.noise_std)
        dtype = torch.promote_types(activation.dtype, torch.float32)
        moments = torch.zeros((3, *activation.shape), dtype=dtype, device=x.device)  # sums of g, g^2, g^3

        def run(rows: slice) -> None:
            index = torch.arange(rows.start, rows.stop, device=x.device)
            image, sample = index // samples, index % samples
            with torch.inference_mode(False), torch.enable_grad(), self._autocast(x.device):
                noisy_logits, noisy_activation = self._hooked_forward(
                    self._layout(x[image] + noise[sample]), grad=True
                )
                chosen = labels[image] if self.noisy_target == "target" else noisy_logits.detach().argmax(1)
                (gradient,) = torch.autograd.grad(
                    noisy_logits.gather(1, chosen[:, None]).sum(), noisy_activation
                )
            gradient = gradient.detach().to(dtype)
            for power in range(3):
                moments[power].index_add_(0, image, gradient ** (power + 1))

        self._run_chunks(batch * samples, x.device, run)
        mean_g, mean_g2, mean_g3 = moments / samples
        alpha = gradcampp_alpha(activation.to(dtype), mean_g2, mean_g3)
        return (alpha * torch.relu(mean_g)).sum(dim=(-2, -1)), activation

    def _extra_repr(self) -> str:
        return (
            f"target_layer={self.target_layer!r}, n_samples={self.n_samples}, noise_std={self.noise_std}, "
            f"seed={self.seed}, noisy_target={self.noisy_target!r}"
        )
