"""A benchmark spec (`configs/bench/NAME.yaml`): the arms, seeds, data and audit of one grid.

The YAML keys are those of `SpecFile`; `load_spec` checks every key and value, and builds the
TrainConfig of every arm, the AuditConfig, the ShapesConfig and the judge's spec once with
placeholder paths, so that a typo fails before anything is trained. An error names the key and
the file.

An arm is a mapping of `memguard train` settings (TrainConfig keys, over the base) plus the
keys in `ARM_KEYS` that the harness itself interprets:

- `drop_where: {column: value, ...}`: train on a copy of the training folder without the images
  whose metadata matches every pair (the oracle arm: `drop_where: {has_concept: true}`).

A training strategy that TrainConfig gains (`strategy: iet`, say) is a train setting like any
other and needs nothing here. A post-training step applied to another arm's model (pruning,
say) belongs in `ARM_KEYS` beside `drop_where`, as its own named, validated option.

In string settings, `{data}` stands for the folder of the benchmark data the run is trained on
(e.g. `concept_exemplars: "{data}/concept_exemplars"`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memguard.config import (
    AuditConfig,
    ConfigError,
    ShapesConfig,
    TrainConfig,
    build,
    load_yaml,
    option,
)
from memguard.data.shapes import COLUMNS
from memguard.defenses.base import Defense
from memguard.defenses.registry import build_training
from memguard.defenses.registry import flags as defense_flags
from memguard.metrics.judge import JudgeSpec

ARM_KEYS = ("drop_where",)
ARM_NAME = re.compile(r"[A-Za-z0-9_.-]+")
DATA_PLACEHOLDER = "{data}"
# Keys the harness sets for each run, so a spec may not.
HARNESS_KEYS = {
    "base": ("train_data_dir", "output_dir", "seed", "resume_from_checkpoint"),
    "data": ("output_dir", "seed"),
    "audit": ("model", "train_data_dir", "output_dir", "device"),
}


def _mapping(help: str) -> Any:
    return field(default_factory=dict, metadata={"help": help})


@dataclass(frozen=True)
class SpecFile:
    """The keys of a bench YAML file."""

    arms: dict[str, Any] = _mapping(
        "arm name -> its settings: TrainConfig keys over the base, and drop_where"
    )
    base: dict[str, Any] = _mapping(
        "TrainConfig keys every arm starts from; `config` names a train YAML file (relative to "
        "this file) read first, its seed and paths ignored"
    )
    data: dict[str, Any] = _mapping("ShapesConfig keys of the benchmark data")
    seeds: tuple[int, ...] = option((0, 1, 2), "seeds; each trains every arm once")
    data_seed: int | None = option(
        None, "the data seed of every run (default: each run's own seed, so both vary)"
    )
    audit: dict[str, Any] = _mapping("AuditConfig keys of every run's audit")
    judge: dict[str, Any] = _mapping(
        "JudgeSpec keys of the benchmark's judge (image_size defaults to the resolution)"
    )
    figures: dict[str, Any] = _mapping(
        "headline figures: dotted key into results.json -> label, or {label, format}"
    )


@dataclass(frozen=True)
class Figure:
    """A headline figure: a flattened key of a run's figures, its label and number format."""

    key: str
    label: str
    format: str = ".4g"  # Python format spec; '%' ones are rates in [0, 1]


DEFAULT_FIGURES = (
    Figure(
        "replication.by_prompt_kind.duplicated.replica_rate.rate", "duplicates replicated", ".1%"
    ),
    Figure("replication.by_prompt_kind.ordinary.replica_rate.rate", "ordinary replicated", ".1%"),
    Figure("detection.auc", "detection AUC", ".3f"),
    Figure("benchmark.quality.fid", "FID (judge)", ".2f"),
    Figure("benchmark.quality.kid_mean", "KID (judge)", ".4f"),
    Figure("benchmark.attribute_accuracy.all.rate", "attribute accuracy", ".1%"),
    Figure(
        "benchmark.attribute_accuracy_on_concept_captions.all.rate",
        "attribute accuracy, concept captions",
        ".1%",
    ),
    Figure("benchmark.concept_extraction.rates.naming_prompts.rate", "extraction: naming", ".1%"),
    Figure("benchmark.concept_extraction.rates.paraphrases.rate", "extraction: paraphrases", ".1%"),
    Figure(
        "benchmark.concept_extraction.rates.learned_embedding.rate", "extraction: embedding", ".1%"
    ),
    Figure(
        "benchmark.concept_extraction.rates.generic_base_rate.rate", "extraction: generic", ".1%"
    ),
    Figure("train_seconds", "train seconds", ".0f"),
)


