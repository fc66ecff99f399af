"""Iterative ensemble training and IET-AGC+ (Liu et al., ECCV 2024; arXiv 2502.09434): the step
budget, shards and redistribution, averaging, one process against two, a killed run resumed
(with AGC, threshold-aware augmentation, redistribution and EMA), and Stable Diffusion (full
and LoRA)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from helpers import (
    ACTIVE_AGC,
    kill_after_first_checkpoint,
    tiny_run,
    tiny_settings,
    train_on_two_processes,
    train_tiny,
)
from memguard import Trainer
from memguard.bench import load_spec
from memguard.config import ConfigError
from memguard.defenses import TrainingContext
from memguard.defenses.registry import build_training
from memguard.distributed import Group
from memguard.models import add_lora
from memguard.train.checkpoint import checkpoint_dirs, checkpoint_info, load_unit
from memguard.train.iet import average_proxies, proxies_of, proxy_models
from memguard.train.shards import most_skipped, redistribute, split
from memguard.train.step import TrainingStep
from test_trainer import WEIGHTS, assert_same_weights

IET = {"strategy": "iet", "num_proxies": 2, "rounds": 3, "max_train_steps": 12}  # 2 steps a round


# ---------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_proxies": 2, "rounds": 3}, "num_proxies, rounds: settings of --strategy iet, not"),
        ({"shard_by": "kind"}, "shard_by: settings of --strategy iet, not of --strategy plain"),
        ({"strategy": "iet", "rounds": 3}, "num_proxies: required with --strategy iet"),
        (
            {**IET, "max_train_steps": 10},
            r"10 is not a multiple of 2 x 3 = 6 \(nearest: 6 or 12\)",
        ),
        ({**IET, "redistribute": 0.2}, "redistribute: moves the samples AGC skipped most"),
        (
            {**IET, **ACTIVE_AGC, "redistribute": 1.0},
            r"redistribute: the fraction must be in \[0, 1\)",
        ),
        (
            {**IET, **ACTIVE_AGC, "rounds": 1, "max_train_steps": 4, "redistribute": 0.2},
            "needs --rounds >= 2",
        ),
    ],
)
def test_settings_are_validated(settings: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        build_training(tiny_settings(tmp_path, tmp_path, **settings), source="test")


def test_each_process_trains_an_equal_share_of_the_proxies() -> None:
    assert [list(proxies_of(rank, 2, 4)) for rank in range(2)] == [[0, 1], [2, 3]]
    with pytest.raises(ConfigError, match="3 proxies cannot be shared evenly by 2 processes"):
        proxies_of(0, 2, 3)


# ------------------------------------------------------------------------------------ shards


def test_shards_are_disjoint_cover_the_data_and_spread_each_value() -> None:
    strata = ["a"] * 10 + ["b"] * 7 + [None] * 6
    for values in (None, strata):
        shards = split(23, 3, seed=0, strata=values)
        assert sorted(i for shard in shards for i in shard) == list(range(23))
        assert {len(shard) for shard in shards} <= {7, 8}
        assert split(23, 3, seed=0, strata=values) == shards  # seeded
    for value, size in (("a", 10), ("b", 7), (None, 6)):
        counts = [sum(strata[i] == value for i in shard) for shard in split(23, 3, 0, strata)]
        assert max(counts) - min(counts) <= 1 and sum(counts) == size
    assert split(23, 3, seed=1) != split(23, 3, seed=0)


def test_the_most_skipped_samples_move_to_the_next_proxy() -> None:
    shards = [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17]]
    counts = [{1: 5, 4: 9, 5: 1}, {6: 2, 9: 7, 10: 3}, {11: 4, 12: 8, 17: 6, 13: 1}]
    rng = np.random.default_rng(0)
    moved = [most_skipped(s, c, 0.5, rng) for s, c in zip(shards, counts, strict=True)]
    assert moved == [[1, 4, 5], [9, 10], [11, 12, 17]]  # floor(0.5 n) with the most skips
    new = redistribute(shards, moved)
    assert new == [[0, 2, 3, 11, 12, 17], [1, 4, 5, 6, 7, 8], [9, 10, 13, 14, 15, 16]]
    # ties (no skips) in a seeded random order: the top of the counts always goes
    tied = most_skipped(list(range(10)), {3: 1}, 0.3, np.random.default_rng(1))
    assert 3 in tied and len(tied) == 3
    assert tied == most_skipped(list(range(10)), {3: 1}, 0.3, np.random.default_rng(1))
    with pytest.raises(ValueError, match="outside its shard"):
        redistribute(shards, [[6], [], []])


# -------------------------------------------------------------------------------- averaging


def _step(weight: float) -> TrainingStep:
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, weight)
    torch.nn.init.constant_(model.bias, -weight)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    ema = EMAModel(list(model.parameters()))
    ema.shadow_params = [torch.full_like(p, 10 * weight) for p in model.parameters()]
    return TrainingStep(model, optimizer, schedule, TrainingContext(), ema=ema)


def test_proxies_are_averaged_by_shard_size() -> None:
    steps = [_step(1.0), _step(2.0), _step(4.0)]
    average_proxies(steps, [0.5, 0.25, 0.25], Group.local(), "cpu")
    for step in steps:  # 0.5 * 1 + 0.25 * 2 + 0.25 * 4 = 2
        assert torch.equal(step.model.weight, torch.full((2, 3), 2.0))
        assert torch.equal(step.model.bias, torch.full((2,), -2.0))
        assert all(torch.equal(s, torch.full_like(s, 20.0)) for s in step.ema.shadow_params)


def test_a_proxy_moved_away_and_back_trains_on_as_one_that_stayed() -> None:
    """What a GPU run does between a proxy's turns (here between two names of the CPU): its
    weights, AdamW moments and EMA weights go and come back unchanged."""
    moved, stayed = _step(1.0), _step(1.0)
    for _ in range(3):
        for step in (moved, stayed):
            step.model(torch.ones(4, 3)).square().sum().backward()
            step.optimizer.step()
            step.optimizer.zero_grad()
            step.ema.step(step.params)
        moved.to("cpu:0")
        assert moved.device == torch.device("cpu:0")
        moved.to("cpu")
    for a, b in zip(moved.params, stayed.params, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(
            moved.optimizer.state[a]["exp_avg_sq"], stayed.optimizer.state[b]["exp_avg_sq"]
        )
    assert all(map(torch.equal, moved.ema.shadow_params, stayed.ema.shadow_params))


def test_the_step_budget_counts_every_proxys_steps(shapes_dir: Path, tmp_path: Path) -> None:
    metadata = train_tiny(shapes_dir / "train", tmp_path / "iet", **IET, checkpointing_steps=12)
    assert metadata["global_step"] == 12
    strategy = metadata["strategy"]
    assert strategy["steps_per_round"] == 2 and strategy["num_proxies"] == 2
    assert sum(strategy["shard_sizes"]) == metadata["data"]["num_images"]
    log = [json.loads(line) for line in (tmp_path / "iet" / "train_log.jsonl").open()]
    assert [(line["step"], line["round"]) for line in log] == [(2, 1), (4, 1), (6, 2), (8, 2),
                                                               (10, 3), (12, 3)]  # fmt: skip
    (final,) = checkpoint_dirs(tmp_path / "iet")
    assert checkpoint_info(final)["units"] == ["proxy-0", "proxy-1", "strategy"]
    assert checkpoint_info(final)["round"] == 3 and checkpoint_info(final)["round_steps"] == 0
    proxies = [load_unit(final, f"proxy-{k}") for k in range(2)]
    assert [p["step"] for p in proxies] == [6, 6]  # 12 steps: 6 per proxy, 2 a round
    saved = load_file(tmp_path / "iet" / WEIGHTS)
    for name, value in proxies[0]["model"].items():  # every proxy holds the average, as saved
        assert torch.equal(value, proxies[1]["model"][name]) and torch.equal(value, saved[name])
    assert [p["lr_schedule"]["last_epoch"] for p in proxies] == [6, 6]  # each its own schedule


# ----------------------------------------------------------------------------- redistribution


def test_redistribution_moves_the_most_skipped_and_p_zero_is_iet(shapes_dir, tmp_path) -> None:
    data = shapes_dir / "train"
    run = {**IET, **ACTIVE_AGC, "checkpointing_steps": 12}
    metadata = train_tiny(data, tmp_path / "msr", **run, redistribute=0.25)
    state = load_unit(checkpoint_dirs(tmp_path / "msr")[-1], "strategy")
    (move,) = state["moves"]  # after round 1 only: round 2 averages, round 3 is the last
    assert move["after_round"] == 1
    initial = split(metadata["data"]["num_images"], 2, seed=0)
    for k in range(2):
        counts, moved = move["skip_counts"][k], set(move["moved"][k])
        assert len(moved) == len(initial[k]) // 4 and moved <= set(initial[k])
        assert sum(counts.values()) > 0, "AGC skipped nothing: the test shows nothing"
        stayed = set(initial[k]) - moved
        assert min(counts.get(i, 0) for i in moved) >= max(counts.get(i, 0) for i in stayed)
    assert state["shards"] == redistribute(initial, move["moved"])
    everything = sorted(i for shard in initial for i in shard)
    assert sorted(i for shard in state["shards"] for i in shard) == everything
    assert metadata["strategy"]["redistributions"] == [
        {"after_round": 1, "moved": [len(m) for m in move["moved"]]}
    ]
    train_tiny(data, tmp_path / "p0", **run, redistribute=0.0)
    train_tiny(data, tmp_path / "iet", **run)
    assert_same_weights(tmp_path / "p0", tmp_path / "iet")
    with pytest.raises(AssertionError):
        assert_same_weights(tmp_path / "msr", tmp_path / "iet")


# --------------------------------------------------------------------- processes and resuming

FULL = {**ACTIVE_AGC, "augment": "taa", "redistribute": 0.25, "use_ema": True, "ema_decay": 0.9}


def test_two_processes_give_one_process_weights(shapes_dir: Path, tmp_path: Path) -> None:
    data = shapes_dir / "train"
    train_tiny(data, tmp_path / "one", **IET, **FULL)
    done = train_on_two_processes(tiny_settings(data, tmp_path / "two", **IET, **FULL))
    assert done.returncode == 0, done.stderr[-3000:]
    metadata = json.loads((tmp_path / "two" / "memguard.json").read_text())
    assert metadata["num_processes"] == 2 and metadata["strategy"]["redistributions"]
    assert metadata["defenses"][1]["report"]["proxies"][1]["augmented_batches"] > 0
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-6)


def test_killed_run_resumes_mid_round_to_the_same_weights(shapes_dir, tmp_path) -> None:
    # 36 steps: 6 per proxy a round; a checkpoint every 5 never falls on a round's end (12 steps)
    run = {**IET, **FULL, "max_train_steps": 36, "checkpointing_steps": 5, "logging_steps": 6}
    data = shapes_dir / "train"
    metadata = train_tiny(data, tmp_path / "full", **run)
    assert metadata["defenses"][1]["report"]["proxies"][0]["augmented_batches"] > 0

    killed = tiny_settings(data, tmp_path / "killed", **run)
    latest = kill_after_first_checkpoint(killed)
    assert latest["round_steps"] > 0  # in the middle of a round

    config, defenses = tiny_run(data, tmp_path / "killed", **run, resume_from_checkpoint="latest")
    result = Trainer(config, defenses, progress=False).train()
    assert result.steps_run == 36 - latest["step"]
    assert_same_weights(tmp_path / "full", tmp_path / "killed")


# ------------------------------------------------------------------------- Stable Diffusion


SD_AGC = {key: value for key, value in ACTIVE_AGC.items() if key != "num_train_timesteps"}


def _sd(shapes_dir: Path, pipeline: Path, output: Path, **settings) -> dict:
    return train_tiny(
        shapes_dir / "train", output, pretrained_model_name_or_path=str(pipeline),
        text_encoder="clip", resolution=16, **{**IET, "rounds": 2, "max_train_steps": 4},
        checkpointing_steps=4, **settings,
    )  # fmt: skip


def _unet(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_iet_fine_tunes_stable_diffusion(shapes_dir, pipeline_dir, tmp_path) -> None:
    _sd(shapes_dir, pipeline_dir, tmp_path / "full", **SD_AGC, augment="taa")
    base, tuned = _unet(pipeline_dir), _unet(tmp_path / "full")
    assert tuned.keys() == base.keys()
    assert not torch.equal(tuned["conv_in.weight"], base["conv_in.weight"])


def test_lora_proxies_average_their_adapters_over_one_base(shapes_dir, pipeline_dir, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    add_lora(unet, 4)
    first, second = list(proxy_models(unet, 2))
    assert second is unet
    frozen = [(n, p) for n, p in unet.named_parameters() if not p.requires_grad]
    assert all(p is dict(first.named_parameters())[n] for n, p in frozen)  # one base
    lora = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    assert all(p is not dict(first.named_parameters())[n] for n, p in lora)

    _sd(shapes_dir, pipeline_dir, tmp_path / "lora", lora_rank=4)
    final = checkpoint_dirs(tmp_path / "lora")[-1]
    proxies = [load_unit(final, f"proxy-{k}")["model"] for k in range(2)]
    assert proxies[0].keys() == dict(lora).keys()  # only the adapters are the proxies' own
    assert all(torch.equal(proxies[0][n], proxies[1][n]) for n in proxies[0])  # averaged
    assert any(proxies[0][n].any() for n in proxies[0] if "lora_B" in n)  # trained from 0
    fused, base = _unet(tmp_path / "lora"), _unet(pipeline_dir)
    changed = {k for k in base if not torch.equal(fused[k], base[k])}
    targets = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
    assert changed and all(k.endswith(targets) for k in changed), sorted(changed)


@pytest.mark.parametrize(
    ("name", "conditioning"), [("iet.yaml", "text"), ("iet_unconditional.yaml", "none")]
)
def test_the_bench_specs_compare_arms_on_equal_sample_budgets(name: str, conditioning: str) -> None:
    configs = Path(__file__).resolve().parents[1] / "configs"
    spec = load_spec(configs / "bench" / name)
    base = yaml.safe_load((configs / "benchmark.yaml").read_text())
    issue_arms = ["plain", "agc", "iet", "iet_agc", "iet_agc_plus"]  # ablations may sit between
    assert [arm.name for arm in spec.arms if arm.name in issue_arms] == issue_arms
    assert spec.seeds == (0, 1, 2)
    budgets = set()
    for arm in spec.arms:
        config, defenses = spec.train_config(arm, 0, "/d", "/d/train", "/runs/arm")
        budgets.add(config.max_train_steps * config.train_batch_size)
        assert config.conditioning == conditioning
        augmented = arm.name in ("iet_agc_plus", "iet_agc_taa")
        if arm.name.startswith("iet_agc"):
            assert [d.name for d in defenses] == (["agc", "taa"] if augmented else ["agc"])
            redistributed = arm.name in ("iet_agc_plus", "iet_agc_msr")
            assert config.redistribute == (0.2 if redistributed else None)
    assert budgets == {base["max_train_steps"] * base["train_batch_size"]}
