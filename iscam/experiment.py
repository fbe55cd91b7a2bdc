"""The names of the former ``iscam.experiment`` module, kept importable for existing scripts.

The run schema lives in :mod:`iscam.config`, the runner in :mod:`iscam.runner` and provenance in
:mod:`iscam.provenance`; import from there in new code.
"""

from __future__ import annotations

from .config import (
    CONFIG_DIR,
    ConfigError,
    DataSpec,
    ExperimentConfig,
    MethodSpec,
    MetricsSpec,
    ModelSpec,
    apply_overrides,
    config_from_dict,
    config_names,
    default_output,
    find_config,
    image_seed,
    load_config,
    method_key,
    method_kwargs,
    parse_override,
    resolved_params,
    select_indices,
)
from .runner import RunSummary, run

__all__ = [
    "CONFIG_DIR",
    "ConfigError",
    "DataSpec",
    "ExperimentConfig",
    "MethodSpec",
    "MetricsSpec",
    "ModelSpec",
    "RunSummary",
    "apply_overrides",
    "config_from_dict",
    "config_names",
    "default_output",
    "find_config",
    "image_seed",
    "load_config",
    "method_key",
    "method_kwargs",
    "parse_override",
    "resolved_params",
    "run",
    "select_indices",
]
