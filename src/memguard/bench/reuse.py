"""When a run of a benchmark grid is reused, resumed or trained again, and when its audit is.

A run folder is the model folder of one arm at one seed. Its training is

- *reused* when `memguard.json` (written last, when the model is complete) records the same
  TrainConfig and the same SHA-256 of the training data;
- *resumed* when the folder was begun for that config and data (`bench_run.json`, written
  before the first step) but holds no finished model: the config asks for
  `resume_from_checkpoint: latest`, so training goes on from the last checkpoint if any;
- *trained* otherwise, after the folder is emptied: checkpoints of other settings must never
  be resumed, and a model of other settings must not stand for this one.

A run that starts `from` another arm's model records that model's `memguard.json` (its SHA-256)
too: when the source is trained again, so is the run. A mitigation arm's folder (`memguard
mitigate`'s output) is reused when complete and recorded for the same MitigateConfig and
source, and otherwise emptied and written again.

Its audit (`audit/results.json`) is reused when it records the same AuditConfig (the device
aside: training does not record its device either), the same judge and the model's config and
data.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from memguard.audit import RESULTS_FILE
from memguard.config import AuditConfig, MitigateConfig, TrainConfig, to_dict, with_defaults
from memguard.defenses.base import Defense
from memguard.defenses.registry import defense_settings, settings_with_defaults
from memguard.io import METADATA_FILE, write_json
from memguard.metrics.judge import JudgeSpec

INTENT_FILE = "bench_run.json"
REUSE, RESUME, TRAIN = "reused", "resumed", "trained"


def _plain(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value, default=str))


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def model_sha256(folder: str | Path) -> str:
    """The SHA-256 of a finished model folder's memguard.json (it changes when it is retrained)."""
    return hashlib.sha256((Path(folder) / METADATA_FILE).read_bytes()).hexdigest()


def _intent(
    config: TrainConfig, defenses: list[Defense], data_sha256: str, source: str | None
) -> dict:
    return {
        "config": _plain(to_dict(config)),
        "defenses": _plain([defense_settings(d) for d in defenses]),
        "data_sha256": data_sha256,
        **({"source_sha256": source} if source is not None else {}),
    }


def _recorded_settings(recorded: list | None, defenses: list[Defense]) -> list | None:
    """The defenses' settings recorded for a run, each flag added since at its default."""
    if recorded is None or len(recorded) != len(defenses):
        return recorded
    return [settings_with_defaults(d, r) for d, r in zip(defenses, recorded, strict=True)]


def _begin(run: Path, intent: dict) -> None:
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    write_json(run / INTENT_FILE, intent)


def plan_training(
    config: TrainConfig, defenses: list[Defense], data_sha256: str, source: str | None = None
) -> str:
    """REUSE, RESUME or TRAIN for the run folder `config.output_dir` (see the module);
    `source`: the model_sha256 of the model it starts from, if another arm's."""
    run = Path(config.output_dir)
    intent = _intent(config, defenses, data_sha256, source)
    metadata = _read(run / METADATA_FILE)
    written = _read(run / INTENT_FILE)
    finished = None if metadata is None else {
        "config": with_defaults(TrainConfig, metadata.get("config")),
        "defenses": _recorded_settings(
            [r.get("settings") for r in metadata.get("defenses", [])], defenses
        ),
    }  # fmt: skip
    if (
        finished is not None
        and finished["config"] == intent["config"]
        and finished["defenses"] == intent["defenses"]
        and metadata.get("data", {}).get("sha256") == data_sha256
        and (source is None or (written or {}).get("source_sha256") == source)
    ):
        return REUSE
    if written is not None:
        written["config"] = with_defaults(TrainConfig, written.get("config"))
        written["defenses"] = _recorded_settings(written.get("defenses"), defenses)
    return RESUME if written == intent else TRAIN


def begin_training(
    config: TrainConfig, defenses: list[Defense], data_sha256: str, source: str | None = None
) -> None:
    """Empty the run folder and record the settings and data it is for."""
    _begin(Path(config.output_dir), _intent(config, defenses, data_sha256, source))


def _mitigation_intent(config: MitigateConfig, source: str) -> dict:
    settings = _plain(to_dict(config))
    settings.pop("device")
    return {"mitigate": settings, "source_sha256": source}


def mitigation_reusable(config: MitigateConfig, source: str) -> bool:
    """Whether `config.output_dir` holds a finished mitigation of this source, these settings."""
    run = Path(config.output_dir)
    written = _read(run / INTENT_FILE)
    if written is not None:
        written["mitigate"] = with_defaults(MitigateConfig, written.get("mitigate"))
        written["mitigate"].pop("device", None)
    return (run / METADATA_FILE).is_file() and written == _mitigation_intent(config, source)


def begin_mitigation(config: MitigateConfig, source: str) -> None:
    """Empty the mitigation's folder and record the settings and source it is for."""
    _begin(Path(config.output_dir), _mitigation_intent(config, source))


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
