"""The training loop: hooks that change nothing change nothing; runs resume, scale out and
accumulate to the same weights; bad input stops cleanly; output loads with diffusers."""

from __future__ import annotations

import json
import resource
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from helpers import kill_after_first_checkpoint, tiny_config, train_on_two_processes
from memguard import Defense, Trainer, TrainingError
from memguard.config import ConfigError
from memguard.data.folder import DataError, fingerprint, read_metadata
from memguard.train.checkpoint import checkpoint_dirs

WEIGHTS = "diffusion_pytorch_model.safetensors"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS)


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        if atol == 0.0:
            assert torch.equal(wa[key], wb[key]), key
        else:
            torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=0, msg=key)


class Inert(Defense):
    """Implements every hook, and does nothing in any of them."""

    name = "inert"

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _count(self, hook: str) -> None:
        self.calls[hook] = self.calls.get(hook, 0) + 1

    def setup(self, model, optimizer, ctx):
        self._count("setup")

    def sample_weights(self, per_sample_loss, batch, ctx):
        self._count("sample_weights")
        return None

    def extra_loss(self, model, batch, ctx):
        self._count("extra_loss")
        return None

    def after_backward(self, model, ctx):
        self._count("after_backward")

    def after_step(self, model, ctx):
        self._count("after_step")

    def report(self):
        return {"calls": dict(self.calls)}


def test_inert_defense_changes_nothing(shapes_dir: Path, tmp_path: Path) -> None:
    Trainer(tiny_config(shapes_dir / "train", tmp_path / "plain")).train()
    inert = Inert()
    Trainer(tiny_config(shapes_dir / "train", tmp_path / "hooked"), [inert]).train()
    assert_same_weights(tmp_path / "plain", tmp_path / "hooked")
    assert inert.calls == {
        "setup": 1, "sample_weights": 6, "extra_loss": 6, "after_backward": 6, "after_step": 6
    }  # fmt: skip
    records = json.loads((tmp_path / "hooked" / "memguard.json").read_text())["defenses"]
    assert records == [{"name": "inert", "settings": None, "report": {"calls": inert.calls}}]


class UnitWeights(Defense):
    name = "unit"

    def sample_weights(self, per_sample_loss, batch, ctx):
        return torch.ones_like(per_sample_loss)


def test_unit_sample_weights_equal_the_plain_mean(shapes_dir: Path, tmp_path: Path) -> None:
    Trainer(tiny_config(shapes_dir / "train", tmp_path / "plain")).train()
    Trainer(tiny_config(shapes_dir / "train", tmp_path / "unit"), [UnitWeights()]).train()
    assert_same_weights(tmp_path / "plain", tmp_path / "unit", atol=1e-6)


