"""Command-line overrides checked before Hydra starts the run, so that every config error, whatever layer finds
it (the override grammar, Hydra's composition, OmegaConf's types, scimoe's checks), ends the same way:
`scimoe-train: config error at 'KEY' (override 'TEXT'): why`, exit code 2, no traceback.

Used by `scimoe-train` (scimoe/train/__main__.py); tested by `python -m pytest tests/test_config.py`.
"""
from __future__ import annotations

import re

from scimoe.config import ConfigError

_FLAGS_WITH_VALUES = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun")
_NO_RUN = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve", "--version")


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def name_override(message: str, overrides: list[str]) -> str:
    """`message` with the command-line override that set the key it names, when there is one (the last one that
    names it: that is the one Hydra applied)."""
    match = re.search(r"config error at '([^']+)'", message)
    if not match:
        return message
    key = match.group(1)
    last_first = overrides[::-1]
    source = next((o for o in last_first if _key(o) == key), None) or \
        next((o for o in last_first if key.startswith(_key(o) + ".")), None)
    if source is None:
        return message
    return message.replace(f"config error at '{key}'", f"config error at '{key}' (override '{source}')", 1)


def check_command_line(args: list[str]) -> None:
    """Raise ConfigError for the first override that cannot be parsed, composed or validated. Sweeps
    (`-m`) are only parsed here: each job of the sweep validates its own config."""
    if any(a in _NO_RUN or a in _FLAGS_WITH_VALUES or a.startswith("--config") for a in args):
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in args if not a.startswith("-")]
    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except Exception as err:  # noqa: BLE001 (Hydra's parse errors share no useful base class)
            raise ConfigError(f"config error: cannot parse the override '{override}': {str(err).splitlines()[0]}") \
                from None
    if "-m" in args or "--multirun" in args:
        return
    from scimoe.config import compose_config

    ours = [o for o in overrides if not _key(o).startswith(("hydra.", "hydra/"))]
    try:
        compose_config(ours)
    except ConfigError as err:
        raise ConfigError(name_override(str(err), ours)) from None
    except Exception as err:  # noqa: BLE001 (Hydra / OmegaConf composition errors)
        cause = err.__cause__ or err
        key = getattr(cause, "full_key", None) or _guess_key(str(err), ours)
        why = str(cause).splitlines()[0]
        if key:
            raise ConfigError(name_override(f"config error at '{key}': {why}", ours)) from None
        raise ConfigError(f"config error: {why}") from None


def _guess_key(message: str, overrides: list[str]) -> str | None:
    """The key of the override a Hydra message quotes (e.g. "Could not find 'model/nope'")."""
    for override in overrides:
        key = _key(override)
        if key and (f"'{key}/" in message or f"'{key}'" in message or override in message):
            return key
    return None
