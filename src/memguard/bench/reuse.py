"""When a run of a benchmark grid is reused, resumed or trained again, and when its audit is.

A run folder is the model folder of one arm at one seed. Its training is

- *reused* when `memguard.json` (written last, when the model is complete) records the same
  TrainConfig and the same SHA-256 of the training data;
- *resumed* when the folder was begun for that config and data (`bench_run.json`, written
  before the first step) but holds no finished model: the config asks for
  `resume_from_checkpoint: latest`, so training goes on from the last checkpoint if any;
- *trained* otherwise, after the folder is emptied: checkpoints of other settings must never
  be resumed, and a model of other settings must not stand for this one.

Its audit (`audit/results.json`) is reused when it records the same AuditConfig (the device
aside: training does not record its device either), the same judge and the model's config and
data.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from memguard.audit import RESULTS_FILE
from memguard.config import AuditConfig, TrainConfig, to_dict, with_defaults
from memguard.defenses.base import Defense
from memguard.defenses.registry import defense_settings
from memguard.io import METADATA_FILE, write_json
from memguard.metrics.judge import JudgeSpec

INTENT_FILE = "bench_run.json"
REUSE, RESUME, TRAIN = "reused", "resumed", "trained"


def _plain(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value, default=str))


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _intent(config: TrainConfig, defenses: list[Defense], data_sha256: str) -> dict:
    return {
        "config": _plain(to_dict(config)),
        "defenses": _plain([defense_settings(d) for d in defenses]),
        "data_sha256": data_sha256,
    }


def plan_training(config: TrainConfig, defenses: list[Defense], data_sha256: str) -> str:
    """REUSE, RESUME or TRAIN for the run folder `config.output_dir` (see the module)."""
    run = Path(config.output_dir)
    intent = _intent(config, defenses, data_sha256)
    metadata = _read(run / METADATA_FILE)
    if (
        metadata is not None
        and with_defaults(TrainConfig, metadata.get("config")) == intent["config"]
        and [r.get("settings") for r in metadata.get("defenses", [])] == intent["defenses"]
        and metadata.get("data", {}).get("sha256") == data_sha256
    ):
        return REUSE
    written = _read(run / INTENT_FILE)
    if written is not None:
        written["config"] = with_defaults(TrainConfig, written.get("config"))
    return RESUME if written == intent else TRAIN


def begin_training(config: TrainConfig, defenses: list[Defense], data_sha256: str) -> None:
    """Empty the run folder and record the settings and data it is for."""
    run = Path(config.output_dir)
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    write_json(run / INTENT_FILE, _intent(config, defenses, data_sha256))


def audit_reusable(config: AuditConfig, judge: JudgeSpec, model_metadata: dict) -> bool:
    """Whether `config.output_dir` holds an audit of this model with these settings."""
    results = _read(Path(config.output_dir) / RESULTS_FILE)
    if results is None:
        return False
    settings = _plain(to_dict(config))
    recorded = with_defaults(AuditConfig, results.get("settings", {}))
    settings.pop("device")
    recorded.pop("device", None)
    trained = results.get("model_training", {})
    return (
        recorded == settings
        and results.get("benchmark", {}).get("judge", {}).get("spec") == asdict(judge)
        and trained.get("config") == model_metadata.get("config")
        and trained.get("data") == model_metadata.get("data")
    )
