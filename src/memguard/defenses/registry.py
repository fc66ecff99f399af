"""The defenses `memguard train --defense NAME` attaches, found in one place.

Each defense has its own settings dataclass (`config_class`), whose fields carry the flag (and
YAML key) that sets them; a defense with modes (gradient projection) has one class, and one
settings dataclass, per mode, chosen by its mode flag. Settings are validated when a defense is
built: a flag of a defense the run does not attach, or of another mode, is an error naming it.
Each attached defense is recorded in `memguard.json` as its name and settings (and its report),
from which `rebuild` makes it again. Most are attached by `--defense NAME`; threshold-aware
augmentation by `--augment taa`; adversarial fine-tuning by `--defense adversarial` or by
`--strategy adversarial` (plain training with it attached). A defense that reads another (TAA
reads AGC) names it in `needs`: building it without that one is an error, and it is connected
to it once built.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from memguard.config import ConfigError, TrainConfig, build
from memguard.defenses.adversarial import AdversarialFineTuning
from memguard.defenses.agc import AntiGradientControl
from memguard.defenses.base import Defense
from memguard.defenses.projection_feature import FeatureProjection
from memguard.defenses.projection_image import ImageProjection
from memguard.defenses.projection_patch import PatchProjection
from memguard.defenses.projection_text import TextProjection
from memguard.defenses.taa import ThresholdAwareAugmentation


@dataclass(frozen=True)
class DefenseKind:
    """A name `--defense` accepts, and its class (per mode, chosen by `mode_flag`)."""

    name: str
    classes: dict[str, type[Defense]]  # by mode; a defense without modes has one, under ""
    mode_flag: str | None = None
    mode_help: str = ""
    attached_by: str = "defense"  # the TrainConfig key that attaches it: --defense, --augment

    @property
    def flag(self) -> str:
        """How a run attaches it: '--defense agc', '--augment taa'."""
        return f"--{self.attached_by} {self.name}"

    @property
    def default_mode(self) -> str:
        return next(iter(self.classes))


KINDS: dict[str, DefenseKind] = {
    kind.name: kind
    for kind in (
        DefenseKind("agc", {"": AntiGradientControl}),
        DefenseKind(
            "projection",
            {
                "text": TextProjection,
                "feature": FeatureProjection,
                "image": ImageProjection,
                "patch": PatchProjection,
            },
            mode_flag="projection_mode",
            mode_help="projection: guard cross-attention keys/values (text) or image-feature "
            "layers (feature), neither of which keeps the benchmark's logo out; project the "
            "prediction's gradient off the concept's one footprint (image: a concept with a fixed "
            "place only, refuses others) or off each image's own footprint found by a patch "
            "detector (patch: keeps a fixed or moving logo out; lets a texture such as acme "
            "hatching partly through, README 'Concepts that move')",
        ),
        DefenseKind("taa", {"": ThresholdAwareAugmentation}, attached_by="augment"),
        DefenseKind("adversarial", {"": AdversarialFineTuning}),
    )
}


@dataclass(frozen=True)
class Flag:
    """A command-line flag (and YAML key) of some defense."""

    name: str
    annotation: Any
    default: Any
    help: str
    choices: tuple[str, ...] | None = None


def _flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or field.name


def flags() -> dict[str, Flag]:
    """Every defense flag, by name (a flag several modes share appears once)."""
    found: dict[str, Flag] = {}
    for kind in KINDS.values():
        if kind.mode_flag:
            found[kind.mode_flag] = Flag(
                kind.mode_flag, str, kind.default_mode, kind.mode_help, tuple(kind.classes)
            )
        for cls in kind.classes.values():
            hints = typing.get_type_hints(cls.config_class)
            for field in dataclasses.fields(cls.config_class):
                meta = field.metadata
                found.setdefault(
                    _flag_of(field),
                    Flag(_flag_of(field), hints[field.name], field.default, meta["help"],
                         meta.get("choices")),
                )  # fmt: skip
    return found


def split_settings(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(TrainConfig keys, defense flags) of a run's settings; other keys stay with the first,
    where `build` names them as unknown."""
    defense_flags = flags()
    train = {k: v for k, v in values.items() if k not in defense_flags}
    return train, {k: v for k, v in values.items() if k in defense_flags}


def _owners(flag: str) -> list[tuple[DefenseKind, str]]:
    """(kind, mode) pairs whose settings include `flag`."""
    return [
        (kind, mode)
        for kind in KINDS.values()
        for mode, cls in kind.classes.items()
        if flag == kind.mode_flag
        or flag in {_flag_of(f) for f in dataclasses.fields(cls.config_class)}
    ]


def _mode(kind: DefenseKind, settings: dict[str, Any]) -> str:
    mode = str(settings.get(kind.mode_flag, kind.default_mode)) if kind.mode_flag else ""
    if mode not in kind.classes:
        raise ConfigError(f"{kind.mode_flag}: {mode!r} is not one of {', '.join(kind.classes)}")
    return mode


