"""The one YAML reader: a config dataclass from ``--config FILE.yaml`` plus flags (flags win),
through ``transformers.HfArgumentParser`` (every field a flag, spelled with underscores or
hyphens)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import yaml

logger = logging.getLogger("prlhf")


class ConfigError(ValueError):
    pass


def read_yaml_config(path: Path) -> dict:
    """A YAML config file as a mapping, with errors naming the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    return data


def _to_flags(key: str, value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, bool):
        return [f"--{key}", "true" if value else "false"]
    if isinstance(value, (list, tuple)):
        return [f"--{key}", *map(str, value)]
    if isinstance(value, dict):
        return [f"--{key}", json.dumps(value)]
    return [f"--{key}", str(value)]


def parse_config(cls, argv: list[str], ignore: set[str] = frozenset(), prog: str | None = None):
    """A config dataclass from ``--config file.yaml`` plus ``--field value`` flags (flags win).
    YAML keys in ``ignore`` are skipped (one recipe serves ``sft`` and ``train``); other unknown
    keys are errors."""
    from transformers import HfArgumentParser

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    flags: list[str] = []
    if known.config:
        path = Path(known.config)
        data = read_yaml_config(path)
        names = {f.name for f in dataclasses.fields(cls)}
        skipped = sorted(k for k in data if k not in names and k in ignore)
        if skipped:
            logger.info("%s: %s ignores the keys %s", path, cls.__name__, ", ".join(skipped))
        for key, value in data.items():
            if key in skipped:
                continue
            if key not in names:
                raise ConfigError(f"{path}: unknown config key '{key}' for {cls.__name__}")
            flags += _to_flags(key, value)
    parser = HfArgumentParser(cls, prog=prog, description=(cls.__doc__ or "").strip())
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="read these keys from a YAML file (its keys are the flags, with underscores); flags given "
                             "on the command line win")
    try:
        (cfg, _) = parser.parse_args_into_dataclasses(args=flags + rest)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return cfg
