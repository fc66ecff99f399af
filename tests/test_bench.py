"""`memguard bench`: a two-arm, two-seed grid end to end and its reuse, the specs, the decisions
to reuse or resume a run, and the summary statistics."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import tiny_config
from memguard import cli
from memguard.bench import load_spec, run_bench, runner
from memguard.bench.data import drop_rows
from memguard.bench.page import cells
from memguard.bench.reuse import RESUME, REUSE, TRAIN, begin_training, plan_training
from memguard.bench.spec import DEFAULT_FIGURES, Figure
from memguard.bench.stats import flatten, summarize, summary
from memguard.config import ConfigError, to_dict
from memguard.defenses import AntiGradientControl
from memguard.defenses.registry import defense_settings
from memguard.io import write_json

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "bench"
SMOKE = CONFIGS / "smoke.yaml"


def _bench(spec: Path, output: Path, *flags: str) -> dict:
    cli.main(["bench", str(spec), "--output_dir", str(output), "--device", "cpu", *flags])
    return json.loads((output / "bench.json").read_text())


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The smoke spec (plain and oracle filtering, seeds 0 and 1) run once."""
    output = tmp_path_factory.mktemp("bench")
    return output, _bench(SMOKE, output)


def test_bench_trains_and_audits_an_unconditional_grid(tmp_path: Path) -> None:
    """Data without captions and --conditioning none: the runs read no caption column."""
    smoke = yaml.safe_load(SMOKE.read_text())
    smoke["base"]["conditioning"] = "none"
    smoke["data"]["captions"] = "none"
    smoke["arms"] = {"plain": {}}
    smoke["seeds"] = [0]
    spec = tmp_path / "unconditional.yaml"
    spec.write_text(yaml.safe_dump(smoke))
    (run,) = _bench(spec, tmp_path / "out")["runs"]
    assert run["train"] == "trained" and run["audit"] == "audited"
    metadata = json.loads((tmp_path / "out/runs/plain/seed-0/memguard.json").read_text())
    assert metadata["conditioning"] == {"kind": "none"}
    assert run["figures"]["replication.by_prompt_kind.unconditional.generations"] > 0


