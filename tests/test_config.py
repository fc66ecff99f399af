"""Config loading: YAML and flags share keys; unknown keys and bad values are named."""

from pathlib import Path

import pytest

from memguard import cli
from memguard.config import ConfigError, TrainConfig, build, load_yaml

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_config_loads() -> None:
    values = load_yaml(REPO / "configs" / "benchmark.yaml")
    config = build(TrainConfig, {**values, "train_data_dir": "data"}, source="benchmark.yaml")
    assert config.model_preset == "bench" and config.learning_rate == pytest.approx(1e-3)


def test_unknown_key_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train_data_dir: data\nlearning_rat: 0.1\n")
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", str(path)])
    assert "run.yaml: unknown key 'learning_rat'" in capsys.readouterr().err


def test_bad_value_is_named() -> None:
    with pytest.raises(ConfigError, match=r"learning_rate: expected a number, got 'fast'"):
        build(TrainConfig, {"train_data_dir": "d", "learning_rate": "fast"})
    with pytest.raises(ConfigError, match=r"max_train_steps: must be positive"):
        build(TrainConfig, {"train_data_dir": "d", "max_train_steps": 0})
    with pytest.raises(ConfigError, match=r"mixed_precision: 'fp8' is not one of"):
        build(TrainConfig, {"train_data_dir": "d", "mixed_precision": "fp8"})
    with pytest.raises(ConfigError, match=r"snr_floor: must be between 0 and snr_gamma"):
        build(TrainConfig, {"train_data_dir": "d", "snr_floor": 1.0})  # no snr_gamma


def test_strings_are_coerced_like_cli_values() -> None:
    config = build(
        TrainConfig,
        {"train_data_dir": "d", "use_ema": "true", "learning_rate": "1e-4", "lora_rank": "0"},
    )
    assert config.use_ema is True and config.learning_rate == 1e-4


def test_flags_override_yaml(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train_data_dir: data\nmax_train_steps: 10\nseed: 3\n")
    args = cli.parser().parse_args(["train", "--config", str(path), "--max_train_steps", "20"])
    config = cli._config(TrainConfig, args)
    assert (config.max_train_steps, config.seed) == (20, 3)


def test_cli_reports_bad_values_without_traceback(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--train_data_dir", "d", "--train_batch_size", "many"])
    assert exit_info.value.code == 2
    assert "train_batch_size: expected an integer, got 'many'" in capsys.readouterr().err
