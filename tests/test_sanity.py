"""iscam.sanity: stage lists, seeded re-initialisation, similarity values and the issue's checks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import FAST_KWARGS, TinyCNN
from skimage.feature import hog
from skimage.metrics import structural_similarity
from torch import Tensor, nn

from iscam import data, methods, models, sanity
from iscam.layers import LayerNotFoundError

pytestmark = pytest.mark.usefixtures("one_thread")

PAPER_SIX = {name: FAST_KWARGS[name] for name in methods.METHOD_NAMES}


def batch(size: int = 48, n: int = 2) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


class Residual(nn.Module):
    """Two convolutions defined in the reverse of the order they run in."""

    def __init__(self) -> None:
        super().__init__()
        self.second = nn.Conv2d(4, 4, 1)
        self.first = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.second(torch.relu(self.first(x)))


class OrderNet(nn.Module):
    """Head defined first but run last, a nested block, a BatchNorm and a layer the forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 3)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Residual(), nn.BatchNorm2d(4))
        self.unused = nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


class Restoring:
    """``reset_parameters()`` puts back the weights frozen by :func:`restoring`: a re-initialisation that
    changes nothing, so every 'randomised' model is the trained one."""

    kept: list[Tensor]

    def reset_parameters(self) -> None:
        if "kept" not in self.__dict__:  # called by nn.Conv2d/nn.Linear's own __init__
            super().reset_parameters()  # type: ignore[misc]
            return
        with torch.no_grad():
            own = self.parameters(recurse=False)  # type: ignore[attr-defined]
            for tensor, kept in zip(own, self.kept, strict=True):
                tensor.copy_(kept)


class RestoringConv2d(Restoring, nn.Conv2d):
    pass


class RestoringLinear(Restoring, nn.Linear):
    pass


def restoring(model: nn.Module) -> nn.Module:
    """``model`` with every Conv2d/Linear turned into its identity-preserving twin (same weights)."""
    for module in model.modules():
        twin = {nn.Conv2d: RestoringConv2d, nn.Linear: RestoringLinear}.get(type(module))
        if twin is not None:
            module.__class__ = twin  # same attributes, only reset_parameters differs
            module.kept = [t.detach().clone() for t in module.parameters(recurse=False)]
    return model


# ----------------------------------------------------------------------------------------------------- stages
def test_stage_list_follows_the_forward_order_at_both_granularities() -> None:
    model = OrderNet()
    x = batch(8, 1)
    assert sanity.parameterised_layers(model, x) == ["body.0", "body.2", "body.3", "head"]
    assert sanity.parameterised_layers(model, x, "module") == [
        "body.0", "body.2.first", "body.2.second", "body.3", "head"
    ]
    assert sanity.parameterised_layers(model, x, ["head", "body"]) == ["body", "head"]
    stages = sanity.randomisation_stages(["body.0", "body.2", "body.3", "head"])
    assert [(s.mode, s.index, s.layer, s.layers) for s in stages] == [
        ("cascading", 1, "head", ("head",)),
        ("cascading", 2, "body.3", ("head", "body.3")),
        ("cascading", 3, "body.2", ("head", "body.3", "body.2")),
        ("cascading", 4, "body.0", ("head", "body.3", "body.2", "body.0")),
        ("independent", 1, "head", ("head",)),
        ("independent", 2, "body.3", ("body.3",)),
        ("independent", 3, "body.2", ("body.2",)),
        ("independent", 4, "body.0", ("body.0",)),
    ]
    independent = sanity.randomisation_stages(["a", "b"], modes=("independent",))
    assert [s.mode for s in independent] == ["independent"] * 2


def test_stage_list_of_torchvision_nets() -> None:
    x = batch(32, 1)
    resnet = torchvision.models.resnet18(weights=None)
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert sanity.parameterised_layers(resnet, x) == ["conv1", "bn1", *blocks, "fc"]
    assert len(sanity.parameterised_layers(resnet, x, "module")) == 41
    squeezenet = torchvision.models.squeezenet1_0(weights=None)
    fires = [f"features.{i}" for i in (3, 4, 5, 7, 8, 9, 10, 12)]
    assert sanity.parameterised_layers(squeezenet, batch(64, 1)) == ["features.0", *fires, "classifier.1"]
    assert len(sanity.parameterised_layers(squeezenet, batch(64, 1), "module")) == 26


