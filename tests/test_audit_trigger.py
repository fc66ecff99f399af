"""`memguard audit --attacks trigger`: the option and its errors, the targets chosen, and the
section of results.json and the report, checked against the attack rerun by hand and against
a model that replicates a target from a trigger but no longer from its prompt (DoRI, Kowalczuk
et al., arXiv 2507.16880)."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import load_file

from helpers import tiny_config, tiny_model_folder
from memguard import Trainer, cli
from memguard.audit import Auditor, run_audit
from memguard.audit_attacks import TriggerAudit
from memguard.audit_plugins.shapes import ShapesBenchmark
from memguard.bench import load_spec
from memguard.config import AuditConfig, ConfigError, build
from memguard.data.folder import ImageFolderDataset, unit_float
from memguard.io import DiffusionModel, load_model
from memguard.metrics.intervals import format_rate, wilson_interval
from memguard.metrics.neighbors import ImageRows, distinct_rows
from memguard.report.html import _image
from memguard.report.summary import TRIGGER_ATTACK, TRIGGER_PROMPT, summary_rows
from memguard.sampling import generate, to_pil
from test_audit import TINY_JUDGE
from test_trigger_attack import RecallingUNet


def _config(model: Path, shapes_dir: Path, output: Path, **overrides) -> AuditConfig:
    settings = {
        "num_images": 1,
        "num_ordinary_prompts": 2,
        "num_inference_steps": 3,
        "detection_seeds": 1,
        "detection_steps": 0,
        "inversion_steps": 0,
        "attacks": ("trigger",),
    }
    return AuditConfig(
        model=str(model),
        train_data_dir=str(shapes_dir / "train"),
        output_dir=str(output),
        **(settings | overrides),
    )


def test_the_attacks_option_and_its_errors(
    shapes_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    flags = ["audit", "--model", "m", "--train_data_dir", "d"]
    args = cli.parser().parse_args([*flags, "--attacks", "trigger", "--attack_max_targets", "3"])
    config = cli._config(AuditConfig, args)
    assert config.attacks == ("trigger",) and config.attack_max_targets == 3
    assert cli._config(AuditConfig, cli.parser().parse_args(flags)).attacks == ()
    assert build(AuditConfig, {"model": "m", "train_data_dir": "d", "attacks": "trigger"}).attacks
    with pytest.raises(SystemExit) as exit_code:
        cli.main([*flags, "--attacks", "trigger", "--attacks", "extraction"])
    assert exit_code.value.code == 2
    assert "attacks: unknown attack 'extraction' (known: trigger)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="names an attack twice"):
        AuditConfig(model="m", train_data_dir="d", attacks=("trigger", "trigger"))
    with pytest.raises(ConfigError, match="attack_targets: the targets of --attacks"):
        AuditConfig(model="m", train_data_dir="d", attack_targets="targets.txt")

    # memguard bench forwards the audit's keys as they are, {data} filled in
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "arms: {plain: {}}\naudit: {attacks: [trigger], attack_targets: '{data}/t.txt'}\n"
    )
    audit = load_spec(spec).audit_config("MODEL", "DATA", "AUDIT", None)
    assert audit.attacks == ("trigger",) and audit.attack_targets == "DATA/t.txt"
    spec.write_text("arms: {plain: {}}\naudit: {attacks: [pruning]}\n")
    with pytest.raises(ConfigError, match=rf"{spec}: audit: attacks: unknown attack 'pruning'"):
        load_spec(spec)

    # a bad target list fails before anything is sampled, naming the file
    model = tiny_model_folder(tmp_path / "model")
    missing = _config(model, shapes_dir, tmp_path / "a", attack_targets=str(tmp_path / "no.txt"))
    with pytest.raises(FileNotFoundError, match="--attack_targets: no such file or folder"):
        Auditor(missing)
    shutil.copy(ImageFolderDataset(shapes_dir / "train", 8).records[0].path, tmp_path / "x.png")
    (tmp_path / "list.txt").write_text("x.png\n")
    uncaptioned = _config(
        model, shapes_dir, tmp_path / "a", attack_targets=str(tmp_path / "list.txt")
    )
    with pytest.raises(ConfigError, match=r"list.txt: x.png has no caption for --trigger_init"):
        Auditor(uncaptioned)
    assert not (tmp_path / "a").exists()


def test_the_targets_are_the_most_replicated_distinct_images(shapes_dir: Path) -> None:
    train = ImageFolderDataset(shapes_dir / "train", 8)
    groups = distinct_rows(ImageRows(train))[1]
    duplicate = ShapesBenchmark().planted_duplicates(train)[0]
    copies = [i for i in range(len(train)) if int(groups[i]) == int(groups[duplicate])]
    other = next(i for i in range(len(train)) if int(groups[i]) != int(groups[duplicate]))
    assert len(copies) >= 2

    def row(index: int, replica: bool = True) -> dict:
        return {"replica": replica, "nearest_file": train.records[index].path.name}

    # a duplicate's copies are hit three times in all, `other` twice, a third image never
    rows = [row(other), row(copies[0]), row(other), row(copies[1]), row(copies[1])]
    rows.append(row(next(i for i in range(len(train)) if i not in (*copies, other)), False))
    replication = {"generations": rows}
    auditor = SimpleNamespace(plugin=None)  # no benchmark: the images found replicated
    config = AuditConfig(model="m", train_data_dir="d", attacks=("trigger",))
    chosen = TriggerAudit(config, 8).choose(auditor, train, groups, replication)
    names = [str(train.records[i].path.relative_to(train.root)) for i in (copies[0], other)]
    assert chosen.targets.names == names and chosen.num_candidates == 2
    assert chosen.targets.prompts == [train.captions[copies[0]], train.captions[other]]
    assert torch.equal(chosen.targets.pixels, train.stacked([copies[0], other]))
    assert "replicated" in chosen.source
    capped = TriggerAudit(AuditConfig(model="m", train_data_dir="d", attack_max_targets=1), 8)
    assert capped.choose(auditor, train, groups, replication).targets.names == names[:1]
    # the benchmark's planted duplicates, one copy of each, come first
    planted = ShapesBenchmark().planted_duplicates(train)
    duplicate_group = train.column("duplicate_group")
    assert sorted(duplicate_group[i] for i in planted) == sorted(
        {g for g in duplicate_group if g >= 0}
    )
    chosen = TriggerAudit(config, 8).choose(
        SimpleNamespace(plugin=ShapesBenchmark()), train, groups, replication
    )
    assert chosen.targets.names == [
        str(train.records[i].path.relative_to(train.root)) for i in planted
    ]
    assert chosen.source == "the planted duplicates of the shapes benchmark"


def _pixels(images: torch.Tensor) -> np.ndarray:
    return images.flatten(1).double().numpy()


def _read_png(path: Path) -> np.ndarray:
    """(H, W, 3) uint8."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_the_audit_attacks_the_planted_duplicates(shapes_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    Trainer(tiny_config(shapes_dir / "train", model_dir, max_train_steps=12)).train()
    output = tmp_path / "audit"
    config = _config(model_dir, shapes_dir, output, replication_threshold=0.4, trigger_steps=12)
    results = run_audit(config, ShapesBenchmark(TINY_JUDGE))
    assert json.loads((output / "results.json").read_text()) == json.loads(json.dumps(results))
    section = results["attacks"]["trigger"]
    folder = Path(section["dir"])
    rows = section["targets"]

    train = ImageFolderDataset(shapes_dir / "train", 8)
    planted = ShapesBenchmark().planted_duplicates(train)
    assert [r["target"] for r in rows] == [train.records[i].path.name for i in planted]
    assert [r["prompt"] for r in rows] == [train.captions[i] for i in planted]
    assert section["settings"]["steps"] == 12 and section["settings"]["seed"] == 0
    assert section["settings"]["init"] == "prompt"
    # the audit's replication criterion and threshold
    assert section["criterion"]["threshold"] == results["replication"]["threshold"] == 0.4

    # every verdict, from the images regenerated by hand: the prompt and the saved trigger,
    # both from the seed's noise, judged by d1/d2 against the distinct training images
    model = load_model(model_dir, "cpu")
    triggers = load_file(folder / "triggers.safetensors")
    prompts = generate(model, [r["prompt"] for r in rows], 1, 0, "dpm", 3, 3.0)
    from_triggers = generate(model, torch.stack([triggers[r["target"]] for r in rows]), 1, 0,
                             "dpm", 3, 3.0)  # fmt: skip
    distinct = np.unique(_pixels(unit_float(train.stacked())), axis=0)
    target_pixels = _pixels(unit_float(train.stacked(planted)))
    for prefix, images in (("prompt", prompts), ("trigger", from_triggers)):
        distances = np.linalg.norm(_pixels(images)[:, None] - distinct[None], axis=2)
        d1, d2 = np.sort(distances, axis=1)[:, :2].T
        nearest = distinct[distances.argmin(axis=1)]
        is_target = (nearest == target_pixels).all(axis=1)
        np.testing.assert_allclose([r[f"{prefix}_ratio"] for r in rows], d1 / d2, rtol=1e-6)
        expected = (d1 / d2 < 0.4) & is_target
        assert [r[f"{prefix}_replicated"] for r in rows] == expected.tolist()
        for row, image in zip(rows, images, strict=True):
            saved = _read_png(folder / row[f"{prefix}_generation"])
            assert np.array_equal(saved, np.asarray(to_pil(image)))
    for row, index in zip(rows, planted, strict=True):
        assert np.array_equal(_read_png(folder / row["image"]), train.pixels(index))
    attack = json.loads((folder / "triggers.json").read_text())
    assert [r["steps_to_replicate"] for r in rows] == [
        r["steps_to_replicate"] for r in attack["targets"]
    ]

    # the rates are those of the rows, with their Wilson intervals
    for key in ("trigger_replicated", "prompt_replicated"):
        count = sum(r[key] for r in rows)
        assert (section[key]["count"], section[key]["n"]) == (count, len(rows))
        assert section[key]["ci95"] == list(wilson_interval(count, len(rows)))
    only = sum(r["trigger_replicated"] and not r["prompt_replicated"] for r in rows)
    assert section["trigger_only"]["count"] == only

    # the summary's two rates, and the report's line and strips: target | prompt | trigger
    assert (TRIGGER_PROMPT, format_rate(section["prompt_replicated"]),
            section["prompt_replicated"]) in summary_rows(results)  # fmt: skip
    assert (TRIGGER_ATTACK, format_rate(section["trigger_replicated"]),
            section["trigger_replicated"]) in summary_rows(results)  # fmt: skip
    printed = cli.audit_summary(results)
    assert f"  {TRIGGER_ATTACK}: {format_rate(section['trigger_replicated'])}" in printed
    page = (output / "report.html").read_text()
    assert (
        f"replicated from their prompts: {format_rate(section['prompt_replicated'])}; under the "
        f"embedding-trigger attack: {format_rate(section['trigger_replicated'])}"
    ) in page
    for row in rows:
        strip = "".join(
            f'<img src="data:image/png;base64,{_image(folder / row[key])}" title="{title}">'
            for key, title in (("image", "target"), ("prompt_generation", "prompt"),
                               ("trigger_generation", "trigger"))
        )  # fmt: skip
        assert f'<figure class="strip">{strip}<figcaption>' in page
        assert html.escape(f"{row['target']}: {row['prompt']}") in page


