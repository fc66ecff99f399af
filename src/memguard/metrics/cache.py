"""Networks memguard trains for its measures (the benchmark's judge, the audit's trained feature
extractor), cached under the memguard cache (`MEMGUARD_CACHE`, default ~/.cache/memguard), one
file per spec named by a hash of the spec: a second run with the same spec loads what the first
trained, and any change to the spec (a field, a data hash, a version) trains anew."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from memguard.data.text import default_cache_dir
from memguard.io import atomic_path


def spec_key(spec: Any) -> str:
    """A short hash of a dataclass spec's fields: the name of what was trained from it."""
    return hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:20]


def cache_path(kind: str, spec: Any, cache_dir: str | Path | None = None) -> Path:
    """Where the network of `spec` is cached: `cache_dir/kind/<spec_key>.pt`."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / kind / f"{spec_key(spec)}.pt"


def load_or_train(
    kind: str,
    spec: Any,
    train: Callable[[], dict[str, Any]],
    cache_dir: str | Path | None = None,
) -> tuple[dict[str, Any], bool]:
    """The saved dict (tensors and plain values) of `spec`: loaded from the cache, or made by
    `train()` and written there atomically; and whether it was loaded."""
    path = cache_path(kind, spec, cache_dir)
    if path.is_file():
        return torch.load(path, weights_only=True), True
    saved = train()
    with atomic_path(path) as partial:
        torch.save(saved, partial)
    return saved, False
