"""The one check every config section uses: a condition, or a `ConfigError` naming the field."""

from __future__ import annotations

from agpo_megatron.config.yaml_io import ConfigError


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)
