"""Models without text (`--conditioning class|none`): the benchmark written without captions or
with a class column, training and exact resume, sampling, the audit's unconditional sections,
IET on an unconditional DDPM (Liu et al.'s setting), and the errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel

from conftest import SMALL_SHAPES
from helpers import kill_after_first_checkpoint, tiny_settings, train_tiny
from memguard import cli
from memguard.audit import Auditor, run_audit
from memguard.audit_plugins.shapes import ShapesBenchmark
from memguard.config import AuditConfig, ConfigError, ShapesConfig
from memguard.data.folder import DataError
from memguard.data.shapes import CLASS_COLUMN, SHAPES, make_shapes_dataset
from memguard.io import load_model
from memguard.metrics.judge import JudgeSpec
from memguard.metrics.replication import MQ_THRESHOLDS
from memguard.sampling import generate
from test_trainer import assert_same_weights

CLASS = {"conditioning": "class", "class_column": CLASS_COLUMN}


@pytest.fixture(scope="module")
def captionless(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small benchmark without a caption column (`--captions none`)."""
    root = tmp_path_factory.mktemp("shapes-none")
    return make_shapes_dataset(ShapesConfig(output_dir=str(root), captions="none", **SMALL_SHAPES))


@pytest.fixture(scope="module")
def classed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small benchmark with a class column instead of captions (`--captions class`)."""
    root = tmp_path_factory.mktemp("shapes-class")
    return make_shapes_dataset(ShapesConfig(output_dir=str(root), captions="class", **SMALL_SHAPES))


@pytest.fixture(scope="module")
def unconditional_model(captionless: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("uncond-model")
    train_tiny(captionless / "train", output, conditioning="none")
    return output


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_the_benchmark_without_captions_or_with_classes_keeps_its_images(
    shapes_dir: Path, captionless: Path, classed: Path
) -> None:
    texted, bare, labelled = (rows(root / "train") for root in (shapes_dir, captionless, classed))
    assert all("text" not in row for row in bare + labelled)
    strip = {"text", CLASS_COLUMN}
    assert [{k: v for k, v in row.items() if k not in strip} for row in texted] == [
        {k: v for k, v in row.items() if k not in strip} for row in bare
    ]
    for name in ("00000.png", texted[-1]["file_name"]):
        assert (shapes_dir / "train" / name).read_bytes() == (
            captionless / "train" / name
        ).read_bytes()
    for row in labelled:  # the shape's index; each planted duplicate a class of its own
        group = row["duplicate_group"]
        expected = SHAPES.index(row["shape"]) if group < 0 else len(SHAPES) + group
        assert row[CLASS_COLUMN] == expected
    assert sum(row["duplicate_group"] >= 0 for row in bare) > 0  # planted duplicates included
    summary = json.loads((classed / "dataset.json").read_text())
    assert (summary["captions"], summary["class_column"]) == ("class", CLASS_COLUMN)


def test_unconditional_training_resumes_to_the_same_weights(captionless, tmp_path) -> None:
    train = captionless / "train"
    metadata = train_tiny(train, tmp_path / "full", conditioning="none", use_ema=True)
    assert metadata["conditioning"] == {"kind": "none"}
    assert "text_encoder" not in metadata
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DModel" and config["num_class_embeds"] is None

    split = dict(conditioning="none", use_ema=True)
    train_tiny(train, tmp_path / "split", checkpointing_steps=3, **split)
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "checkpoint-6")
    (tmp_path / "split" / "diffusion_pytorch_model.safetensors").unlink()
    train_tiny(train, tmp_path / "split", resume_from_checkpoint="latest", **split)
    assert_same_weights(tmp_path / "full", tmp_path / "split")

    model = load_model(tmp_path / "full", "cpu")
    assert isinstance(model.unet, UNet2DModel) and model.encoder is None
    assert model.conditioning.kind == "none"


def test_unconditional_sampling_from_the_command_line(
    unconditional_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "samples"
    flags = ["--num_images", "3", "--num_inference_steps", "2", "--device", "cpu"]
    cli.main(["sample", "--model", str(unconditional_model), "--output_dir", str(out), *flags])
    written = rows(out)
    assert [row["text"] for row in written] == ["", "", ""]
    model = load_model(unconditional_model, "cpu")
    again = generate(model, [""], 3, seed=0, num_inference_steps=2)
    assert again.shape == (3, 3, 8, 8)
    with pytest.raises(ValueError, match="unconditional model"):
        generate(model, ["a red circle"], 1, seed=0, num_inference_steps=2)
    with pytest.raises(SystemExit):
        cli.main(["sample", "--model", str(unconditional_model), "--prompt", "a red circle"])
    assert "takes no prompt or class" in capsys.readouterr().err


def test_unconditional_audit_reports_replication_mq_and_the_images_hit(
    captionless: Path, unconditional_model: Path, tmp_path: Path
) -> None:
    config = AuditConfig(
        model=str(unconditional_model), train_data_dir=str(captionless / "train"),
        output_dir=str(tmp_path / "audit"), benchmark="off", num_inference_steps=2,
        min_generations_per_rate=12, device="cpu",
    )  # fmt: skip
    results = run_audit(config)
    replication = results["replication"]
    assert list(replication["by_prompt_kind"]) == ["unconditional"]
    assert replication["overall"]["generations"] == 12 == len(replication["generations"])
    replicas = sum(g["replica"] for g in replication["generations"])
    assert replication["overall"]["replica_rate"]["count"] == replicas
    hit = replication["images_hit"]
    assert sum(hit["replicas"].values()) == replicas and hit["count"] == len(hit["replicas"])
    for name in ("iet_mq", "mq_distinct_l2"):
        below = replication["mq"][name]["fraction_below"]
        assert set(below) == {f"{t:g}" for t in MQ_THRESHOLDS}
        assert all(rate["n"] == 12 for rate in below.values())
    assert (
        results["detection"]["auc"] is None and "unconditional" in results["detection"]["skipped"]
    )
    assert results["conditioning"] == {"kind": "none"}
    assert (tmp_path / "audit" / "report.html").is_file()
    # by default enough samples for a Wilson 95% interval within 10 points
    data = str(captionless / "train")
    default = Auditor(
        AuditConfig(model=str(unconditional_model), train_data_dir=data, benchmark="off")
    )
    assert default.per_prompt(1) >= 97


def test_class_conditional_training_sampling_and_audit(classed: Path, tmp_path: Path) -> None:
    train = classed / "train"
    metadata = train_tiny(train, tmp_path / "full", **CLASS)
    classes = metadata["conditioning"]["classes"]
    groups = {row["duplicate_group"] for row in rows(train)} - {-1}
    assert len(classes) == len(SHAPES) + len(groups)
    assert json.loads((tmp_path / "full" / "config.json").read_text())["num_class_embeds"] == (
        len(classes) + 1  # and the null class, for guidance
    )
    train_tiny(train, tmp_path / "split", checkpointing_steps=3, **CLASS)
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "checkpoint-6")
    train_tiny(train, tmp_path / "split", resume_from_checkpoint="latest", **CLASS)
    assert_same_weights(tmp_path / "full", tmp_path / "split")

    model = load_model(tmp_path / "full", "cpu")
    images = generate(model, ["0", "4"], 2, seed=0, num_inference_steps=2)
    assert images.shape == (4, 3, 8, 8)
    flags = ["--class_label", "0", "--class_label", "4", "--num_images", "2"]
    out = tmp_path / "samples"
    cli.main(["sample", "--model", str(tmp_path / "full"), "--output_dir", str(out),
              "--num_inference_steps", "2", "--device", "cpu", *flags])  # fmt: skip
    assert [row["text"] for row in rows(out)] == ["0", "0", "4", "4"]
    with pytest.raises(ValueError, match="'99' is not a class"):
        generate(model, ["99"], 1, seed=0, num_inference_steps=2)
    # a class of ordinary images and a planted duplicate's, one rate each
    prompts = tmp_path / "classes.txt"
    prompts.write_text("0\n4\n")
    results = run_audit(AuditConfig(
        model=str(tmp_path / "full"), train_data_dir=str(train), output_dir=str(tmp_path / "a"),
        benchmark="off", num_inference_steps=2, min_generations_per_rate=6, device="cpu",
        prompts=str(prompts), detection_seeds=2,
    ))  # fmt: skip
    by_kind = results["replication"]["by_prompt_kind"]
    assert {kind: by_kind[kind]["generations"] for kind in by_kind} == {
        "duplicated": 6,
        "ordinary": 6,
    }
    assert [p["prompt"] for p in results["replication"]["prompts"]] == ["0", "4"]
    # Wen et al.'s detection: a class's prediction against the null class's
    detection = results["detection"]
    assert [(row["prompt"], row["kind"]) for row in detection["scores"]] == [
        ("0", "ordinary"),
        ("4", "duplicated"),
    ]
    assert detection["auc"] in (0.0, 1.0)


def test_iet_with_agc_and_taa_trains_an_unconditional_ddpm(captionless, tmp_path) -> None:
    metadata = train_tiny(
        captionless / "train", tmp_path / "iet", conditioning="none", strategy="iet",
        num_proxies=2, rounds=1, defense=["agc"], augment="taa", agc_gamma=1.0,
        agc_momentum=0.0, num_train_timesteps=4,
    )  # fmt: skip
    assert metadata["conditioning"] == {"kind": "none"}
    assert metadata["global_step"] == 6
    agc = next(d for d in metadata["defenses"] if d["name"] == "agc")
    assert sum(proxy["samples_skipped"] for proxy in agc["report"]["proxies"]) > 0
    taa = next(d for d in metadata["defenses"] if d["name"] == "taa")
    assert sum(proxy["augmented_samples"] for proxy in taa["report"]["proxies"]) > 0
    assert torch.isfinite(torch.tensor(metadata["final_loss"]))


def test_errors_name_what_is_wrong(shapes_dir: Path, captionless: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing class column 'painter'"):
        train_tiny(
            shapes_dir / "train", tmp_path / "a", conditioning="class", class_column="painter"
        )
    with pytest.raises(ConfigError, match="class_column: required"):
        train_tiny(shapes_dir / "train", tmp_path / "b", conditioning="class")
    with pytest.raises(ConfigError, match="class_column: a setting of --conditioning class"):
        train_tiny(shapes_dir / "train", tmp_path / "c", class_column="shape")
    with pytest.raises(ConfigError, match="works on text conditioning"):
        train_tiny(captionless / "train", tmp_path / "d", conditioning="none",
                   defense=["projection"], concept=["the acme logo"])  # fmt: skip
    with pytest.raises(DataError, match="missing caption column 'text'"):
        train_tiny(captionless / "train", tmp_path / "e")  # text conditioning needs captions


def test_text_only_commands_refuse_a_model_without_text(
    unconditional_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    model = str(unconditional_model)
    for command in (
        ["attack", "trigger", "--model", model, "--images", str(prompts)],
        ["mitigate", "--model", model, "--prompts", str(prompts), "--method", "wanda",
         "--output_dir", str(tmp_path / "pruned")],
    ):  # fmt: skip
        with pytest.raises(SystemExit):
            cli.main(command)
        assert "needs a text-conditional model" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="attacks: the model has conditioning none"):
        Auditor(AuditConfig(model=model, train_data_dir=str(tmp_path), attacks=("trigger",),
                            benchmark="off"))  # fmt: skip


def test_replication_of_unconditional_samples_on_a_captionless_folder(
    captionless: Path, unconditional_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, model = tmp_path / "samples", str(unconditional_model)
    flags = ["--num_images", "4", "--num_inference_steps", "2", "--device", "cpu"]
    cli.main(["sample", "--model", model, "--output_dir", str(out), *flags])
    capsys.readouterr()
    cli.main(["replication", "--samples_dir", str(out), "--train_data_dir",
              str(captionless / "train"), "--output", str(tmp_path / "r.json")])  # fmt: skip
    assert "replication, unconditional generations, generations: 4" in capsys.readouterr().out


def test_a_killed_unconditional_run_resumes_to_the_same_weights(captionless, tmp_path) -> None:
    steps = dict(conditioning="none", max_train_steps=60, checkpointing_steps=10, logging_steps=10)
    train = captionless / "train"
    train_tiny(train, tmp_path / "full", **steps)
    kill_after_first_checkpoint(tiny_settings(train, tmp_path / "killed", **steps))
    train_tiny(train, tmp_path / "killed", resume_from_checkpoint="latest", **steps)
    assert_same_weights(tmp_path / "full", tmp_path / "killed")


def test_the_shapes_plugin_measures_quality_of_an_unconditional_model(
    captionless: Path, unconditional_model: Path, tmp_path: Path
) -> None:
    judge = JudgeSpec(image_size=8, num_train=64, num_heldout=32, steps=2, batch_size=16)
    config = AuditConfig(
        model=str(unconditional_model), train_data_dir=str(captionless / "train"),
        output_dir=str(tmp_path / "audit"), num_inference_steps=2, min_generations_per_rate=8,
        device="cpu",
    )  # fmt: skip
    section = run_audit(config, ShapesBenchmark(judge))["benchmark"]
    assert section["name"] == "shapes"  # declared by the captionless benchmark's dataset.json
    assert section["quality"]["generations"] == 8
    assert {"fid", "kid_mean"} <= set(section["quality"])
    assert set(section["skipped"]) == {"attribute_accuracy", "concept_extraction"}
