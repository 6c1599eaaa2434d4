"""Typed configs of every job (pydantic): YAML recipes + dotted `--set` overrides, errors that name the field.

One module per job (`pretrain`, `linear`, `detect`, `sweep`) and `common` for what they share.
"""

from .common import ConfigError, DataConfig, RunConfig, TrackingConfig, build, dump_yaml, flatten
from .detect import DetectConfig, load_detect_config
from .linear import LinearConfig, load_linear_config
from .pretrain import PretrainConfig, PretrainDataConfig, load_config
from .sweep import SweepConfig, load_sweep_config

__all__ = [
    "ConfigError",
    "DataConfig",
    "DetectConfig",
    "LinearConfig",
    "PretrainConfig",
    "PretrainDataConfig",
    "RunConfig",
    "SweepConfig",
    "TrackingConfig",
    "build",
    "dump_yaml",
    "flatten",
    "load_detect_config",
    "load_config",
    "load_linear_config",
    "load_sweep_config",
]
