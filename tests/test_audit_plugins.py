"""Audit plugins are selected by the config or by the dataset's explicit declaration, never by a
file that happens to sit beside the training folder, and the generic measures never import the
shapes benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import SMALL_SHAPES
from memguard.audit_plugins import plugin_class, selected
from memguard.audit_plugins.shapes import ShapesBenchmark
from memguard.config import AuditConfig, ConfigError, ShapesConfig, build
from memguard.data.shapes import KINDS, make_shapes_dataset
from memguard.metrics.judge import JudgeSpec


def _folder(root: Path, declaration: dict | None) -> Path:
    """`root/train` (empty: selection reads nothing in it), and `root/dataset.json` if given."""
    (root / "train").mkdir(parents=True)
    if declaration is not None:
        (root / "dataset.json").write_text(json.dumps(declaration))
    return root / "train"


def test_memguard_data_shapes_declares_the_benchmark(shapes_dir: Path) -> None:
    assert json.loads((shapes_dir / "dataset.json").read_text())["benchmark"] == "shapes"
    name, how = selected(None, shapes_dir / "train")
    assert name == "shapes" and how == f"declared in {shapes_dir.resolve() / 'dataset.json'}"
    assert plugin_class(name) is ShapesBenchmark


def test_the_config_selects_or_switches_off(tmp_path: Path, shapes_dir: Path) -> None:
    plain = _folder(tmp_path, None)
    assert selected(None, plain) is None  # nothing declared, nothing asked: generic measures
    assert selected("shapes", plain) == ("shapes", "--benchmark")
    assert selected("off", shapes_dir / "train") is None  # the declaration switched off
    # from the command line too ("none" is how a config spells "unset", so the switch is "off")
    flag = build(AuditConfig, {"benchmark": "off", "model": "m", "train_data_dir": "d"}, "cli")
    assert selected(flag.benchmark, shapes_dir / "train") is None


def test_a_file_without_the_declaration_selects_nothing(tmp_path: Path) -> None:
    train = _folder(tmp_path, {"config": {"seed": 0}, "counts": {"train": 40}})
    assert selected(None, train) is None


def test_unknown_plugins_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown audit plugin 'faces' .known: shapes, off"):
        selected("faces", tmp_path)
    train = _folder(tmp_path, {"benchmark": "faces"})
    with pytest.raises(ConfigError, match="unknown audit plugin 'faces'"):
        selected(None, train)


def test_the_generic_measures_do_not_import_the_benchmark() -> None:
    code = (
        "import sys\n"
        "import memguard.audit, memguard.cli, memguard.report.html\n"
        "import memguard.metrics.quality, memguard.metrics.descriptors\n"
        "shapes = ('memguard.data.shapes', 'memguard.metrics.judge', "
        "'memguard.audit_plugins.shapes')\n"
        "print([m for m in shapes if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_plugin_follows_the_datas_concept_kind(tmp_path: Path) -> None:
    root = make_shapes_dataset(
        ShapesConfig(output_dir=str(tmp_path / "data"), concept_kind="texture", **SMALL_SHAPES)
    )
    tiny = JudgeSpec(image_size=8, num_train=64, num_heldout=32, steps=2, batch_size=16)
    prompts_seen: list[str] = []

    def generate_set(prompts: list[str]) -> tuple[list[str], torch.Tensor]:
        prompts_seen.extend(prompts)
        return prompts, torch.zeros(len(prompts), 3, 8, 8)

    auditor = SimpleNamespace(
        config=SimpleNamespace(train_data_dir=str(root / "train"), test_data_dir=None,
                               inversion_steps=0),
        model=SimpleNamespace(image_size=8), warnings=[], generate_set=generate_set,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="concept_kind 'texture'"):
        ShapesBenchmark(tiny).setup(auditor)  # a judge of the fixed logo for hatched data
    plugin = ShapesBenchmark(replace(tiny, concept_kind="texture"))
    plugin.setup(auditor)
    assert plugin.judge.spec.concept_kind == "texture"
    extraction = plugin.concept_extraction(auditor, ["a red circle on a gray background"])
    assert set(extraction["rates"]) == {"naming_prompts", "paraphrases", "generic_base_rate"}
    assert prompts_seen[0] == "a red circle on a gray background in acme hatching"
    assert prompts_seen[1:5] == [
        "a red circle on a gray background" + p for p in KINDS["texture"].paraphrases
    ]