def build_defenses(
    names: tuple[str, ...], settings: dict[str, Any], run: TrainConfig, source: str = "config"
) -> list[Defense]:
    """The defenses `names` (the run's `--defense` flags) built from the defense `settings`
    (flag -> value) for the run `run`; every setting must belong to one of them."""
    unknown = [name for name in names if name not in KINDS]
    if unknown:
        raise ConfigError(f"{source}: defense: unknown {unknown} (known: {', '.join(KINDS)})")
    chosen = {name: _mode(KINDS[name], settings) for name in names}
    for flag in settings:
        owners = _owners(flag)
        if not any(kind.name in chosen for kind, _ in owners):
            needs = " or ".join(sorted({kind.flag for kind, _ in owners}))
            raise ConfigError(
                f"{source}: {flag}: a setting of {needs}, which this run does not use"
            )
        if not any(chosen.get(kind.name) == mode for kind, mode in owners):
            kind = owners[0][0]
            modes = ", ".join(sorted({mode for _, mode in owners}))
            raise ConfigError(
                f"{source}: {flag}: a setting of {kind.mode_flag} {modes}, not of "
                f"{kind.mode_flag} {chosen[kind.name]}"
            )
    built: dict[str, Defense] = {}
    for name, mode in chosen.items():
        cls = KINDS[name].classes[mode]
        if cls.needs_text and run.conditioning != "text":
            what = f"{KINDS[name].flag}" + (f" ({KINDS[name].mode_flag} {mode})" if mode else "")
            raise ConfigError(
                f"{source}: {what} works on text conditioning (caption states, prompts naming "
                f"the concept); this run has --conditioning {run.conditioning}"
            )
        fields = {_flag_of(f): f.name for f in dataclasses.fields(cls.config_class)}
        values = {fields[flag]: v for flag, v in settings.items() if flag in fields}
        built[name] = cls.for_run(build(cls.config_class, values, source=source), run)
    for name, defense in built.items():
        missing = [need for need in defense.needs if need not in built]
        if missing:
            raise ConfigError(
                f"{source}: {KINDS[name].flag} needs {', '.join(KINDS[m].flag for m in missing)}"
            )
        defense.connect({need: built[need] for need in defense.needs})
    return list(built.values())


def build_training(
    values: dict[str, Any], source: str = "config"
) -> tuple[TrainConfig, list[Defense]]:
    """A run's TrainConfig and its defenses from one mapping of settings (a YAML file's keys and
    the command line's flags share it); unknown keys are errors naming them."""
    train, defense = split_settings(values)
    config = build(TrainConfig, train, source=source)
    for name in config.defense:
        if name in KINDS and KINDS[name].attached_by != "defense":
            raise ConfigError(f"{source}: defense: '{name}' is attached by {KINDS[name].flag}")
    names = config.defense + (() if config.augment == "none" else (config.augment,))
    if config.strategy == "adversarial" and "adversarial" not in names:
        names += ("adversarial",)  # the strategy is plain training with the defense attached
    return config, build_defenses(names, defense, config, source)


def defense_settings(defense: Defense) -> dict[str, Any] | None:
    """The flags (-> values) that build `defense`; None for one built by hand from a ready
    subspace, which has none."""
    if defense.config is None:
        return None
    settings = {
        _flag_of(f): _plain(getattr(defense.config, f.name))
        for f in dataclasses.fields(defense.config)
    }
    kind = KINDS.get(defense.name)
    if kind is not None and kind.mode_flag:
        settings[kind.mode_flag] = defense.mode
    return settings


def settings_with_defaults(defense: Defense, recorded: dict[str, Any] | None) -> dict | None:
    """Settings recorded for a defense of `defense`'s kind (a memguard.json's), with every flag
    they lack at its default: a flag added after they were written took its default then."""
    if recorded is None or defense.config is None:
        return recorded
    defaults = {
        _flag_of(f): _plain(f.default)
        for f in dataclasses.fields(defense.config)
        if f.default is not dataclasses.MISSING
    }
    return {**defaults, **recorded}


def record(defense: Defense) -> dict[str, Any]:
    """What memguard.json keeps of an attached defense: name, settings and report."""
    return {"name": defense.name, "settings": defense_settings(defense), "report": defense.report()}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def rebuild(records: list[dict], run: TrainConfig) -> list[Defense]:
    """The defenses of a memguard.json's `defenses` records, built again for `run`."""
    names = tuple(r["name"] for r in records)
    settings: dict[str, Any] = {}
    for r in records:
        if r["settings"] is None:
            raise ConfigError(f"defense {r['name']!r} was built by hand: no settings to rebuild")
        settings.update(r["settings"])
    return build_defenses(names, settings, run, source="memguard.json")
