"""The data of a benchmark grid: the shapes benchmark once per data seed, and filtered copies.

`benchmark_data` builds the data for a seed, or reuses the folder when its `dataset.json`
records the same ShapesConfig and declares the benchmark (it is written last, so a killed build
is rebuilt from scratch; a folder written before the declaration or before `prompts/memorized.txt`
existed is rebuilt, the same data).
`drop_rows` writes a copy of a training folder without the images whose metadata matches
(an arm's `drop_where`), once, under a name given by the rule.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from memguard.config import ConfigError, ShapesConfig, to_dict, with_defaults
from memguard.data.folder import METADATA
from memguard.data.shapes import BENCHMARK, MEMORIZED_FILE, make_shapes_dataset


def benchmark_data(config: ShapesConfig) -> Path:
    """The benchmark folder of `config`, built unless already there with the same config."""
    root = Path(config.output_dir)
    summary = root / "dataset.json"
    written = json.loads(summary.read_text()) if summary.is_file() else {}
    recorded = with_defaults(ShapesConfig, written.get("config"))
    complete = (
        written.get("benchmark") == BENCHMARK and (root / "prompts" / MEMORIZED_FILE).is_file()
    )
    if recorded == to_dict(config) and complete:
        return root
    if root.exists():
        shutil.rmtree(root)
    return make_shapes_dataset(config)


def drop_rows(train_dir: Path, where: Mapping[str, Any]) -> Path:
    """`train_dir` without the rows whose columns equal every value of `where`, written beside
    it (as `train-drop-<hash of the rule>`) on first use."""
    rule = json.dumps(dict(where), sort_keys=True)
    output = train_dir.with_name(f"train-drop-{hashlib.sha256(rule.encode()).hexdigest()[:10]}")
    if output.is_dir():
        return output
    rows = [(line, json.loads(line)) for line in (train_dir / METADATA).read_text().splitlines()]
    kept = [(line, row) for line, row in rows if not all(row.get(k) == v for k, v in where.items())]
    if len(kept) in (0, len(rows)):
        raise ConfigError(
            f"drop_where {rule} drops {len(rows) - len(kept)} of the {len(rows)} images of "
            f"{train_dir}; a rule that drops none or all is a mistake"
        )
    partial = output.with_name(output.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    for _, row in kept:
        shutil.copyfile(train_dir / row["file_name"], partial / row["file_name"])
    (partial / METADATA).write_text("".join(line + "\n" for line, _ in kept))
    os.replace(partial, output)
    return output
