"""Run configuration: typed dataclasses, YAML/JSON files, dotted ``key=value`` overrides.

A config is data, never code. Three modules, importing one way (schema ← checks ← loading):

- :mod:`~danlu.config.schema`: the dataclasses, their defaults and help text, ``SECTIONS``,
  :func:`describe` for ``--help``;
- :mod:`~danlu.config.checks`: :func:`validate`, the cross-field rules types cannot express;
- :mod:`~danlu.config.loading`: :func:`load_config` (files, overrides, type coercion, errors
  with file:line and the closest key), :func:`save_config`, :func:`to_dict`.

Import from here: ``from danlu.config import load_config, Config``.
"""

from danlu.config.checks import validate
from danlu.config.loading import load_config, save_config, to_dict
from danlu.config.schema import (
    CONFIG_FILENAME,
    DEFAULT_MODEL,
    SECTIONS,
    Config,
    DataConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    TrainConfig,
    describe,
    opt,
)

__all__ = [
    "CONFIG_FILENAME",
    "DEFAULT_MODEL",
    "SECTIONS",
    "Config",
    "DataConfig",
    "LoraConfig",
    "ModelConfig",
    "OutputConfig",
    "TrainConfig",
    "describe",
    "load_config",
    "opt",
    "save_config",
    "to_dict",
    "validate",
]
