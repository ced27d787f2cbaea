"""The one gate through which a config may name code to run: an allow-list of import paths.

Tested by `python -m pytest tests/test_config.py tests/rl/test_rewards.py`. A config value such as `data.source` may be a
short alias (`text`) or a dotted path (`mypkg.sources.make_rows`); dotted paths load only when they
start with an allowed prefix: `scimoe.` plus the comma-separated prefixes in the environment variable
SCIMOE_ALLOWED_TARGETS (so a YAML file alone can never make a run import arbitrary code).
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Mapping

from scimoe.config import ConfigError

BUILTIN_PREFIXES = ("scimoe.",)


def allowed_prefixes() -> tuple[str, ...]:
    extra = [p.strip() for p in os.environ.get("SCIMOE_ALLOWED_TARGETS", "").split(",") if p.strip()]
    return BUILTIN_PREFIXES + tuple(p if p.endswith(".") else p + "." for p in extra)


def resolve_target(name: str, key: str, aliases: Mapping[str, str] | None = None) -> Callable[..., Any]:
    """The callable behind `name` (an alias or an allowed dotted path); `key` names the config key."""
    path = (aliases or {}).get(name, name)
    if not path.startswith(allowed_prefixes()):
        known = ", ".join(sorted(aliases or {})) or "none"
        raise ConfigError(f"config error at '{key}': '{name}' is neither a known name ({known}) nor under an "
                         f"allowed prefix {allowed_prefixes()} (extend with SCIMOE_ALLOWED_TARGETS)")
    module_name, _, attr = path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"config error at '{key}': cannot import '{path}': {err}") from err
    if not callable(target):
        raise ConfigError(f"config error at '{key}': '{path}' is not callable")
    return target