def test_bench_writes_every_run_and_figure(grid) -> None:
    output, bench = grid
    runs = {(run["arm"], run["seed"]): run for run in bench["runs"]}
    assert set(runs) == set(itertools.product(["plain", "oracle"], [0, 1]))
    assert all(run["train"] == "trained" and run["audit"] == "audited" for run in runs.values())
    for (arm, seed), run in runs.items():
        assert run["data_seed"] == seed and run["train_config"]["seed"] == seed
        assert run["figures"]["train_seconds"] > 0
        assert run["figures"]["benchmark.quality.fid"] >= 0
        assert "training: trained" in (output / "logs" / f"{arm}-seed-{seed}.log").read_text()
    # the oracle trained on the images without the logo, and was audited on all of them
    train = output / "data" / "seed-0" / "train" / "metadata.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    oracle = json.loads((output / "runs/oracle/seed-0/memguard.json").read_text())
    assert oracle["data"]["num_images"] == sum(not row["has_concept"] for row in rows)
    assert runs["oracle", 0]["figures"]["train_data.num_images"] == len(rows)

    fid = bench["summary"]["plain"]["benchmark.quality.fid"]
    values = [runs["plain", seed]["figures"]["benchmark.quality.fid"] for seed in (0, 1)]
    assert fid["n"] == 2 and fid["values"] == {"0": values[0], "1": values[1]}
    assert fid["mean"] == pytest.approx(np.mean(values))
    # inversion_steps: 0, so no learned-embedding attack: tolerated as n/a
    assert bench["summary"]["oracle"][DEFAULT_FIGURES[9].key]["n"] == 0

    table = (output / "bench.md").read_text()
    assert all(f"| {figure.label} | plain |" in table for figure in DEFAULT_FIGURES)
    assert "| extraction: embedding | oracle | n/a |" in table
    page = (output / "bench.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(DEFAULT_FIGURES)


def test_second_run_reuses_everything_and_a_changed_arm_is_retrained(
    grid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    output, _ = grid
    finished = sorted(output.glob("runs/*/seed-*/memguard.json"))
    finished += sorted(output.glob("runs/*/seed-*/audit/results.json"))
    stamps = [path.stat().st_mtime_ns for path in finished]

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained or audited again")

    with monkeypatch.context() as patch:
        patch.setattr(runner.Trainer, "train", refuse)
        patch.setattr(runner, "run_audit", refuse)
        again = run_bench(SMOKE, output, device="cpu", progress=False)
    assert all(run["train"] == run["audit"] == "reused" for run in again["runs"])
    assert [path.stat().st_mtime_ns for path in finished] == stamps

    spec = yaml.safe_load(SMOKE.read_text())
    spec["arms"]["plain"] = {"max_train_steps": 5}
    changed = tmp_path / "smoke.yaml"
    changed.write_text(yaml.safe_dump(spec))
    (run,) = _bench(changed, output, "--arms", "plain", "--seeds", "0", "--no_audit")["runs"]
    assert (run["train"], run["audit"]) == ("trained", "skipped")
    assert not (output / "runs/plain/seed-0/audit/results.json").exists()
    printed = capsys.readouterr().out
    assert "runs: 1 (1 trained, resumed or mitigated, 0 refused, 0 audited" in printed
    (run,) = _bench(changed, output, "--arms", "plain", "--seeds", "0")["runs"]
    assert (run["train"], run["audit"]) == ("reused", "audited")
    assert json.loads((output / "runs/plain/seed-0/memguard.json").read_text())["global_step"] == 5


def test_a_run_that_refuses_to_train_is_recorded_and_the_grid_goes_on(
    grid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output, _ = grid
    real = runner.run_one

    def oracle_refuses(spec, arm, *args, **kwargs):
        if arm.name == "oracle":
            raise ConfigError("projection_min_recall: the patch detector found the concept in 0%")
        return real(spec, arm, *args, **kwargs)

    monkeypatch.setattr(runner, "run_one", oracle_refuses)
    copy = tmp_path / "bench"
    shutil.copytree(output, copy)
    bench = run_bench(SMOKE, copy, device="cpu", progress=False)
    states = {(run["arm"], run["seed"]): run["train"] for run in bench["runs"]}
    assert states[("oracle", 0)] == states[("oracle", 1)] == "refused"
    assert states[("plain", 0)] != "refused" and states[("plain", 1)] != "refused"
    assert bench["summary"]["oracle"]["benchmark.quality.fid"]["n"] == 0
    table = (copy / "bench.md").read_text()
    assert "- oracle, seed 1: projection_min_recall: the patch detector found" in table


def test_bad_keys_and_values_are_named_with_the_file(tmp_path: Path) -> None:
    spec = yaml.safe_load(SMOKE.read_text())
    cases = {
        "'arm'": {"arm": {}},
        "arms.plain": {"arms": {"plain": {"learning_rat": 0.1}}},
        "learning_rat": {"arms": {"plain": {"learning_rat": 0.1}}},
        "unknown column 'logo'": {"arms": {"oracle": {"drop_where": {"logo": True}}}},
        "'seed' is set by memguard bench": {"arms": {"plain": {"seed": 3}}},
        "base: unknown key 'learnin_rate'": {"base": {"learnin_rate": 1.0}},
        "a folder name": {"arms": {"a/b": {}}},
        "audit: unknown key 'num_imags'": {"audit": {"num_imags": 2}},
        "judge: unknown key 'stepz'": {"judge": {"stepz": 2}},
        "judge: concept_kind: set it under data": {"judge": {"concept_kind": "moving"}},
        "data: concept_kind: 'dots' is not one of": {"data": {"concept_kind": "dots"}},
        "audit: expected a mapping": {"audit": 3},
    }
    for expected, change in cases.items():
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**spec, **change}))
        with pytest.raises(ConfigError, match=expected) as error:
            load_spec(path)
        assert str(path) in str(error.value)


