"""The methods' shared contract: registry, default layers, output, errors, hooks and model state."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import Tensor, nn

from conftest import FAST_KWARGS, DeadCNN

from iscam import methods
from iscam.layers import LayerNotFoundError
from iscam.methods.base import default_target_layer, minmax_normalize

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(size: int = 16, n: int = 2) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def make(name: str, model: nn.Module, layer: str | None = "features.4", **kwargs: object) -> methods.CAM:
    return methods.get(name, model, layer, **{**FAST_KWARGS[name], **kwargs})


# ---------------------------------------------------------------------------- registry and defaults
def test_names() -> None:
    assert methods.METHOD_NAMES == ("gradcam", "gradcampp", "smoothgradcampp", "scorecam", "sscam", "iscam")
    assert methods.PAPER_NAMES["iscam"] == "IS-CAM" and methods.PAPER_NAMES["sscam"] == "SS-CAM"
    assert set(methods.METHOD_NAMES) | {"random"} == set(methods.METHODS) == set(methods.PAPER_NAMES)
    assert methods.get("iscam", nn.Sequential(nn.Conv2d(3, 2, 1)), "0").__class__ is methods.ISCAM


def test_default_target_layers() -> None:
    assert default_target_layer(torchvision.models.resnet18(weights=None)) == "layer4"
    assert default_target_layer(torchvision.models.squeezenet1_0(weights=None)) == "features.12"
    assert default_target_layer(torchvision.models.mobilenet_v2(weights=None)) == "features.18"
    vgg = type("VGG", (nn.Module,), {})()  # avoids building VGG-16's 138M weights
    assert default_target_layer(vgg) == "features.29"
    with methods.ISCAM(torchvision.models.squeezenet1_0(weights=None)) as cam:
        assert cam.target_layer == "features.12"
    resnet34 = torchvision.models.resnet34(weights=None)
    with pytest.raises(ValueError, match="no default target layer for a ResNet.*target_layer="):
        methods.ScoreCAM(resnet34)


def test_unknown_architecture_needs_a_layer_but_random_does_not(tiny_cnn: nn.Module) -> None:
    with pytest.raises(ValueError, match="no default target layer for a TinyCNN"):
        methods.get("gradcam", tiny_cnn)
    with methods.get("random", tiny_cnn) as cam:
        assert cam(batch()).shape == (2, 16, 16)


def test_layer_may_be_given_as_a_module(tiny_cnn: nn.Module) -> None:
    with (
        methods.ScoreCAM(tiny_cnn, tiny_cnn.features[4]) as by_module,
        methods.ScoreCAM(tiny_cnn, "features.4") as by_name,
    ):
        assert by_module.target_layer == "features.4"
        torch.testing.assert_close(by_module(batch()), by_name(batch()), rtol=0, atol=0)


# ---------------------------------------------------------------------------- output contract
@pytest.mark.parametrize("name", list(FAST_KWARGS))
def test_output_shape_range_dtype_device(tiny_cnn: nn.Module, name: str) -> None:
    x = batch(n=3).double()
    model = tiny_cnn.double()
    with make(name, model) as cam:
        for target in (None, 2, torch.tensor([0, 1, 4]), [4, 3, 2]):
            saliency = cam(x, target)
            assert saliency.shape == (3, 16, 16)
            assert saliency.dtype == torch.float32 and saliency.device == x.device
            assert torch.isfinite(saliency).all() and saliency.min() >= 0 and saliency.max() <= 1
        if name != "random":
            assert saliency.amax(dim=(1, 2)).eq(1).all()  # one global min-max per image


@pytest.mark.parametrize("name", ["gradcam", "scorecam", "iscam", "sscam"])
def test_target_none_is_the_clean_argmax(tiny_cnn: nn.Module, name: str) -> None:
    x = batch(n=2)
    with torch.no_grad():
        argmax = tiny_cnn(x).argmax(1)
    with make(name, tiny_cnn) as cam:
        torch.testing.assert_close(cam(x), cam(x, argmax), rtol=0, atol=0)


def test_random_baseline_is_seeded(tiny_cnn: nn.Module) -> None:
    x = batch()
    first, again, other = (methods.RandomCAM(tiny_cnn, seed=s) for s in (1, 1, 2))
    maps = first(x)
    assert torch.equal(maps, again(x)) and not torch.equal(maps, other(x))
    assert not torch.equal(maps[0], maps[1])  # a fresh map per image
    assert not torch.equal(first(x), maps)  # and per call
    assert first.forward_count == 0


def test_minmax_normalize_keeps_constant_maps_zero() -> None:
    maps = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[2.0, 2.0], [2.0, 2.0]], [[1.0, 3.0], [2.0, 5.0]]])
    expected = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.5], [0.25, 1.0]]])
    torch.testing.assert_close(minmax_normalize(maps), expected)


@pytest.mark.parametrize("name", ["gradcam", "gradcampp", "smoothgradcampp"])
def test_gradient_map_of_a_dead_layer_is_all_zero(name: str) -> None:
    model = DeadCNN().eval()
    with methods.get(name, model, "features", **FAST_KWARGS[name]) as cam:
        assert torch.equal(cam(batch(size=8)), torch.zeros(2, 8, 8))


# ---------------------------------------------------------------------------- bad input
def test_bad_constructor_arguments(tiny_cnn: nn.Module) -> None:
    with pytest.raises(LayerNotFoundError, match="'features.9' not found.*available layers.*features.4"):
        methods.ISCAM(tiny_cnn, "features.9")
    with pytest.raises(ValueError, match="N must be positive, got 0"):
        methods.ISCAM(tiny_cnn, "features.4", N=0)
    with pytest.raises(ValueError, match="N must be positive, got -3"):
        methods.SSCAM(tiny_cnn, "features.4", N=-3)
    with pytest.raises(TypeError, match="N must be a positive int"):
        methods.ISCAM(tiny_cnn, "features.4", N=2.5)
    with pytest.raises(ValueError, match="sigma must be >= 0, got -1"):
        methods.SSCAM(tiny_cnn, "features.4", sigma=-1.0)
    with pytest.raises(
        ValueError, match="unknown schedule 'cumulative'; valid: 'authors', 'paper', 'linear'"
    ):
        methods.ISCAM(tiny_cnn, "features.4", schedule="cumulative")
    with pytest.raises(ValueError, match="unknown protocol 'pytorch-grad-cam'; valid: 'authors', 'torchcam'"):
        methods.ScoreCAM(tiny_cnn, "features.4", protocol="pytorch-grad-cam")
    with pytest.raises(ValueError, match="unknown noise 'gaussian'; valid: 'sigma', 'authors'"):
        methods.SSCAM(tiny_cnn, "features.4", noise="gaussian")
    with pytest.raises(ValueError, match="unknown noisy_target"):
        methods.SmoothGradCAMpp(tiny_cnn, "features.4", noisy_target="clean")
    with pytest.raises(ValueError, match="n_samples must be positive"):
        methods.SmoothGradCAMpp(tiny_cnn, "features.4", n_samples=0)
    with pytest.raises(ValueError, match="noise_std must be >= 0"):
        methods.SmoothGradCAMpp(tiny_cnn, "features.4", noise_std=-0.1)
    with pytest.raises(ValueError, match="unknown method 'xcam'; valid: gradcam, gradcampp, smoothgradcampp"):
        methods.get("xcam", tiny_cnn, "features.4")
    with pytest.raises(ValueError, match="batch_size must be positive"):
        methods.ScoreCAM(tiny_cnn, "features.4", batch_size=0)
    with pytest.raises(ValueError, match="amp must be one of"):
        methods.ScoreCAM(tiny_cnn, "features.4", amp="fp8")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        methods.ScoreCAM("resnet18", "layer4")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(FAST_KWARGS))
def test_bad_call_arguments(tiny_cnn: nn.Module, name: str) -> None:
    with make(name, tiny_cnn) as cam:
        with pytest.raises(ValueError, match=r"4-D batch \[B, 3, H, W\], got shape \(3, 16, 16\)"):
            cam(batch()[0])
        with pytest.raises(ValueError, match="3 colour channels"):
            cam(torch.zeros(2, 1, 16, 16))
        with pytest.raises(TypeError, match="floating-point"):
            cam(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
        with pytest.raises(TypeError, match="torch.Tensor"):
            cam([[1.0]])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="target class -1 is out of range"):
            cam(batch(), torch.tensor([0, -1]))
        with pytest.raises(ValueError, match="target has 3 entries but the batch has 2 images"):
            cam(batch(), torch.tensor([0, 1, 2]))
        with pytest.raises(TypeError, match="integer class indices"):
            cam(batch(), torch.tensor([0.0, 1.0]))
        with pytest.raises(TypeError, match="target must be None, an int"):
            cam(batch(), "cat")  # type: ignore[arg-type]
        if name != "random":  # the baseline never runs the model, so it cannot know the class count
            with pytest.raises(
                ValueError, match=r"target class 5 is out of range: the model has 5 classes \(0..4\)"
            ):
                cam(batch(), 5)


# ---------------------------------------------------------------------------- hooks and model state
def hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )


@pytest.mark.parametrize("name", list(FAST_KWARGS))
def test_no_hooks_remain_between_calls_after_close_or_errors(tiny_cnn: nn.Module, name: str) -> None:
    with make(name, tiny_cnn) as cam:
        cam(batch())
        assert hook_count(tiny_cnn) == 0
        with pytest.raises(ValueError):
            cam(batch(), -1)
        assert hook_count(tiny_cnn) == 0
    assert hook_count(tiny_cnn) == 0
    with pytest.raises(RuntimeError, match="was closed"):
        cam(batch())

    class Boom(RuntimeError):
        pass

    def explode(_m: nn.Module, _i: object, _o: object) -> None:
        raise Boom("head failed")

    handle = tiny_cnn.classifier.register_forward_hook(explode)
    try:
        with pytest.raises(Boom), make(name, tiny_cnn) as cam:
            if name == "random":
                raise Boom("the baseline never runs the model")
            cam(batch())
    finally:
        handle.remove()
    assert hook_count(tiny_cnn) == 0


@pytest.mark.parametrize("name", list(FAST_KWARGS))
def test_training_flags_and_requires_grad_are_restored(tiny_cnn: nn.Module, name: str) -> None:
    model = tiny_cnn
    model.train()
    model.features[0].eval()  # a mixed state must come back exactly
    model.classifier.weight.requires_grad_(False)
    before_training = [m.training for m in model.modules()]
    before_grad = [p.requires_grad for p in model.parameters()]
    with make(name, model) as cam:
        cam(batch())
    assert [m.training for m in model.modules()] == before_training
    assert [p.requires_grad for p in model.parameters()] == before_grad


def test_score_methods_run_the_model_in_eval_mode(tiny_cnn: nn.Module) -> None:
    """Dropout in training mode would make every masked forward random; eval mode makes it repeatable."""
    model = nn.Sequential(
        tiny_cnn.features, nn.Dropout2d(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten(), tiny_cnn.classifier
    )
    model.train()
    with methods.ScoreCAM(model, "0.4") as cam:
        assert torch.equal(cam(batch()), cam(batch()))
    assert model.training


def test_channels_last_and_bf16_autocast_run(tiny_cnn: nn.Module) -> None:
    x = batch()
    with methods.ISCAM(tiny_cnn, "features.4", N=2) as exact:
        reference = exact.channel_weights(x)
    with methods.ISCAM(tiny_cnn, "features.4", N=2, channels_last=True) as cam:
        torch.testing.assert_close(cam.channel_weights(x), reference, rtol=0, atol=1e-5)
    with methods.ISCAM(tiny_cnn, "features.4", N=2, amp="bf16") as cam:
        weights = cam.channel_weights(x)
        assert weights.dtype == torch.float32
        torch.testing.assert_close(weights, reference, rtol=0, atol=5e-2)  # bfloat16 keeps ~3 digits
    with methods.ISCAM(tiny_cnn, "features.4", N=2, amp="fp16") as cam:
        half = cam.channel_weights(x)
        assert half.dtype == torch.float32
        # float16 keeps 3 more mantissa bits than bfloat16: closer to float32
        assert (half - reference).abs().max() <= (weights - reference).abs().max()
        torch.testing.assert_close(half, reference, rtol=0, atol=1e-2)


def test_compile_routes_only_the_perturbed_forwards_through_torch_compile(
    tiny_cnn: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled_models: list[nn.Module] = []
    real_compile = torch.compile

    def eager_compile(model: nn.Module, **kwargs):  # dynamo tracing without inductor's minute of codegen
        compiled_models.append(model)
        return real_compile(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    x = batch()
    with methods.ISCAM(tiny_cnn, "features.4", N=3) as exact:
        reference = exact.channel_weights(x)
    with methods.ISCAM(tiny_cnn, "features.4", N=3, compile=True, batch_size=4) as cam:
        torch.testing.assert_close(cam.channel_weights(x), reference, rtol=0, atol=1e-6)
        cam.channel_weights(x)  # the compiled model is built once and reused
        assert cam.forward_count == exact.forward_count * 2
    assert compiled_models == [tiny_cnn]