def test_output_folder_loads_with_diffusers(shapes_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(shapes_dir / "train", tmp_path / "out", use_ema=True)
    result = Trainer(config).train()
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "out")
    assert unet.config.sample_size == 8 and unet.config.cross_attention_dim == 384
    metadata = json.loads((tmp_path / "out" / "memguard.json").read_text())
    assert metadata["data"]["sha256"] == fingerprint(read_metadata(shapes_dir / "train"))
    assert metadata["seed"] == 0 and metadata["global_step"] == 6
    assert metadata["text_encoder"] == {"name": "minilm", "max_length": 8}
    assert {"torch", "diffusers", "accelerate"} <= metadata["versions"].keys()
    peak_now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    assert 100 * 2**20 < metadata["peak_memory"]["resident_bytes"] <= peak_now  # torch alone
    assert (tmp_path / "out" / "scheduler_config.json").is_file()
    log = (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [2, 4, 6]
    assert result.final_loss == pytest.approx(json.loads(log[-1])["loss"])


def test_gradient_accumulation_matches_the_large_batch(shapes_dir: Path, tmp_path: Path) -> None:
    Trainer(tiny_config(shapes_dir / "train", tmp_path / "big", train_batch_size=8)).train()
    Trainer(
        tiny_config(
            shapes_dir / "train",
            tmp_path / "accumulated",
            train_batch_size=4,
            gradient_accumulation_steps=2,
        )
    ).train()
    assert_same_weights(tmp_path / "big", tmp_path / "accumulated", atol=1e-5)


def test_resume_from_checkpoint_matches_uninterrupted(shapes_dir: Path, tmp_path: Path) -> None:
    Trainer(tiny_config(shapes_dir / "train", tmp_path / "full", use_ema=True)).train()
    first = tiny_config(
        shapes_dir / "train", tmp_path / "split", use_ema=True, checkpointing_steps=3
    )
    Trainer(first).train()
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "checkpoint-6")
    (tmp_path / "split" / WEIGHTS).unlink()
    resumed = tiny_config(
        shapes_dir / "train", tmp_path / "split", use_ema=True, resume_from_checkpoint="latest"
    )
    result = Trainer(resumed).train()
    assert result.steps_run == 3
    assert_same_weights(tmp_path / "full", tmp_path / "split")
    # the wall time of steps 1-3 comes back from the checkpoint
    metadata = json.loads((tmp_path / "split" / "memguard.json").read_text())
    assert metadata["train_seconds"] > result.loop_seconds > 0


def test_killed_run_resumes_to_the_same_weights(shapes_dir: Path, tmp_path: Path) -> None:
    steps = dict(max_train_steps=150, checkpointing_steps=25, logging_steps=25)
    Trainer(tiny_config(shapes_dir / "train", tmp_path / "full", **steps)).train()

    killed = tiny_config(shapes_dir / "train", tmp_path / "killed", **steps)
    kill_after_first_checkpoint(killed)

    resumed = tiny_config(
        shapes_dir / "train", tmp_path / "killed", resume_from_checkpoint="latest", **steps
    )
    result = Trainer(resumed).train()
    assert 0 < result.steps_run < 150
    assert_same_weights(tmp_path / "full", tmp_path / "killed")


def test_two_processes_match_one_on_the_same_global_batch(shapes_dir: Path, tmp_path: Path) -> None:
    Trainer(tiny_config(shapes_dir / "train", tmp_path / "one", train_batch_size=8)).train()
    two = tiny_config(shapes_dir / "train", tmp_path / "two", train_batch_size=4)
    done = train_on_two_processes(two)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 6 steps") == 1  # one summary: the main process's
    metadata = json.loads((tmp_path / "two" / "memguard.json").read_text())
    assert metadata["num_processes"] == 2
    assert len((tmp_path / "two" / "train_log.jsonl").read_text().splitlines()) == 3
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-5)


class PoisonAtStep(Defense):
    """Makes the loss NaN at one step, as a diverging run would."""

    name = "poison"

    def __init__(self, step: int) -> None:
        self.step = step

    def sample_weights(self, per_sample_loss, batch, ctx):
        if ctx.step == self.step:
            return torch.full_like(per_sample_loss, float("nan"))
        return None