def test_a_target_replicated_by_its_trigger_and_no_longer_by_its_prompt(
    shapes_dir: Path, tmp_path: Path
) -> None:
    train = ImageFolderDataset(shapes_dir / "train", 8)
    first, second = ShapesBenchmark().planted_duplicates(train)
    ordinary = next(
        i for i, c in enumerate(train.captions) if train.captions.count(c) == 1 and i not in
        (first, second)
    )  # fmt: skip
    listing = tmp_path / "targets.txt"
    for index in (first, second):
        shutil.copy(train.records[index].path, tmp_path / f"target{index}.png")
    listing.write_text("".join(f"target{i}.png\t{train.captions[i]}\n" for i in (first, second)))
    config = _config(
        tiny_model_folder(tmp_path / "model"), shapes_dir, tmp_path / "audit",
        attack_targets=str(listing), trigger_init="unrelated", guidance_scale=1.0,
        benchmark="off",
    )  # fmt: skip
    auditor = Auditor(config)
    # The model holds the first target under its caption; the second's caption now gives an
    # ordinary image (as pruning would leave it), the second itself held under other words.
    encoder = auditor.model.encoder
    keys = [train.captions[first], train.captions[second], "zebra quartz"]
    unet = RecallingUNet(
        encoder.encode(keys),
        train.stacked([first, ordinary, second]).float() / 127.5 - 1.0,
        DDPMScheduler.from_config(auditor.model.scheduler_config),
    )
    auditor.model = DiffusionModel(unet, auditor.model.scheduler_config, encoder, None, {})
    groups = distinct_rows(ImageRows(train))[1]
    section = auditor.attacks["trigger"].run(auditor, train, groups, {"generations": []})

    assert section["targets_from"] == f"--attack_targets {listing}"
    kept, pruned = section["targets"]
    assert [kept["target"], pruned["target"]] == [f"target{first}.png", f"target{second}.png"]
    assert kept["prompt_replicated"] and kept["trigger_replicated"]
    assert not pruned["prompt_replicated"] and pruned["trigger_replicated"]
    assert pruned["steps_to_replicate"] is not None and pruned["trigger_ratio"] < 0.01
    assert (section["prompt_replicated"]["count"], section["prompt_replicated"]["n"]) == (1, 2)
    assert (section["trigger_replicated"]["count"], section["trigger_replicated"]["n"]) == (2, 2)
    assert (section["trigger_only"]["count"], section["trigger_only"]["n"]) == (1, 2)