def test_projection_spec_makes_each_runs_config() -> None:
    spec = load_spec(CONFIGS / "projection.yaml")
    names = [arm.name for arm in spec.arms]
    assert names == ["plain", "oracle", "text", "feature_static", "image", "patch"]
    assert spec.seeds == (0, 1, 2) and spec.data_seed_of(2) == 2
    image = spec.arms[names.index("image")]
    config, (projection,) = spec.train_config(
        image, 2, "/d/seed-2", "/d/seed-2/train", "/runs/image"
    )
    assert projection.config.exemplars == "/d/seed-2/concept_exemplars"
    assert (config.seed, config.resume_from_checkpoint) == (2, "latest")
    base = yaml.safe_load((CONFIGS.parent / "benchmark.yaml").read_text())
    assert config.max_train_steps == base["max_train_steps"] and projection.mode == "image"
    assert spec.select(["image"], [7]).arms == (image,)
    assert spec.select(seeds=[1, 2], data_seed=0).data_seed_of(2) == 0
    with pytest.raises(ConfigError, match="no arm"):
        spec.select(["nope"])


def test_training_is_resumed_only_for_the_same_config(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "data", tmp_path / "run", resume_from_checkpoint="latest")
    assert plan_training(config, [], "sha") == TRAIN
    begin_training(config, [], "sha")
    (tmp_path / "run" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    assert plan_training(config, [], "sha") == RESUME
    assert plan_training(config, [], "other data") == TRAIN
    assert plan_training(config, [AntiGradientControl()], "sha") == TRAIN
    changed = tiny_config(tmp_path / "data", tmp_path / "run", max_train_steps=7)
    assert plan_training(changed, [], "sha") == TRAIN
    begin_training(changed, [], "sha")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_rule_that_drops_nothing_is_an_error(shapes_dir: Path) -> None:
    with pytest.raises(ConfigError, match="drops 0 of"):
        drop_rows(shapes_dir / "train", {"shape": "hexagon"})


def test_statistics_match_a_direct_computation() -> None:
    values = [0.0, 1.0, 3.0, 7.0, 20.0]
    stats = summarize(values)
    assert stats["n"] == 5 and stats["mean"] == pytest.approx(6.2)
    assert (stats["min"], stats["max"]) == (0.0, 20.0)
    # every one of the 5^5 equally likely resamples: the exact bootstrap distribution
    means = [np.mean(draw) for draw in itertools.product(values, repeat=len(values))]
    low, high = np.percentile(means, [2.5, 97.5])
    assert stats["ci_low"] == pytest.approx(low, abs=0.2)
    assert stats["ci_high"] == pytest.approx(high, abs=0.2)
    assert summarize(values) == stats  # seeded

    one = summarize([0.25])
    assert one["mean"] == one["min"] == one["max"] == 0.25 and one["ci_low"] is None
    assert cells(one, Figure("k", "rate", ".1%")) == ["25.0%", "25.0% – 25.0%",
                                                      "one seed: no interval", "1"]  # fmt: skip

    runs = [
        {"arm": "a", "seed": 0, "figures": {"x": 1.0}},
        {"arm": "a", "seed": 1, "figures": {"x": 3.0, "y": 5.0}},
    ]
    table = summary(runs, ["a"], ["x", "y", "z"])["a"]
    assert table["x"]["mean"] == 2.0 and table["y"]["values"] == {"1": 5.0}
    assert table["z"]["n"] == 0
    nested = {"a": {"b": 1, "c": [1, 2], "d": None, "e": True, "f": {"0.5": 0.25}}, "g": "x"}
    assert flatten(nested) == {"a.b": 1.0, "a.f.0.5": 0.25}


def test_a_run_recorded_before_a_setting_existed_is_reused(tmp_path: Path) -> None:
    """A model folder whose memguard.json predates a setting (conditioning) took its default."""
    config = tiny_config(tmp_path / "data", tmp_path / "run")
    recorded = {
        k: v for k, v in to_dict(config).items() if k not in ("conditioning", "class_column")
    }
    write_json(tmp_path / "run" / "memguard.json",
               {"config": recorded, "defenses": [], "data": {"sha256": "sha"}})  # fmt: skip
    assert plan_training(config, [], "sha") == REUSE
    other = tiny_config(tmp_path / "data", tmp_path / "run", conditioning="none")
    assert plan_training(other, [], "sha") == TRAIN


def test_a_defense_recorded_before_one_of_its_flags_existed_is_reused(tmp_path: Path) -> None:
    """Likewise a defense's settings: a flag added since (agc_gamma here) took its default."""
    config = tiny_config(tmp_path / "data", tmp_path / "run")
    settings = defense_settings(AntiGradientControl())
    recorded = {k: v for k, v in settings.items() if k != "agc_gamma"}
    write_json(tmp_path / "run" / "memguard.json", {
        "config": to_dict(config), "data": {"sha256": "sha"},
        "defenses": [{"name": "agc", "settings": recorded}],
    })  # fmt: skip
    assert plan_training(config, [AntiGradientControl()], "sha") == REUSE
    changed = AntiGradientControl(gamma=settings["agc_gamma"] + 1)
    assert plan_training(config, [changed], "sha") == TRAIN


def test_arms_start_from_other_arms_and_are_redone_when_their_source_is(tmp_path: Path) -> None:
    spec = yaml.safe_load(SMOKE.read_text())
    spec["seeds"] = [0]
    spec["audit"] |= {"attacks": ["trigger"], "trigger_steps": 2, "attack_max_targets": 1}
    spec["arms"] = {
        "plain": {},
        "wanda": {
            "from": "plain",
            "mitigate": {
                "method": "wanda", "prompts": "{data}/prompts/duplicated.txt", "sparsity": 0.05,
                "num_images": 1, "num_inference_steps": 2,
            },
        },
        "adversarial": {
            "from": "wanda", "strategy": "adversarial", "memorized": "{data}/prompts/memorized.txt",
            "max_train_steps": 2, "adv_inner_steps": 1, "adv_batch_size": 2,
            "adv_surrogate_steps": 2,
        },
    }  # fmt: skip
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    output = tmp_path / "bench"
    runs = {run["arm"]: run for run in _bench(path, output)["runs"]}
    assert [runs[arm]["train"] for arm in ("plain", "wanda", "adversarial")] == [
        "trained", "mitigated", "trained",
    ]  # fmt: skip
    wanda, adversarial = output / "runs/wanda/seed-0", output / "runs/adversarial/seed-0"
    assert json.loads((wanda / "pruning.json").read_text())["num_pruned"] > 0
    assert runs["wanda"]["figures"]["mitigate_seconds"] > 0
    assert "train_seconds" not in runs["wanda"]["figures"]  # not the pruned model's training
    assert runs["wanda"]["settings"]["from"] == "plain"
    fine_tuned = json.loads((adversarial / "memguard.json").read_text())["config"]
    assert fine_tuned["pretrained_model_name_or_path"] == str(wanda)
    assert all(run["figures"]["attacks.trigger.trigger_replicated.n"] == 1 for run in runs.values())

    again = {run["arm"]: run for run in _bench(path, output)["runs"]}
    assert all(run["train"] == run["audit"] == "reused" for run in again.values())
    # only the source is asked for; a retrained source is mitigated and fine-tuned from again
    spec["arms"]["plain"] = {"max_train_steps": 5}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    runs = {run["arm"]: run for run in _bench(path, output, "--arms", "adversarial")["runs"]}
    assert [runs[arm]["train"] for arm in ("plain", "wanda", "adversarial")] == [
        "trained", "mitigated", "trained",
    ]  # fmt: skip


def test_an_arm_from_an_arm_not_listed_before_it_is_an_error(tmp_path: Path) -> None:
    spec = yaml.safe_load(SMOKE.read_text())
    spec["arms"] = {"tuned": {"from": "plain"}, "plain": {}}
    path = tmp_path / "order.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(ConfigError, match="arms.tuned: from: 'plain' is not an arm listed before"):
        load_spec(path)
    spec["arms"] = {"plain": {}, "pruned": {"from": "plain", "mitigate": {"method": "nemo"}}}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(ConfigError, match=r"arms.pruned.mitigate: prompts: required"):
        load_spec(path)
