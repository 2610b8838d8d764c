"""The run options as command-line flags, derived from ``RunConfig``'s option table."""

from __future__ import annotations

import argparse
from enum import StrEnum
from typing import Any

from coordinator.config import RunConfig, key_of


def add_run_options(p: argparse.ArgumentParser) -> None:
    """One flag per option of ``RunConfig`` (the option table): ``--KEY`` (plus its aliases),
    typed from the field, a switch for a bool, the default and help from the field."""
    defaults = RunConfig().to_mapping()
    types = RunConfig.types()
    for f in RunConfig.options():
        if not f.metadata.get("cli", True):
            continue
        key = key_of(f.name)
        flags = (f"--{key}", *f.metadata.get("aliases", ()))
        help_text = f.metadata.get("help", "")
        kind = types[f.name]
        if kind is bool:
            p.add_argument(*flags, dest=key, action="store_const", const=True, default=None,
                           help=help_text)  # fmt: skip
            continue
        shown = defaults[key]
        p.add_argument(
            *flags,
            dest=key,
            type=str if issubclass(kind, StrEnum) else kind,
            default=None,
            help=f"{help_text} (default: {shown if shown != '' else 'none'})",
        )


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = [key_of(f.name) for f in RunConfig.options() if f.metadata.get("cli", True)]
    return {key: getattr(args, key) for key in keys if getattr(args, key, None) is not None}