@dataclass(frozen=True)
class Arm:
    """One arm of the grid: its train settings and the harness's own options (ARM_KEYS)."""

    name: str
    train: dict[str, Any]  # TrainConfig settings over the base
    drop_where: dict[str, Any]  # metadata column -> value of the training images left out


def with_data(settings: Mapping[str, Any], data: str | Path) -> dict[str, Any]:
    """`settings` with `{data}` in every string (and list of strings) replaced by `data`."""

    def one(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(DATA_PLACEHOLDER, str(data))
        if isinstance(value, list | tuple):
            return [one(v) for v in value]
        return value

    return {key: one(value) for key, value in settings.items()}


@dataclass(frozen=True)
class BenchSpec:
    """A loaded, validated spec; it makes each run's configs."""

    path: Path
    arms: tuple[Arm, ...]
    base: dict[str, Any]  # the base file's settings, then the base overrides
    data: dict[str, Any]
    seeds: tuple[int, ...]
    data_seed: int | None
    audit: dict[str, Any]
    judge: dict[str, Any]
    figures: tuple[Figure, ...]

    def data_seed_of(self, seed: int) -> int:
        return seed if self.data_seed is None else self.data_seed

    def shapes_config(self, data_seed: int, root: str | Path) -> ShapesConfig:
        values = {**self.data, "output_dir": str(root), "seed": data_seed}
        return build(ShapesConfig, values, f"{self.path}: data")

    def train_config(
        self, arm: Arm, seed: int, data: str | Path, train_dir: str | Path, output: str | Path
    ) -> tuple[TrainConfig, list[Defense]]:
        """The run's TrainConfig and defenses: base, arm, then the harness's paths, seed and
        resumption."""
        values = with_data({**self.base, **arm.train}, data) | {
            "train_data_dir": str(train_dir),
            "output_dir": str(output),
            "seed": seed,
            "resume_from_checkpoint": "latest",
        }
        return build_training(values, f"{self.path}: arms.{arm.name}")

    def audit_config(
        self, model: str | Path, data: str | Path, output: str | Path, device: str | None
    ) -> AuditConfig:
        """The AuditConfig of a run: measured against the full training split of its data."""
        values = with_data(self.audit, data) | {
            "model": str(model),
            "train_data_dir": str(Path(data) / "train"),
            "output_dir": str(output),
            "device": device,
        }
        return build(AuditConfig, values, f"{self.path}: audit")

    def judge_spec(self, resolution: int) -> JudgeSpec:
        """The judge at `resolution`, detecting the data's concept kind (set under `data:`)."""
        if "concept_kind" in self.judge:
            raise ConfigError(
                f"{self.path}: judge: concept_kind: set it under data: (the judge follows the data)"
            )
        kind = self.data.get("concept_kind", "fixed")
        values = {"image_size": resolution, "concept_kind": kind, **self.judge}
        return build(JudgeSpec, values, f"{self.path}: judge")

    def select(
        self,
        arms: list[str] | None = None,
        seeds: list[int] | None = None,
        data_seed: int | None = None,
    ) -> BenchSpec:
        """The spec restricted to some arms (by name), with other seeds, or with the data of
        one seed for every run (None: as the spec says)."""
        names = [arm.name for arm in self.arms]
        unknown = sorted(set(arms or ()) - set(names))
        if unknown:
            raise ConfigError(f"--arms: {self.path} has no arm {unknown} (arms: {names})")
        chosen = tuple(a for a in self.arms if arms is None or a.name in arms)
        seeds = self.seeds if seeds is None else tuple(dict.fromkeys(seeds))
        data_seed = self.data_seed if data_seed is None else data_seed
        return dataclasses.replace(self, arms=chosen, seeds=seeds, data_seed=data_seed)


# ------------------------------------------------------------------------------------ loading


def _refuse_harness_keys(section: str, values: Mapping[str, Any], where: str) -> None:
    for key in HARNESS_KEYS[section]:
        if key in values:
            raise ConfigError(f"{where}: '{key}' is set by memguard bench for each run")


def _train_settings(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`values` if every key is a `memguard train` setting (a TrainConfig key or a defense's
    flag) the harness leaves to the spec."""
    known = {f.name for f in dataclasses.fields(TrainConfig)} | set(defense_flags())
    for key in values:
        if key not in known:
            raise ConfigError(
                f"{where}: unknown key '{key}' (known keys: {', '.join(sorted(known))})"
            )
    _refuse_harness_keys("base", values, where)
    return dict(values)


def _base(file: SpecFile, path: Path) -> dict[str, Any]:
    overrides = dict(file.base)
    config = overrides.pop("config", None)
    values = {}
    if config is not None:
        config_path = path.parent / str(config)
        values = load_yaml(config_path)
        for key in HARNESS_KEYS["base"]:
            values.pop(key, None)
        _train_settings(values, str(config_path))
    return values | _train_settings(overrides, f"{path}: base")


def _arm(name: str, settings: Any, path: Path) -> Arm:
    where = f"{path}: arms.{name}"
    if not ARM_NAME.fullmatch(name):
        raise ConfigError(f"{where}: an arm's name is a folder name: letters, digits, _ . -")
    if not isinstance(settings, Mapping | None):
        raise ConfigError(f"{where}: expected a mapping of settings, got {settings!r}")
    train = dict(settings or {})
    drop_where = train.pop("drop_where", None) or {}
    train = _train_settings(train, f"{where} (TrainConfig keys, or {', '.join(ARM_KEYS)})")
    if not isinstance(drop_where, Mapping):
        raise ConfigError(f"{where}: drop_where: expected {{column: value}}, got {drop_where!r}")
    for column, value in drop_where.items():
        if column not in COLUMNS:
            raise ConfigError(
                f"{where}: drop_where: unknown column '{column}' (columns: {', '.join(COLUMNS)})"
            )
        if isinstance(value, list | dict):
            raise ConfigError(f"{where}: drop_where: {column}: expected one value, got {value!r}")
    return Arm(name, train, dict(drop_where))


def _figure(key: str, value: Any, path: Path) -> Figure:
    where = f"{path}: figures.{key}"
    settings = {"label": value} if isinstance(value, str) else value
    if not isinstance(settings, Mapping) or set(settings) - {"label", "format"}:
        raise ConfigError(f"{where}: expected a label, or {{label, format}}, got {value!r}")
    figure = Figure(key, str(settings.get("label", key)), str(settings.get("format", ".4g")))
    try:
        format(0.5, figure.format)
    except ValueError:
        raise ConfigError(f"{where}: format: {figure.format!r} is not a number format") from None
    return figure


def load_spec(path: str | Path) -> BenchSpec:
    """Read and validate a bench YAML file; a bad key or value is a ConfigError naming it."""
    path = Path(path)
    file = build(SpecFile, load_yaml(path), str(path))
    if not file.arms:
        raise ConfigError(f"{path}: arms: name at least one arm")
    if not file.seeds or len(set(file.seeds)) != len(file.seeds):
        raise ConfigError(f"{path}: seeds: give distinct seeds, at least one")
    for section in ("data", "audit"):
        _refuse_harness_keys(section, getattr(file, section), f"{path}: {section}")
    spec = BenchSpec(
        path=path,
        arms=tuple(_arm(str(name), settings, path) for name, settings in file.arms.items()),
        base=_base(file, path),
        data=file.data,
        seeds=file.seeds,
        data_seed=file.data_seed,
        audit=file.audit,
        judge=file.judge,
        figures=tuple(_figure(str(k), v, path) for k, v in file.figures.items()) or DEFAULT_FIGURES,
    )
    # Every config once, with placeholder paths: a bad setting fails before any training.
    spec.shapes_config(0, "DATA")
    for arm in spec.arms:
        config, _ = spec.train_config(arm, 0, "DATA", "DATA/train", "RUN")
        spec.judge_spec(config.resolution)
    spec.audit_config("MODEL", "DATA", "AUDIT", None)
    return spec