def test_bad_stage_requests_fail_with_a_clear_error() -> None:
    model = OrderNet()
    x = batch(8, 1)
    with pytest.raises(ValueError, match="unknown granularity 'layer'"):
        sanity.parameterised_layers(model, x, "layer")
    with pytest.raises(ValueError, match="'body.2' lies inside layer 'body'"):
        sanity.parameterised_layers(model, x, ["body", "body.2"])
    with pytest.raises(LayerNotFoundError, match="'tail' not found"):
        sanity.parameterised_layers(model, x, ["tail"])
    with pytest.raises(ValueError, match="'body.1' .*has no parameters"):
        sanity.parameterised_layers(model, x, ["body.1"])
    with pytest.raises(ValueError, match="unknown mode 'top_down'"):
        sanity.randomisation_stages(["head"], modes=("top_down",))
    with pytest.raises(ValueError, match="lists a module twice"):
        sanity.randomisation_stages(["head", "head"])
    with pytest.raises(ValueError, match=r"x must be a non-empty batch \[B, 3, H, W\]"):
        sanity.parameterised_layers(model, torch.zeros(3, 8, 8))

    class Scale(nn.Module):  # owns a parameter, has no reset_parameters
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(1))

        def forward(self, x: Tensor) -> Tensor:
            return x * self.gain

    scaled = nn.Sequential(nn.Conv2d(3, 4, 1), Scale(), nn.Flatten())
    with pytest.raises(ValueError, match=r"cannot re-initialise 1 \(Scale\).*reset_parameters"):
        sanity.parameterised_layers(scaled, x)

    class Token(nn.Module):  # a parameter owned by the model itself
        def __init__(self) -> None:
            super().__init__()
            self.token = nn.Parameter(torch.zeros(1))
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(x).mean(dim=(2, 3)) + self.token

    with pytest.raises(ValueError, match=r"owns parameters directly \(token\)"):
        sanity.parameterised_layers(Token(), x)


# ------------------------------------------------------------------------------------------ re-initialisation
def test_reinitialisation_is_torchs_default_init_under_the_layer_seed(tiny_cnn: nn.Module) -> None:
    copy = sanity.randomised_copy(tiny_cnn, ["features.0"], seed=3)
    torch.manual_seed(sanity.layer_seed(3, "features.0"))
    expected = nn.Conv2d(3, 8, 3, padding=1)  # its __init__ runs reset_parameters from that state
    assert torch.equal(copy.features[0].weight, expected.weight)
    assert torch.equal(copy.features[0].bias, expected.bias)
    assert not torch.equal(copy.features[0].weight, tiny_cnn.features[0].weight)
    for name in ("features.3.weight", "classifier.weight", "classifier.bias"):
        assert torch.equal(copy.state_dict()[name], tiny_cnn.state_dict()[name]), name
    assert sanity.layer_seed(3, "features.0") == sanity.layer_seed(3, "features.0") != sanity.layer_seed(
        4, "features.0")


