"""docker/Dockerfile and its build-context filter agree with the package list in pyproject.toml.

The images copy each package by name; the context filter (``docker/Dockerfile.dockerignore``)
excludes everything and re-includes what the build needs. When the CLI moved to ``cli/`` the
Dockerfile gained ``COPY cli ./cli`` but the filter did not re-include it, and every image build
failed at that step; these checks catch that without a container engine.
"""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
IGNORE = ROOT / "docker" / "Dockerfile.dockerignore"


def packages() -> list[str]:
    """Top-level packages setuptools installs (``include = ["cli*", ...]``)."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return sorted(p.rstrip("*") for p in meta["tool"]["setuptools"]["packages"]["find"]["include"])


def context_copies() -> list[str]:
    """Sources of the Dockerfile's ``COPY`` lines that read the build context."""
    sources: list[str] = []
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if not words or words[0] != "COPY" or any(w.startswith("--from") for w in words):
            continue
        sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def included(path: str, rules: list[str]) -> bool:
    """Whether the filter keeps ``path``: the last matching rule wins, ``!`` re-includes
    (Docker's and podman's .dockerignore semantics for these simple patterns)."""
    keep = True
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule[1:] if negate else rule
        pattern = pattern.rstrip("/")
        if fnmatch.fnmatch(path, pattern) or (pattern == "**"):
            keep = negate
    return keep


def ignore_rules() -> list[str]:
    lines = (ln.strip() for ln in IGNORE.read_text().splitlines())
    return [ln for ln in lines if ln and not ln.startswith("#")]


def test_every_package_is_copied_into_the_image() -> None:
    copied = {Path(s).parts[0] for s in context_copies()}
    missing = [p for p in packages() if p not in copied]
    assert not missing, f"docker/Dockerfile copies no {missing}"


def test_every_copied_source_passes_the_context_filter() -> None:
    rules = ignore_rules()
    assert rules[0] == "**", "the filter is expected to exclude everything first"
    dropped = [s for s in context_copies() if not included(s, rules)]
    assert not dropped, f"docker/Dockerfile.dockerignore filters out {dropped}"


def test_the_filter_check_sees_a_missing_package() -> None:
    rules = [r for r in ignore_rules() if r != "!cli/"]
    assert not included("cli", rules)
    assert included("cli", ignore_rules())
