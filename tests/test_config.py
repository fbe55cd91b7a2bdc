"""The run schema: shipped configs, overrides, method keys, variants (the chapters' extra rows) and the
checks made before any work (:mod:`iscam.config`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from iscam.config import (
    ConfigError,
    DataSpec,
    MethodSpec,
    check_methods,
    config_from_dict,
    expand,
    image_seed,
    load_config,
    parse_override,
    resolved_params,
    select_indices,
)
from iscam.store import params_key

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("paper-vgg16", "paper-resnet18", "paper-squeezenet", "smoke", "quick", "mobilenet", "squeezenet",
           "squeezenet11")

# --------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate_and_run_every_method_with_the_random_baseline(name: str) -> None:
    config = load_config(name)
    assert config.name == name
    names = [m.name for m in config.methods]
    assert names == ["gradcam", "gradcampp", "smoothgradcampp", "scorecam", "sscam", "iscam", "random"]
    assert config_from_dict(config.to_dict()) == config
    for spec in config.methods:  # every parameter exists in the methods module
        resolved_params(spec.name, spec.params)


def test_paper_configs_use_the_documented_n_and_sigma() -> None:
    for name in ("paper-vgg16", "paper-resnet18", "paper-squeezenet", "quick", "mobilenet", "squeezenet",
                 "squeezenet11"):
        config = load_config(name)
        params = {m.name: dict(m.params) for m in config.methods}
        assert params["iscam"] == {"N": 10, "schedule": "authors"}
        assert params["sscam"] == {"N": 15, "sigma": 2.0}
        assert config.metrics.insertion == {"step": 224, "substrate": "blur"}
        assert config.metrics.deletion == {"step": 224, "substrate": "zeros"}
    assert load_config("paper-resnet18").model.name == "resnet18"
    assert load_config("paper-squeezenet").model.name == "squeezenet1_0"
    assert load_config("quick").data.num_images == 100
    # the offline SqueezeNets: the paper's 1.0 with Deep Compression weights, 1.1 with torchvision's (ncnn copy)
    assert (load_config("squeezenet").model.name, load_config("squeezenet").model.weights) == (
        "squeezenet1_0", "deepcompression")
    assert (load_config("squeezenet11").model.name, load_config("squeezenet11").model.weights) == (
        "squeezenet1_1", "ncnn")


def test_overrides_are_dotted_yaml_values() -> None:
    config = load_config("smoke", ["data.num_images=20", "methods.iscam.N=15", "metrics.insertion.substrate=zeros",
                                   "device=cpu", "methods.sscam.params.sigma=0.5"])
    assert config.data.num_images == 20
    assert dict(next(m for m in config.methods if m.name == "iscam").params) == {"N": 15, "schedule": "authors"}
    assert dict(next(m for m in config.methods if m.name == "sscam").params)["sigma"] == 0.5
    assert config.metrics.insertion == {"step": 2048, "substrate": "zeros"}
    assert config.device == "cpu"
    assert parse_override("methods=[gradcam, random]") == (["methods"], ["gradcam", "random"])
    replaced = load_config("smoke", ["methods=[gradcam, {name: iscam, params: {N: 3}}]"])
    assert [(m.name, dict(m.params)) for m in replaced.methods] == [("gradcam", {}), ("iscam", {"N": 3})]
    by_position = load_config("smoke", ["methods.5.N=7"])
    assert dict(by_position.methods[5].params)["N"] == 7


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("colour=red", "unknown key 'colour'"),
        ("data.num_imgs=3", "unknown key 'data.num_imgs'"),
        ("data.num_images=many", "data.num_images must be an integer"),
        ("data.num_images=0", "data.num_images must be >= 1"),
        ("methods.fancycam.N=3", "no method 'fancycam'"),
        ("methods.iscam.M=3", "method 'iscam' has no parameter 'M'"),
        ("methods.iscam.N", "expected key=value"),
        ("metrics.insertion.substrate=noise", "metrics.insertion.substrate must be one of zeros, blur"),
        ("metrics.insertion.steps=3", "unknown key"),
        ("precision=fp8", "precision must be one of fp32, bf16"),
        ("methods.iscam.seed=3", "set by the runner"),
        ("data.num_images=[1", "not valid YAML"),
    ],
)
def test_bad_overrides_name_the_problem(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config = load_config("smoke", [override])
        for spec in config.methods:
            resolved_params(spec.name, spec.params)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_the_runner_forwards_in_the_config_precision(precision: str, dtype: torch.dtype) -> None:
    """Targets and metric frames run in the precision the methods use (fp16 once ran metrics in fp32)."""
    from iscam.runner import _autocast

    with _autocast(torch.device("cpu"), precision):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
    with _autocast(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu")


def test_unknown_config_lists_the_shipped_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown config 'smok'.*paper-vgg16.*smoke"):
        load_config("smok")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {name: vgg16}\nmethods: [gradcam]\nbatch_sise: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown key 'batch_sise'"):
        load_config(bad)
    duplicated = tmp_path / "dup.yaml"
    duplicated.write_text("name: x\nmodel: vgg16\nmethods: [gradcam, {name: iscam, params: {N: 2}}, "
                          "{name: iscam, params: {N: 2}}]\n")
    with pytest.raises(ConfigError, match=r"iscam\(N=2\) is listed twice"):
        load_config(duplicated)
    ambiguous = tmp_path / "sweep.yaml"
    ambiguous.write_text("name: sweep\nmodel: vgg16\nmethods: [{name: iscam, params: {N: 2}}, "
                         "{name: iscam, params: {N: 5}}]\n")
    assert [m.params["N"] for m in load_config(ambiguous).methods] == [2, 5]
    with pytest.raises(ConfigError, match="2 methods are named 'iscam'.*methods.0"):
        load_config(ambiguous, ["methods.iscam.N=3"])


def test_params_key_fills_method_defaults_and_seeds_only_stochastic_methods() -> None:
    config = load_config("smoke")
    explicit = MethodSpec("iscam", {"N": 10, "schedule": "authors"})
    implicit = MethodSpec("iscam", {})
    assert config.method_key(explicit) == config.method_key(implicit)
    assert json.loads(config.method_key(implicit))["N"] == 10
    assert config.method_key(MethodSpec("iscam", {"N": 15})) != config.method_key(implicit)
    random_key = json.loads(config.method_key(MethodSpec("random", {})))
    assert random_key == {"seed": 0}
    assert "seed" not in json.loads(config.method_key(implicit))
    assert params_key({"b": 1, "a": [1, 2.5]}) == '{"a":[1,2.5],"b":1}'


def test_image_selection_and_seeds_are_stable() -> None:
    spec = DataSpec(num_images=5, seed=3)
    chosen = select_indices(300, spec)
    assert chosen == sorted(chosen) and len(set(chosen)) == 5 and chosen == select_indices(300, spec)
    assert select_indices(300, DataSpec(num_images=5, seed=None)) == [0, 1, 2, 3, 4]
    assert select_indices(4, DataSpec(num_images=10, seed=0)) == [0, 1, 2, 3]
    assert image_seed(0, "sscam", "a.JPEG") == image_seed(0, "sscam", "a.JPEG")
    assert len({image_seed(0, "sscam", "a.JPEG"), image_seed(1, "sscam", "a.JPEG"),
                image_seed(0, "random", "a.JPEG"), image_seed(0, "sscam", "b.JPEG")}) == 4
    assert 0 <= image_seed(7, "random", "x") < 2**63




# --------------------------------------------------------------------------------------------------
# variants: the chapters' extra rows are configs, expanded into studies of one store
# --------------------------------------------------------------------------------------------------

def test_variants_expand_into_studies_of_the_base_config() -> None:
    config = load_config("quick")
    studies = expand(config)
    assert studies[0].variant == "" and studies[0].config == config.base() and studies[0].images is None
    sweep = [s for s in studies if s.variant == "n_sweep"]
    # the grid plus the config's own N (10), each IS-CAM only, on the first 30 images
    assert [s.label for s in sweep] == ["N=1", "N=2", "N=5", "N=10", "N=15", "N=20"]
    assert all(s.images == 30 and [m.name for m in s.config.methods] == ["iscam"] for s in sweep)
    assert [s.config.methods[0].params["N"] for s in sweep] == [1, 2, 5, 10, 15, 20]
    # the N=10 set is the base's IS-CAM: the same rows (same key), so it is computed once
    ten = next(s for s in sweep if s.label == "N=10")
    assert ten.config.method_key(ten.config.methods[0]) == config.method_key(config.methods[5])
    protocol = {s.label: s.config for s in studies if s.variant == "protocol"}
    assert list(protocol)[0] == "default (authors' code)"
    assert protocol["schedule = paper"].methods[1].params["schedule"] == "paper"
    assert protocol["insertion onto zeros"].metrics.insertion["substrate"] == "zeros"
    assert {m.params.get("protocol") for m in protocol["TorchCAM scoring"].methods} == {"torchcam"}
    assert studies[-1].figures and studies[-1].images == 3
    # a --set on the base reaches every variant; the grid keeps its own N values and adds the new base N
    changed = expand(load_config("quick", ["methods.iscam.N=7"]))
    assert [s.label for s in changed if s.variant == "n_sweep"] == ["N=1", "N=2", "N=5", "N=7", "N=10", "N=15",
                                                                     "N=20"]
    assert config_from_dict(config.to_dict()) == config


def test_a_variant_of_methods_the_config_does_not_run_is_left_out() -> None:
    config = load_config("smoke", ["methods=[gradcam, random]"])
    assert {s.variant for s in expand(config)} == {"", "figures"}
    with pytest.raises(ConfigError, match="unknown method 'iscma'"):
        load_config("smoke", ["variants.protocol.methods=[iscma]"])
    with pytest.raises(ConfigError, match="variants.extra needs either sets or grid"):
        load_config("smoke", ["variants.extra.images=2"])
    typo = load_config("smoke", ["variants.protocol.sets={schedule = paper: {methods.iscam.schedule: papr}}"])
    with pytest.raises(ConfigError, match=r"\(variant protocol: schedule = paper\).*unknown schedule 'papr'"):
        check_methods(typo)


@pytest.mark.parametrize(("override", "message"), [
    ("methods.iscam.N=abc", r"method iscam\(N=abc.*N must be a positive int, got 'abc'"),
    ("methods.iscam.N=2.0", r"N must be a positive int, got 2.0"),
    ("methods.iscam.N=0", r"N must be positive, got 0"),
    ("methods.sscam.sigma=-1", r"sigma must be >= 0"),
    ("methods.iscam.schedul=paper", r"method 'iscam' has no parameter 'schedul'; its parameters: N, schedule"),
    ("variants.n_sweep.grid={methods.iscam.N: [1, 0]}", r"\(variant n_sweep: N=0\).*N must be positive"),
])
def test_every_method_parameter_is_checked_before_any_work(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_methods(load_config("smoke", [override]))


def test_bad_manifest_policy_is_a_config_error() -> None:
    assert load_config("smoke", ["data.on_bad_rows=skip"]).data.on_bad_rows == "skip"
    with pytest.raises(ConfigError, match="data.on_bad_rows must be one of error, skip"):
        load_config("smoke", ["data.on_bad_rows=drop"])


# --------------------------------------------------------------------------------------------------
# ROAD and sanity sections: the tables beside the rows
# --------------------------------------------------------------------------------------------------

def test_road_and_sanity_sections_are_validated_keyed_and_reachable_with_set() -> None:
    config = load_config("smoke")
    assert config.road.images == 2 and config.road.fractions == (0.1, 0.5, 0.9)
    assert config.road.key(0) == '{"fractions":[0.1,0.5,0.9],"seed":0}'
    assert [s.name for s in config.sanity] == ["single_pass", "multi_pass"]
    multi = config.sanity[1]
    assert (multi.images, multi.methods, multi.modes, multi.stages, multi.granularity) == (
        1, ("smoothgradcampp", "scorecam", "sscam", "iscam"), ("cascading",), 2, "block")
    assert multi.randomisation("cascading", 3) == '{"granularity":"block","mode":"cascading","seed":3}'
    listed = {"x": {"granularity": ["features.1", "classifier"]}}
    named = config_from_dict({**config.to_dict(), "sanity": listed})
    assert named.sanity[0].randomisation("independent", 0) == (
        '{"granularity":["features.1","classifier"],"mode":"independent","seed":0}')
    assert named.sanity[0].modes == ("cascading", "independent") and named.sanity[0].methods == ()
    # --set reaches both, and null turns them off
    changed = load_config("smoke", ["road.images=5", "sanity.multi_pass.stages=4",
                                    "sanity.extra.methods=[gradcam]"])
    assert changed.road.images == 5 and changed.road.fractions == (0.1, 0.5, 0.9)
    assert changed.sanity[1].stages == 4 and changed.sanity[2].name == "extra"
    assert changed.sanity[2].images is None and changed.sanity[2].granularity == "block"
    assert [s.name for s in load_config("smoke", ["sanity.multi_pass=null"]).sanity] == ["single_pass"]
    off = load_config("smoke", ["road=null", "sanity=null"])
    assert off.road is None and off.sanity == ()
    on = load_config("smoke", ["road=null", "road.images=1"])
    assert on.road.images == 1 and on.road.fractions == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    assert load_config("smoke", ["sanity=null", "sanity.all.images=1"]).sanity[0].name == "all"
    for name in SHIPPED:
        shipped = load_config(name)
        assert config_from_dict(shipped.to_dict()) == shipped
        # the base rows' config carries neither: changing them never changes a study of the rows table
        assert shipped.base().road is None and shipped.base().sanity == ()
        assert all(s.config.road is None and s.config.sanity == () for s in expand(shipped))


@pytest.mark.parametrize(("override", "message"), [
    ("road.images=0", "road.images must be >= 1"),
    ("road.fractions=[0.5, 0.2]", r"road.fractions must be strictly increasing, got \[0.5, 0.2\]"),
    ("road.fractions=[0.1, 1.0]", r"road.fractions must be numbers in \[0, 1\)"),
    ("road.fractions=[]", "road.fractions must be a non-empty list"),
    ("road.colour=red", "unknown key 'road.colour'"),
    ("road=3", "road must be a mapping"),
    ("sanity=[gradcam]", "sanity must be a mapping of subset name"),
    ("sanity.multi_pass.modes=[sideways]", "sanity.multi_pass.modes must be one of cascading, independent"),
    ("sanity.multi_pass.modes=[cascading, cascading]", "sanity.multi_pass.modes lists a mode twice"),
    ("sanity.multi_pass.granularity=leaf", "sanity.multi_pass.granularity must be one of block, module"),
    ("sanity.multi_pass.granularity=[]", "sanity.multi_pass.granularity must be one of block, module or a"),
    ("sanity.multi_pass.methods=[fancycam]", "unknown method 'fancycam'"),
    ("sanity.multi_pass.stages=0", "sanity.multi_pass.stages must be >= 1"),
    ("sanity.multi_pass.images=two", "sanity.multi_pass.images must be an integer"),
    ("sanity.multi_pass.layers=3", "unknown key 'layers' in sanity.multi_pass"),
])
def test_bad_road_and_sanity_settings_name_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", [override])


def test_spread_stages_keep_the_first_and_the_fully_randomised_stage() -> None:
    from iscam.sanity import randomisation_stages, spread_positions, spread_stages

    assert spread_positions(15, 4) == [1, 6, 10, 15]  # 1 + 14 * i / 3, rounded half up
    assert spread_positions(15, 3) == [1, 8, 15] and spread_positions(15, 2) == [1, 15]
    assert spread_positions(15, 1) == [15]
    assert spread_positions(4, None) == spread_positions(4, 9) == [1, 2, 3, 4]
    assert spread_positions(16, 5) == [1, 5, 9, 12, 16]  # 3.75 -> 4, 7.5 -> 8, 11.25 -> 11
    for total in range(1, 30):
        for count in range(1, total + 1):
            positions = spread_positions(total, count)
            assert len(positions) == count and positions == sorted(set(positions)), (total, count)
            assert positions[-1] == total and (count == 1 or positions[0] == 1)
    stages = spread_stages(randomisation_stages(["a", "b", "c", "d"]), 2)
    assert [(s.mode, s.index, s.layers) for s in stages] == [
        ("cascading", 1, ("d",)), ("cascading", 4, ("d", "c", "b", "a")),
        ("independent", 1, ("d",)), ("independent", 4, ("a",))]
    with pytest.raises(ValueError, match="count must be a positive int"):
        spread_positions(4, 0)


def test_sanity_checks_on_too_small_an_input_are_refused_before_any_work() -> None:
    with pytest.raises(ConfigError, match=r"sanity: maps of 32x32 pixels are too small.*--set sanity=null"):
        check_methods(load_config("smoke", ["model.input_size=32"]))
    check_methods(load_config("smoke", ["model.input_size=32", "sanity=null"]))
