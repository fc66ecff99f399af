"""Anti-gradient control (IET-AGC, Liu et al., ECCV 2024): the rule, strength zero, masking,
the bank sized by the run, and resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from helpers import tiny_config, tiny_run
from memguard import Trainer
from memguard.config import ConfigError
from memguard.data.folder import read_metadata
from memguard.defenses import AntiGradientControl, TrainingContext, weighted_mean
from memguard.defenses.registry import build_training
from test_trainer import assert_same_weights


def reference_agc(batches, gamma: float, num_timesteps: int):
    """The rule written out sample by sample: masks per batch and the final bank."""
    bank = [0.0] * num_timesteps
    masks = []
    for losses, timesteps in batches:
        masks.append([gamma * x >= bank[t] for x, t in zip(losses, timesteps, strict=True)])
        for x, t in zip(losses, timesteps, strict=True):
            bank[t] = 0.8 * bank[t] + 0.2 * x
    return masks, bank


def test_masks_and_bank_follow_the_rule() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.rand(16, generator=generator).tolist(), torch.randint(0, 5, (16,)).tolist())
        for _ in range(20)
    ]
    agc = AntiGradientControl(gamma=1.25, num_timesteps=5)
    ctx = TrainingContext()
    masks = []
    for losses, timesteps in batches:
        batch = {"timesteps": torch.tensor(timesteps), "indices": torch.arange(16)}
        weights = agc.sample_weights(torch.tensor(losses), batch, ctx)
        masks.append([True] * 16 if weights is None else (weights > 0).tolist())
    expected_masks, expected_bank = reference_agc(batches, 1.25, 5)
    assert masks == expected_masks
    torch.testing.assert_close(agc.bank, torch.tensor(expected_bank, dtype=torch.float64))
    skipped = sum(not keep for mask in masks for keep in mask)
    assert skipped > 0 and agc.report()["samples_skipped"] == skipped


def test_masked_samples_leave_the_loss() -> None:
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ctx = TrainingContext()
    assert weighted_mean(losses, torch.tensor([1.0, 0.0, 1.0, 0.0]), ctx) == 2.0
    assert weighted_mean(losses, torch.zeros(4), ctx) == 0.0  # all skipped: no gradient, no NaN


def test_strength_zero_equals_plain_training(shapes_dir: Path, tmp_path: Path) -> None:
    Trainer(tiny_config(shapes_dir / "train", tmp_path / "plain")).train()
    keep_all = AntiGradientControl(gamma=float("inf"))
    Trainer(tiny_config(shapes_dir / "train", tmp_path / "agc"), [keep_all]).train()
    assert_same_weights(tmp_path / "plain", tmp_path / "agc")
    assert keep_all.report()["samples_skipped"] == 0


def test_skipping_changes_training_and_resumes_exactly(shapes_dir: Path, tmp_path: Path) -> None:
    steps = {"max_train_steps": 8, "checkpointing_steps": 4, "num_train_timesteps": 10}
    Trainer(tiny_config(shapes_dir / "train", tmp_path / "plain", **steps)).train()
    full = AntiGradientControl(gamma=1.0)
    Trainer(tiny_config(shapes_dir / "train", tmp_path / "full", **steps), [full]).train()
    assert full.report()["samples_skipped"] > 0
    with pytest.raises(AssertionError):
        assert_same_weights(tmp_path / "plain", tmp_path / "full")

    split = tiny_config(shapes_dir / "train", tmp_path / "split", **steps)
    Trainer(split, [AntiGradientControl(gamma=1.0)]).train()
    (tmp_path / "split" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "checkpoint-8")
    resumed_agc = AntiGradientControl(gamma=1.0)
    resumed = tiny_config(
        shapes_dir / "train", tmp_path / "split", resume_from_checkpoint="latest", **steps
    )
    Trainer(resumed, [resumed_agc]).train()
    assert_same_weights(tmp_path / "full", tmp_path / "split")
    assert resumed_agc.report() == full.report()
    (record,) = json.loads((tmp_path / "full" / "memguard.json").read_text())["defenses"]
    assert record["report"] == json.loads(json.dumps(full.report()))


def test_the_bank_has_one_entry_per_training_timestep_of_the_run(shapes_dir: Path, tmp_path):
    config, (agc,) = tiny_run(
        shapes_dir / "train", tmp_path / "agc", defense=("agc",), num_train_timesteps=10,
        max_train_steps=2,
    )  # fmt: skip
    Trainer(config, [agc]).train()
    assert len(agc.bank) == 10 and agc.bank.count_nonzero() > 0
    config = tiny_config(shapes_dir / "train", tmp_path / "bad", num_train_timesteps=10)
    with pytest.raises(ValueError, match="num_timesteps=1000, but the run's scheduler has 10"):
        Trainer(config, [AntiGradientControl(num_timesteps=1000)]).train()


def test_settings_build_the_named_defense_and_nothing_else() -> None:
    config, (agc,) = build_training(
        {"train_data_dir": "d", "defense": ["agc"], "agc_gamma": "1.25"}, source="run.yaml"
    )
    assert isinstance(agc, AntiGradientControl) and agc.gamma == 1.25
    assert agc.config.gamma == 1.25 and config.defense == ("agc",)
    with pytest.raises(ConfigError, match=r"run.yaml: agc_gamma: a setting of --defense agc"):
        build_training({"train_data_dir": "d", "agc_gamma": 1.25}, source="run.yaml")
    with pytest.raises(ConfigError, match=r"agc_gamma: must be positive"):
        build_training({"train_data_dir": "d", "defense": ["agc"], "agc_gamma": 0})


def test_agc_skips_tallies_the_most_skipped_samples_by_their_metadata(shapes_dir: Path, tmp_path):
    """`benchmarks/agc_skips.py` (README: IET-AGC+ on the benchmark) reads a run's AGC report and
    counts its most-skipped samples by the training metadata's `kind`."""
    config, (agc,) = tiny_run(
        shapes_dir / "train", tmp_path / "agc", defense=("agc",), agc_gamma=1.0,
        num_train_timesteps=10, max_train_steps=20,
    )  # fmt: skip
    Trainer(config, [agc]).train()
    report = agc.report()
    kinds = [row.columns["kind"] for row in read_metadata(shapes_dir / "train")]
    expected = Counter(kinds[entry["index"]] for entry in report["most_skipped"])
    script = Path(__file__).parents[1] / "benchmarks" / "agc_skips.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "agc"), "--output", str(tmp_path / "s.json")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    (figures,) = json.loads((tmp_path / "s.json").read_text()).values()
    assert json.loads(done.stdout) == json.loads((tmp_path / "s.json").read_text())
    assert report["samples_skipped"] > 0 and figures["most_skipped_by_value"] == dict(expected)
    assert figures["skip_rate"] == pytest.approx(report["skip_rate"])
    assert sum(figures["training_set_share_by_value"].values()) == pytest.approx(1.0)