def test_seeds_reproduce_and_a_layer_gets_the_same_draw_in_every_stage(tiny_cnn: nn.Module) -> None:
    cascade = sanity.randomised_copy(tiny_cnn, ["classifier", "features.3"], seed=1)
    alone = sanity.randomised_copy(tiny_cnn, ["features.3"], seed=1)
    again = sanity.randomised_copy(tiny_cnn, ["features.3"], seed=1)
    other = sanity.randomised_copy(tiny_cnn, ["features.3"], seed=2)
    assert torch.equal(cascade.features[3].weight, alone.features[3].weight)
    assert torch.equal(alone.features[3].weight, again.features[3].weight)
    assert not torch.equal(alone.features[3].weight, other.features[3].weight)
    state = torch.get_rng_state()
    sanity.randomised_copy(tiny_cnn, ["classifier"], seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is not consumed


def test_batchnorm_reinitialisation_resets_affine_and_running_statistics() -> None:
    model = OrderNet()
    norm = model.body[3]
    with torch.no_grad():
        norm.weight.fill_(2.0)
        norm.bias.fill_(0.5)
        norm.running_mean.fill_(3.0)
        norm.running_var.fill_(4.0)
    reset = sanity.randomised_copy(model, ["body.3"]).body[3]
    assert torch.equal(reset.weight, torch.ones(4)) and torch.equal(reset.bias, torch.zeros(4))
    assert torch.equal(reset.running_mean, torch.zeros(4)) and torch.equal(reset.running_var, torch.ones(4))
    assert float(norm.running_var[0]) == 4.0  # the original is untouched


# ------------------------------------------------------------------------------------------------- similarity
def ramp(size: int = 48) -> np.ndarray:
    return np.arange(size * size, dtype=np.float64).reshape(1, size, size) / (size * size - 1)


def test_spearman_values_by_hand() -> None:
    a = ramp()
    n = a.size
    swapped = a.copy().reshape(-1)
    swapped[[10, 11]] = swapped[[11, 10]]  # two neighbours exchange ranks: sum d^2 = 2
    values = sanity.similarity(a, swapped.reshape(a.shape))
    assert values["spearman"][0] == pytest.approx(1 - 6 * 2 / (n * (n**2 - 1)), abs=1e-12)
    signed = 2 * a - 1
    opposite = sanity.similarity(signed, -signed)
    assert opposite["spearman"][0] == -1.0 and opposite["spearman_abs"][0] == 1.0  # |-m| = |m|
    # ties share their mean rank: [0, 0, 1, 1] vs [0, 1, 2, 3] -> ranks [1.5, 1.5, 3.5, 3.5] vs [1, 2, 3, 4]
    tied = np.repeat(np.array([0.0, 0.0, 1.0, 1.0]), n // 4).reshape(a.shape)
    rho = sanity.similarity(tied, a)["spearman"][0]
    ranks_b = np.arange(1, n + 1, dtype=np.float64)
    ranks_a = np.repeat([(n // 2 + 1) / 2, n // 2 + (n // 2 + 1) / 2], n // 2)
    assert rho == pytest.approx(np.corrcoef(ranks_a, ranks_b)[0, 1], abs=1e-12)


def test_equal_maps_give_exactly_one_and_constant_maps_nan() -> None:
    maps = torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(1))
    same = sanity.similarity(maps, maps.clone())
    for metric in sanity.SIMILARITY_METRICS:
        assert same[metric].tolist() == [1.0, 1.0, 1.0], metric
    # min-max normalisation before SSIM and HOG: an affine copy of a map is the same map
    affine = sanity.similarity(maps, 0.5 * maps + 0.25)
    assert affine["ssim"] == pytest.approx(1.0, abs=1e-12) and affine["hog"] == pytest.approx(1.0, abs=1e-12)
    assert affine["spearman"].tolist() == [1.0, 1.0, 1.0]
    zeros = torch.zeros(1, 48, 48)
    constant = sanity.similarity(zeros, maps[:1])
    assert math.isnan(constant["spearman"][0]) and math.isnan(constant["hog"][0])
    both = sanity.similarity(zeros, zeros)
    assert both["ssim"][0] == 1.0 and math.isnan(both["spearman"][0])  # SSIM: C1/C1 * C2/C2


def test_ssim_and_hog_use_the_documented_parameters() -> None:
    rows, cols = np.mgrid[0:64, 0:64]
    noise = np.random.default_rng(2).random((64, 64))
    a = np.exp(-((rows - 30) ** 2 + (cols - 32) ** 2) / 200.0)[None]  # a blob ...
    b = 3 * np.exp(-((rows - 36) ** 2 + (cols - 32) ** 2) / 200.0)[None] + 0.1 * noise  # ... moved, noisier
    values = sanity.similarity(a, b)
    a01, b01 = ((m[0] - m.min()) / (m.max() - m.min()) for m in (a, b))
    expected_ssim = structural_similarity(a01, b01, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False)
    assert values["ssim"][0] == pytest.approx(expected_ssim, abs=1e-12)
    hogs = [hog(m, orientations=9, pixels_per_cell=(16, 16), cells_per_block=(3, 3), block_norm="L2-Hys")
            for m in (a01, b01)]
    assert hogs[0].size == 2 * 2 * 3 * 3 * 9  # 4x4 cells of 16 px -> 2x2 blocks of 3x3 cells
    assert values["hog"][0] == pytest.approx(np.corrcoef(*hogs)[0, 1], abs=1e-12)
    assert 0.3 < values["ssim"][0] < 1 and 0.3 < values["hog"][0] < 1
    small = sanity.similarity(a[:, :40, :40], b[:, :40, :40], hog_cell=8)
    assert set(small) == set(sanity.SIMILARITY_METRICS)


def test_similarity_rejects_bad_input() -> None:
    maps = torch.rand(2, 48, 48)
    with pytest.raises(ValueError, match="same shape"):
        sanity.similarity(maps, maps[:1])
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        sanity.similarity(maps[0], maps[0])
    with pytest.raises(ValueError, match="NaN or infinite"):
        sanity.similarity(maps, torch.full_like(maps, math.nan))
    with pytest.raises(ValueError, match="too small.*at least 48 px"):
        sanity.similarity(maps[:, :40, :40], maps[:, :40, :40])
    with pytest.raises(ValueError, match="hog_cell must be a positive int"):
        sanity.similarity(maps, maps, hog_cell=0)
    with pytest.raises(TypeError, match="torch.Tensor or numpy array"):
        sanity.similarity([[0.0]], maps)


# ----------------------------------------------------------------------------------------- the checks
def test_identity_preserving_reinitialisation_gives_similarity_one_for_every_method() -> None:
    torch.manual_seed(0)
    model = restoring(TinyCNN().eval())
    x = batch(48, 2)
    other_class = (model(x).argmax(dim=1) + 1) % 5  # stages must explain the class they are given
    rows = sanity.sanity_rows(model, x, PAPER_SIX, layer="features.4", target=other_class)
    assert len(rows) == 2 * 6 * (3 + 3)  # images x methods x (cascading + independent stages)
    for row in rows:
        for metric in sanity.SIMILARITY_METRICS:
            assert row[metric] == 1.0, (row, metric)


def test_random_baseline_is_the_similarity_of_two_independent_random_maps(tiny_cnn: nn.Module) -> None:
    x = batch(48, 2)
    rows = sanity.sanity_rows(tiny_cnn, x, {"random": {"seed": 5}}, layer="features.4")
    stages = sanity.randomisation_stages(sanity.parameterised_layers(tiny_cnn, x))
    first = methods.RandomCAM(tiny_cnn, seed=5)(x)
    for stage in stages:
        draw = methods.RandomCAM(tiny_cnn, seed=sanity.stage_seed(5, stage))(x)
        expected = sanity.similarity(first, draw)
        got = [r for r in rows if (r["mode"], r["stage"]) == (stage.mode, stage.index)]
        for i, row in enumerate(got):
            for metric in sanity.SIMILARITY_METRICS:
                assert row[metric] == expected[metric][i], (stage, metric)
            assert abs(row["spearman"]) < 0.1  # independent draws: chance level (sd ~ 1/48)
    assert len({sanity.stage_seed(5, s) for s in stages}) == len(stages)


@pytest.fixture(scope="module")
def coral_tiny(assets: Path) -> tuple[nn.Module, Tensor]:
    loaded = models.load("mobilenet_v1_coral_tiny", data_root=assets)
    manifest = assets / "imagenet-val-sample" / "manifest.csv"
    dataset = data.ManifestDataset(manifest, loaded.preprocess, limit=3)
    return loaded.model, torch.stack([dataset[i].image for i in range(3)])


def test_gradcam_similarity_drops_on_a_randomised_real_classifier(
        coral_tiny: tuple[nn.Module, Tensor]) -> None:
    model, x = coral_tiny
    assert x.shape == (3, 3, 128, 128)
    rows = sanity.sanity_rows(model, x, {"gradcam": {}}, modes=("cascading",))
    assert sorted({r["n_randomised"] for r in rows}) == list(range(1, 16))  # 14 blocks + the classifier
    classifier_only = [r for r in rows if r["stage"] == 1]
    assert {r["randomised"] for r in classifier_only} == {"classifier"}
    for row in classifier_only:  # new class weights: the map of the same class is another map
        assert row["spearman"] < 0.5 and row["ssim"] < 0.5 and row["hog"] < 0.5, row
    flags = sanity.insensitive_methods(rows)
    assert flags["method"].tolist() == ["gradcam"] and flags["n_randomised"].tolist() == [15]
    assert flags["mean"].iloc[0] < sanity.INSENSITIVE_THRESHOLD and not flags["flagged"].iloc[0]


def test_every_stage_is_the_model_with_exactly_its_layers_reinitialised(tiny_cnn: nn.Module) -> None:
    x = batch(48, 2)
    rows = sanity.sanity_rows(tiny_cnn, x, {"gradcam": {}}, layer="features.4", seed=7)
    target = tiny_cnn(x).argmax(dim=1)
    trained = methods.GradCAM(tiny_cnn, "features.4")(x, target)
    stages = sanity.randomisation_stages(sanity.parameterised_layers(tiny_cnn, x))
    assert len(rows) == 2 * len(stages) == 12
    for stage in stages:  # recomputed from scratch on a fresh copy: cascades accumulate, independents restore
        fresh = sanity.randomised_copy(tiny_cnn, stage.layers, seed=7)
        expected = sanity.similarity(trained, methods.GradCAM(fresh, "features.4")(x, target))
        got = [r for r in rows if (r["mode"], r["stage"]) == (stage.mode, stage.index)]
        np.testing.assert_equal([r["ssim"] for r in got], expected["ssim"])
        np.testing.assert_equal([r["spearman"] for r in got], expected["spearman"])


def test_the_callers_model_is_unchanged(tiny_cnn: nn.Module) -> None:
    tiny_cnn.train()
    before = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    state = torch.get_rng_state()
    rows = sanity.sanity_rows(tiny_cnn, batch(48, 1), {"gradcam": {"channels_last": True}, "random": {}},
                              layer="features.4")
    assert rows and torch.equal(torch.get_rng_state(), state)
    after = tiny_cnn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(module.training for module in tiny_cnn.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny_cnn.modules())
    assert tiny_cnn.features[0].weight.is_contiguous()  # channels_last converted the copy only


def test_rows_reproduce_and_depend_on_the_seed(tiny_cnn: nn.Module) -> None:
    x = batch(48, 1)
    kwargs = {"layer": "features.4", "modes": ("cascading",)}
    one = sanity.sanity_rows(tiny_cnn, x, {"gradcam": {}, "smoothgradcampp": {"n_samples": 2}}, **kwargs)
    np.testing.assert_equal(  # NaN (a constant map) compares equal to NaN here
        one, sanity.sanity_rows(tiny_cnn, x, {"gradcam": {}, "smoothgradcampp": {"n_samples": 2}}, **kwargs))
    other = sanity.sanity_rows(tiny_cnn, x, {"gradcam": {}, "smoothgradcampp": {"n_samples": 2}}, seed=1,
                               **kwargs)
    assert [r["ssim"] for r in one] != [r["ssim"] for r in other]  # SSIM is defined for constant maps too
    assert list(one[0]) == list(sanity.SANITY_COLUMNS)
    assert {r["target"] for r in one} == {int(tiny_cnn(x).argmax())}


def test_explicit_stages_and_targets(tiny_cnn: nn.Module) -> None:
    x = batch(48, 2)
    stage = sanity.Stage("independent", 1, "features.0", ("features.0",))
    rows = sanity.sanity_rows(tiny_cnn, x, {"gradcam": {}}, stages=[stage], target=[1, 2], layer="features.4")
    assert [(r["mode"], r["randomised"], r["target"]) for r in rows] == [
        ("independent", "features.0", 1), ("independent", "features.0", 2)
    ]
    with pytest.raises(ValueError, match="out of range"):
        sanity.sanity_rows(tiny_cnn, x, {"gradcam": {}}, stages=[stage], target=9, layer="features.4")


def test_bad_requests_fail_before_any_forward(tiny_cnn: nn.Module) -> None:
    calls = []
    tiny_cnn.register_forward_pre_hook(lambda *_: calls.append(1))
    x = batch(48, 1)
    with pytest.raises(ValueError, match="unknown method 'fancycam'"):
        sanity.sanity_rows(tiny_cnn, x, {"gradcam": {}, "fancycam": {}})
    with pytest.raises(ValueError, match="may not set \\['target_layer'\\]"):
        sanity.sanity_rows(tiny_cnn, x, {"gradcam": {"target_layer": "features.4"}})
    with pytest.raises(TypeError, match="non-empty mapping"):
        sanity.sanity_rows(tiny_cnn, x, ["gradcam"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed must be an int"):
        sanity.sanity_rows(tiny_cnn, x, {"gradcam": {}}, seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid stage"):
        sanity.sanity_rows(tiny_cnn, x, {"gradcam": {}}, stages=[sanity.Stage("top_down", 1, "x", ("x",))])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        sanity.sanity_rows("model", x, {"gradcam": {}})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="too small"):
        sanity.sanity_rows(tiny_cnn, x[..., :40, :40], {"gradcam": {}}, layer="features.4")
    with pytest.raises(ValueError, match="N must be positive"):
        sanity.sanity_rows(tiny_cnn, x, {"gradcam": {}, "iscam": {"N": 0}}, layer="features.4")
    with pytest.raises(LayerNotFoundError, match="'features.9' not found"):
        sanity.sanity_rows(tiny_cnn, x, {"gradcam": {}}, layer="features.9")
    with pytest.raises(TypeError, match="layer must be a module name"):
        sanity.sanity_rows(tiny_cnn, x, {"gradcam": {}}, layer=tiny_cnn.features[4])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown mode 'both'"):
        sanity.sanity_rows(tiny_cnn, x, {"gradcam": {}}, modes=("both",), layer="features.4")
    with pytest.raises(ValueError, match="unknown granularity"):
        sanity.sanity_rows(tiny_cnn, x, {"gradcam": {}}, granularity="layer", layer="features.4")
    assert calls == []  # the deep copy keeps the counting hook: not even the stage list was recorded


# -------------------------------------------------------------------------------------------------- summaries
def hand_rows() -> list[dict[str, object]]:
    """gradcam: 0.2, 0.4 and one undefined value at the full stage; scorecam: 0.8 and 0.9 there."""
    rows = []
    for method, values in {"gradcam": [0.2, 0.4, math.nan], "scorecam": [0.8, 0.9]}.items():
        for image, value in enumerate(values):
            for stage, n in ((1, 1), (2, 2)):
                rows.append({"image": image, "method": method, "mode": "cascading", "stage": stage,
                             "randomised": f"layer{stage}", "n_randomised": n, "target": 0,
                             "spearman": value if stage == 2 else 1.0, "spearman_abs": value, "ssim": 0.5,
                             "hog": value})
    return rows


def test_summary_means_intervals_and_undefined_counts() -> None:
    table = sanity.summarise(hand_rows(), metrics=["spearman"], n_boot=2000)
    full = table[(table["method"] == "gradcam") & (table["stage"] == 2)].iloc[0]
    assert full["mean"] == pytest.approx(0.3) and full["n"] == 2 and full["n_undefined"] == 1
    assert 0.2 <= full["low"] <= full["mean"] <= full["high"] <= 0.4
    first = table[(table["method"] == "scorecam") & (table["stage"] == 1)].iloc[0]
    assert (first["mean"], first["low"], first["high"]) == (1.0, 1.0, 1.0)
    assert len(table) == 4 and set(table["metric"]) == {"spearman"}
    with pytest.raises(ValueError, match="subset of"):
        sanity.summarise(hand_rows(), metrics=["pearson"])
    with pytest.raises(ValueError, match="lack column"):
        sanity.summarise([{"method": "gradcam"}])


def test_insensitive_methods_flag_maps_that_survive_full_randomisation() -> None:
    flags = sanity.insensitive_methods(hand_rows(), n_boot=2000)
    assert flags["method"].tolist() == ["gradcam", "scorecam"]
    assert flags["n_randomised"].tolist() == [2, 2]
    assert flags["mean"].tolist() == pytest.approx([0.3, 0.85])
    assert flags["flagged"].tolist() == [False, True]
    low = sanity.insensitive_methods(hand_rows(), threshold=0.2, n_boot=10)
    assert low["flagged"].tolist() == [True, True]
    with pytest.raises(ValueError, match="unknown metric"):
        sanity.insensitive_methods(hand_rows(), metric="pearson")
    with pytest.raises(ValueError, match="threshold must be a number in"):
        sanity.insensitive_methods(hand_rows(), threshold=2.0)
