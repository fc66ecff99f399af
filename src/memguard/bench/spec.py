"""A benchmark spec (`configs/bench/NAME.yaml`): the arms, seeds, data and audit of one grid.

The YAML keys are those of `SpecFile`; `load_spec` checks every key and value, and builds the
TrainConfig of every arm, the AuditConfig, the ShapesConfig and the judge's spec once with
placeholder paths, so that a typo fails before anything is trained. An error names the key and
the file.

An arm is a mapping of `memguard train` settings (TrainConfig keys, over the base) plus the
keys in `ARM_KEYS` that the harness itself interprets:

- `drop_where: {column: value, ...}`: train on a copy of the training folder without the images
  whose metadata matches every pair (the oracle arm: `drop_where: {has_concept: true}`).
- `from: ARM`: start from the model of another arm (listed before this one) at the same seed:
  training fine-tunes it (`pretrained_model_name_or_path` is that run's folder), and
- `mitigate: {method: nemo, ...}` (`MitigateConfig` keys, with `from`): the arm is not trained
  but `memguard mitigate` applied to that model (NeMo or Wanda pruning of a plain model, say).

A training strategy that TrainConfig gains (`strategy: iet`, say) is a train setting like any
other and needs nothing here.

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
    FROM_SCRATCH_ONLY,
    AuditConfig,
    ConfigError,
    MitigateConfig,
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

ARM_KEYS = ("drop_where", "from", "mitigate")
ARM_NAME = re.compile(r"[A-Za-z0-9_.-]+")
DATA_PLACEHOLDER = "{data}"
PLACEHOLDER = "<the benchmark data>"  # the data folder when a spec's configs are checked
# Keys the harness sets for each run, so a spec may not.
HARNESS_KEYS = {
    "base": ("train_data_dir", "output_dir", "seed", "resume_from_checkpoint"),
    "data": ("output_dir", "seed"),
    "audit": ("model", "train_data_dir", "output_dir", "device"),
    "mitigate": ("model", "output_dir", "device"),
}


def _mapping(help: str) -> Any:
    return field(default_factory=dict, metadata={"help": help})


@dataclass(frozen=True)
class SpecFile:
    """The keys of a bench YAML file."""

    arms: dict[str, Any] = _mapping(
        "arm name -> its settings: TrainConfig keys over the base, drop_where, from, mitigate"
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
    source: str | None = None  # `from`: the arm whose model (same seed) this one starts from
    mitigate: dict[str, Any] = field(default_factory=dict)  # MitigateConfig settings, if any

    @property
    def settings(self) -> dict[str, Any]:
        """The arm as the spec gives it, for bench.json."""
        extra = {"from": self.source, "mitigate": self.mitigate} if self.source else {}
        return {"train": self.train, "drop_where": self.drop_where, **extra}


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

    def run_dir(self, root: str | Path, arm: str, seed: int) -> Path:
        """The model folder of an arm at a seed under a grid's output folder."""
        return Path(root) / "runs" / arm / f"seed-{seed}"

    def source_dir(self, arm: Arm, seed: int, output: str | Path) -> Path:
        """The model folder an arm starts `from`, beside its own `output` (ROOT/runs/ARM/seed-S)."""
        return self.run_dir(Path(output).parents[2], str(arm.source), seed)

    def train_config(
        self, arm: Arm, seed: int, data: str | Path, train_dir: str | Path, output: str | Path
    ) -> tuple[TrainConfig, list[Defense]]:
        """The run's TrainConfig and defenses: base, arm, then the harness's paths, seed and
        resumption. An arm `from` another fine-tunes that arm's model, which brings the
        settings of a model trained from scratch (the base's are left out)."""
        base = self.base
        if arm.source is not None:
            base = {k: v for k, v in base.items() if k not in FROM_SCRATCH_ONLY}
        values = with_data({**base, **arm.train}, data) | {
            "train_data_dir": str(train_dir),
            "output_dir": str(output),
            "seed": seed,
            "resume_from_checkpoint": "latest",
        }
        if arm.source is not None:
            values["pretrained_model_name_or_path"] = str(self.source_dir(arm, seed, output))
        return build_training(values, f"{self.path}: arms.{arm.name}")

    def mitigate_config(
        self, arm: Arm, seed: int, data: str | Path, output: str | Path, device: str | None
    ) -> MitigateConfig:
        """The MitigateConfig of a mitigation arm: its settings on its source arm's model."""
        values = with_data(arm.mitigate, data) | {
            "model": str(self.source_dir(arm, seed, output)),
            "output_dir": str(output),
            "device": device,
        }
        return build(MitigateConfig, values, f"{self.path}: arms.{arm.name}.mitigate")

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
        """The spec restricted to some arms (by name, with the arms they start `from`), with
        other seeds, or with the data of one seed for every run (None: as the spec says)."""
        names = [arm.name for arm in self.arms]
        unknown = sorted(set(arms or ()) - set(names))
        if unknown:
            raise ConfigError(f"--arms: {self.path} has no arm {unknown} (arms: {names})")
        wanted = set(names if arms is None else arms)
        for arm in reversed(self.arms):  # an arm's source runs too (sources come first)
            if arm.name in wanted and arm.source is not None:
                wanted.add(arm.source)
        chosen = tuple(a for a in self.arms if a.name in wanted)
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
    source, mitigate = train.pop("from", None), train.pop("mitigate", None)
    train = _train_settings(train, f"{where} (TrainConfig keys, or {', '.join(ARM_KEYS)})")
    if source is not None and not isinstance(source, str):
        raise ConfigError(f"{where}: from: expected an arm's name, got {source!r}")
    if source is not None and "pretrained_model_name_or_path" in train:
        raise ConfigError(
            f"{where}: pretrained_model_name_or_path: the arm starts from arm {source!r}'s model"
        )
    if mitigate is not None:
        if source is None:
            raise ConfigError(f"{where}: mitigate: name the arm whose model it prunes (from:)")
        if not isinstance(mitigate, Mapping):
            raise ConfigError(f"{where}: mitigate: expected a mapping of settings")
        if train or drop_where:
            raise ConfigError(
                f"{where}: a mitigate arm is not trained; move {sorted(train) or ['drop_where']} "
                f"to arm {source!r} or to an arm that trains"
            )
        _refuse_harness_keys("mitigate", mitigate, f"{where}: mitigate")
    if not isinstance(drop_where, Mapping):
        raise ConfigError(f"{where}: drop_where: expected {{column: value}}, got {drop_where!r}")
    for column, value in drop_where.items():
        if column not in COLUMNS:
            raise ConfigError(
                f"{where}: drop_where: unknown column '{column}' (columns: {', '.join(COLUMNS)})"
            )
        if isinstance(value, list | dict):
            raise ConfigError(f"{where}: drop_where: {column}: expected one value, got {value!r}")
    return Arm(name, train, dict(drop_where), source, dict(mitigate or {}))


def _check_sources(arms: tuple[Arm, ...], path: Path) -> None:
    """Every `from` names an arm listed before its own (the runner trains them in order)."""
    before: set[str] = set()
    for arm in arms:
        if arm.source is not None and arm.source not in before:
            raise ConfigError(
                f"{path}: arms.{arm.name}: from: {arm.source!r} is not an arm listed before it"
            )
        before.add(arm.name)


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
    _check_sources(spec.arms, path)
    # Every config once, with placeholder paths: a bad setting fails before any training.
    spec.shapes_config(0, PLACEHOLDER)
    for arm in spec.arms:
        run = spec.run_dir("OUT", arm.name, 0)
        if arm.mitigate:
            spec.mitigate_config(arm, 0, PLACEHOLDER, run, None)
            continue
        try:
            config, _ = spec.train_config(arm, 0, PLACEHOLDER, f"{PLACEHOLDER}/train", run)
        except FileNotFoundError as missing:  # a file of the data, which is not built yet
            if PLACEHOLDER not in str(missing):
                raise
            continue
        spec.judge_spec(config.resolution)
    spec.audit_config("MODEL", PLACEHOLDER, "AUDIT", None)
    return spec
