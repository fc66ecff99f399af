"""The demo's chain of commands, end to end on tiny settings: data -> train -> sample -> measure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SMALL_SHAPES
from memguard import cli


def test_data_train_sample_replication(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, model, samples = tmp_path / "data", tmp_path / "model", tmp_path / "samples"
    shapes_flags = [f"--{k}={v}" for k, v in SMALL_SHAPES.items()]
    cli.main(["data", "shapes", "--output_dir", str(data), *shapes_flags])
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model_preset: tiny\nresolution: 8\nmax_text_length: 8\ntrain_batch_size: 8\n"
        "max_train_steps: 4\nlogging_steps: 2\n"
    )
    cli.main(
        ["train", "--config", str(config), "--train_data_dir", str(data / "train"),
         "--output_dir", str(model)]
    )  # fmt: skip
    ordinary = (data / "prompts" / "ordinary.txt").read_text().splitlines()[0]
    cli.main(
        ["sample", "--model", str(model), "--prompt_file", str(data / "prompts/duplicated.txt"),
         "--prompt", ordinary, "--num_images", "2",
         "--num_inference_steps", "3", "--output_dir", str(samples)]
    )  # fmt: skip
    cli.main(
        ["replication", "--samples_dir", str(samples), "--train_data_dir", str(data / "train"),
         "--output", str(tmp_path / "replication.json")]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "benchmark written to" in out and "trained 4 steps" in out
    assert "6 images for 3 prompts" in out
    assert "  replication, duplicated prompts, generations: 4\n" in out
    assert "  IET's MQ (squared L2, every training row) < 0.15: " in out
    summary = json.loads((tmp_path / "replication.json").read_text())
    assert summary["by_prompt_kind"]["duplicated"]["generations"] == 4
    assert summary["by_prompt_kind"]["ordinary"]["replica_rate_all_rows"]["n"] == 2
    assert set(summary["mq"]) == {"iet_mq", "mq_distinct_l2"}
    assert len(summary["generations"]) == 6


def test_missing_prompt_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main(["sample", "--model", str(tmp_path), "--prompt_file", str(tmp_path / "p.txt")])
    assert "--prompt_file: no such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    ["", "data shapes", "train", "sample", "audit", "replication", "report", "compare", "bench",
     "attack trigger", "mitigate"],
)  # fmt: skip
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_code:
        cli.main([*command.split(), "--help"])
    assert exit_code.value.code == 0 and "usage: memguard" in capsys.readouterr().out