def test_nan_loss_stops_with_checkpoints_intact(shapes_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(shapes_dir / "train", tmp_path / "out", checkpointing_steps=2)
    with pytest.raises(TrainingError, match=r"loss is nan at step 4"):
        Trainer(config, [PoisonAtStep(3)]).train()
    assert [p.name for p in checkpoint_dirs(tmp_path / "out")] == ["checkpoint-2"]
    assert not (tmp_path / "out" / WEIGHTS).exists()
    resumed = tiny_config(shapes_dir / "train", tmp_path / "out", resume_from_checkpoint="latest")
    assert Trainer(resumed, [PoisonAtStep(-1)]).train().steps_run == 4


def test_corrupt_image_stops_before_anything_is_written(shapes_dir: Path, tmp_path: Path) -> None:
    data = shutil.copytree(shapes_dir / "train", tmp_path / "data")
    (data / "00007.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"00007.png \(metadata line 8\): cannot read image"):
        Trainer(tiny_config(data, tmp_path / "out")).train()
    assert not checkpoint_dirs(tmp_path / "out")


def test_bf16_mixed_precision_trains_and_saves_float32(shapes_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(shapes_dir / "train", tmp_path / "bf16", mixed_precision="bf16")
    result = Trainer(config).train()
    assert torch.isfinite(torch.tensor(result.final_loss))
    saved = weights(tmp_path / "bf16")
    assert all(w.dtype == torch.float32 for w in saved.values())  # master weights stay fp32
    Trainer(tiny_config(shapes_dir / "train", tmp_path / "fp32")).train()
    with pytest.raises(AssertionError):  # autocast really changed the arithmetic
        assert_same_weights(tmp_path / "bf16", tmp_path / "fp32")


class WeightProbe(Defense):
    """Reports a sum of the weights it finds at the end of training."""

    name = "probe"

    def setup(self, model, optimizer, ctx):
        self.weight = model.conv_in.weight

    def report(self):
        return {"conv_in_sum": float(self.weight.detach().double().sum())}


def test_defenses_report_on_the_saved_weights(shapes_dir: Path, tmp_path: Path) -> None:
    """With EMA, the saved model is the EMA average: reports (a leak certificate, say) describe
    it, not the last raw weights."""
    config = tiny_config(shapes_dir / "train", tmp_path / "ema", use_ema=True, ema_decay=0.5)
    Trainer(config, [WeightProbe()]).train()
    (record,) = json.loads((tmp_path / "ema" / "memguard.json").read_text())["defenses"]
    saved = float(weights(tmp_path / "ema")["conv_in.weight"].double().sum())
    assert record["report"]["conv_in_sum"] == pytest.approx(saved, rel=0, abs=1e-9)


class WeightDecayLoss(Defense):
    """An extra loss: strength * sum of squared weights (a regulariser)."""

    name = "l2"

    def __init__(self, strength: float) -> None:
        self.strength = strength

    def extra_loss(self, model, batch, ctx):
        return self.strength * sum(p.square().sum() for p in model.parameters())


def test_an_extra_loss_is_added_before_backward(shapes_dir: Path, tmp_path: Path) -> None:
    Trainer(tiny_config(shapes_dir / "train", tmp_path / "plain")).train()
    Trainer(tiny_config(shapes_dir / "train", tmp_path / "zero"), [WeightDecayLoss(0.0)]).train()
    assert_same_weights(tmp_path / "plain", tmp_path / "zero")
    Trainer(tiny_config(shapes_dir / "train", tmp_path / "l2"), [WeightDecayLoss(1.0)]).train()
    plain, l2 = weights(tmp_path / "plain"), weights(tmp_path / "l2")
    norm = sum(float(w.square().sum()) for w in plain.values())
    assert sum(float(w.square().sum()) for w in l2.values()) < norm  # pulled towards zero


def test_a_checkpoint_holds_each_units_state_and_its_index(shapes_dir, tmp_path) -> None:
    Trainer(tiny_config(shapes_dir / "train", tmp_path / "out", checkpointing_steps=3)).train()
    latest = checkpoint_dirs(tmp_path / "out")[-1]
    assert sorted(p.name for p in latest.iterdir()) == ["checkpoint.json", "model.pt"]
    index = json.loads((latest / "checkpoint.json").read_text())
    assert index["step"] == 6 and index["units"] == ["model"] and index["train_seconds"] > 0
    (tmp_path / "out" / "checkpoints" / "checkpoint-9.partial").mkdir()  # a killed save
    (tmp_path / "out" / "checkpoints" / "checkpoint-12").mkdir()  # no index: incomplete
    assert checkpoint_dirs(tmp_path / "out")[-1] == latest


def test_a_defense_named_twice_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"defense: \['agc', 'agc'\] names a defense twice"):
        tiny_config(tmp_path, tmp_path, defense=("agc", "agc"))
