"""Audit plugins are selected by the config or by the dataset's explicit declaration, never by a
file that happens to sit beside the training folder, and the generic measures never import the
shapes benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memguard.audit_plugins import plugin_class, selected
from memguard.audit_plugins.shapes import ShapesBenchmark
from memguard.config import ConfigError


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
    assert selected("none", shapes_dir / "train") is None  # the declaration switched off


def test_a_file_without_the_declaration_selects_nothing(tmp_path: Path) -> None:
    train = _folder(tmp_path, {"config": {"seed": 0}, "counts": {"train": 40}})
    assert selected(None, train) is None


def test_unknown_plugins_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown audit plugin 'faces' .known: shapes, none"):
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
