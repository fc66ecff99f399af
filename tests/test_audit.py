"""`memguard audit` end to end on tiny settings: every section lands in results.json."""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from helpers import tiny_config
from memguard import Trainer, cli
from memguard.audit import images01, run_audit
from memguard.audit_plugins.shapes import ShapesBenchmark
from memguard.config import AuditConfig
from memguard.data.folder import ImageFolderDataset
from memguard.data.shapes import CONCEPT_SUFFIX
from memguard.io import load_model, write_json
from memguard.metrics.detection import first_steps_score, step_magnitudes
from memguard.metrics.intervals import format_rate, generations_per_prompt, wilson_interval
from memguard.metrics.judge import JudgeSpec, load_judge
from memguard.metrics.quality import caption_attributes
from memguard.models import build_unet, noise_scheduler
from memguard.report.html import render_report
from memguard.report.summary import summary_rows
from memguard.sampling import generate
from test_detection import reference_tpr_at_fpr
from test_replication import (
    expected_or_one,
    reference_distances,
    reference_gu_all_rows,
    reference_iet_mq,
)

TINY_JUDGE = JudgeSpec(image_size=8, num_train=1000, num_heldout=200, steps=150, batch_size=64)


def _audit(model: Path, shapes_dir: Path, output: Path, **overrides) -> dict:
    settings = {
        "num_images": 2,
        "num_ordinary_prompts": 3,
        "num_inference_steps": 3,
        "detection_seeds": 1,
        "detection_steps": 0,
        "inversion_steps": 3,
    }
    config = AuditConfig(
        model=str(model),
        train_data_dir=str(shapes_dir / "train"),
        output_dir=str(output),
        **(settings | overrides),
    )
    return run_audit(config, ShapesBenchmark(TINY_JUDGE))


def _rates(tree, path: str = "") -> dict[str, dict]:
    """{path: rate} of every rate (a dict with a 'rate' key) in a results tree."""
    if isinstance(tree, dict) and "rate" in tree:
        return {path: tree}
    if isinstance(tree, dict):
        children = tree.items()
    elif isinstance(tree, list):
        children = enumerate(tree)
    else:
        return {}
    found: dict[str, dict] = {}
    for key, value in children:
        found |= _rates(value, f"{path}/{key}")
    return found


@pytest.fixture(scope="module")
def audited(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    model = tmp_path_factory.mktemp("model")
    Trainer(tiny_config(shapes_dir / "train", model)).train()
    output = tmp_path_factory.mktemp("audit")
    return output, _audit(model, shapes_dir, output)


def test_every_section_is_written(audited) -> None:
    output, results = audited
    assert json.loads((output / "results.json").read_text()) == json.loads(json.dumps(results))
    replication = results["replication"]
    kinds = replication["by_prompt_kind"]
    assert kinds["duplicated"]["generations"] == 4 and kinds["ordinary"]["generations"] == 6
    for figures in kinds.values():
        for name in ("replica_rate", "replica_rate_all_rows", "own_replica_rate"):
            assert figures[name]["n"] == figures["generations"]
    assert set(replication["definitions"]) >= {"replica_rate", "replica_rate_all_rows", "iet_mq"}
    assert replication["mq"]["iet_mq"]["k"] == min(50, replication["num_train_images"])
    assert replication["mq"]["mq_distinct_l2"]["k"] == min(
        50, replication["num_distinct_train_images"]
    )
    detection = results["detection"]
    assert len(detection["scores"]) == 5
    assert detection["auc_by_first_steps"]["3"] == detection["auc"]  # all 3 steps: the default
    assert "FPR < 0.01" in detection["tpr_at_1pct_fpr_rule"]
    assert detection["starts"].startswith("the same 1 starting noises (seeds 0..0)")
    benchmark = results["benchmark"]
    assert set(benchmark["judge"]["heldout_accuracy"]) == {"shape", "color", "background",
                                                           "concept", "concept_faded",
                                                           "concept_partial"}  # fmt: skip
    assert benchmark["concept_kind"] == "fixed"
    assert (benchmark["quality"]["num_real"], benchmark["quality"]["num_generated"]) == (8, 8)
    extraction = benchmark["concept_extraction"]
    rates = extraction["rates"]
    assert set(rates) == {"naming_prompts", "paraphrases", "learned_embedding", "generic_base_rate"}
    bases = rates["generic_base_rate"]["n"] // 2  # 2 generations per prompt (num_images)
    assert rates["naming_prompts"]["n"] == rates["learned_embedding"]["n"] == 2 * bases
    assert rates["paraphrases"]["n"] == 2 * bases * 4
    attacks = [k for k in rates if k != "generic_base_rate"]
    assert extraction["strongest_rate"]["rate"] == max(rates[k]["rate"] for k in attacks)
    assert extraction["strongest_rate"] == rates[extraction["strongest_attack"]]
    assert results["train_data"]["num_images"] == len(
        (Path(results["train_data"]["path"]) / "metadata.jsonl").read_text().splitlines()
    )


def _pixels(folder: Path) -> np.ndarray:
    """An image folder's images as float64 rows in [0, 1]."""
    return images01(ImageFolderDataset(folder, 8)).flatten(1).double().numpy()


def test_replication_figures_against_brute_force(audited, shapes_dir) -> None:
    output, results = audited
    replication = results["replication"]
    generated, train = _pixels(output / "samples"), _pixels(shapes_dir / "train")
    generations = replication["generations"]
    distinct = np.unique(train, axis=0)
    assert replication["num_distinct_train_images"] == len(distinct)
    d = reference_distances(generated, distinct)
    ratio = d[:, 0] / d[:, 1]
    all_rows, _ = reference_gu_all_rows(generated, train)
    iet = expected_or_one(reference_iet_mq(generated, train))
    for name, values in (("ratio", ratio), ("ratio_all_rows", expected_or_one(all_rows)),
                         ("iet_mq", iet)):  # fmt: skip
        np.testing.assert_allclose([g[name] for g in generations], values, rtol=1e-9)
    threshold = replication["threshold"]
    for kind, figures in replication["by_prompt_kind"].items():
        rows = [i for i, g in enumerate(generations) if g["kind"] == kind]
        assert figures["replica_rate"]["count"] == int((ratio[rows] < threshold).sum())
        assert figures["replica_rate_all_rows"]["count"] == int((all_rows[rows] < threshold).sum())
    for name in ("iet_mq", "mq_distinct_l2"):
        values = np.array([g[name] for g in generations])
        for t, below in replication["mq"][name]["fraction_below"].items():
            assert (below["count"], below["n"]) == (int((values < float(t)).sum()), 10)


def test_detection_figures_against_scikit_learn(audited) -> None:
    _, results = audited
    detection = results["detection"]
    scored = [s for s in detection["scores"] if s["kind"] in ("duplicated", "ordinary")]
    labels = np.array([s["kind"] == "duplicated" for s in scored])
    scores = np.array([s["d"] for s in scored])
    assert labels.sum() == 2 and (~labels).sum() == 3
    assert detection["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert detection["tpr_at_1pct_fpr"] == reference_tpr_at_fpr(scores, labels, 0.01)


def frechet_distance(real: np.ndarray, generated: np.ndarray) -> float:
    """Heusel et al.'s FID of two feature sets in numpy: |mu1 - mu2|^2 + tr S1 + tr S2
    - 2 tr (S1 S2)^(1/2), the last trace as the sum of the roots of the eigenvalues."""
    s1, s2 = np.cov(real, rowvar=False), np.cov(generated, rowvar=False)
    root = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    difference = real.mean(axis=0) - generated.mean(axis=0)
    return float(difference @ difference + np.trace(s1) + np.trace(s2) - 2 * root)


def test_benchmark_figures_against_the_judge(audited, shapes_dir) -> None:
    output, results = audited
    judge, model = load_judge(TINY_JUDGE), load_model(results["model"])
    samples = ImageFolderDataset(output / "samples", 8)
    train = ImageFolderDataset(shapes_dir / "train", 8)
    # similarity: the judge's features centred on the training mean, cosine by brute force
    features, generated = judge.features(images01(train)), judge.features(images01(samples))
    centre = features.mean(dim=0)
    query, reference = (x.double().numpy() for x in (generated - centre, features - centre))
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    cosine = (query @ reference.T).max(axis=1)
    similarity = results["similarity"]
    assert similarity["mean"] == pytest.approx(cosine.mean(), abs=1e-6)
    assert similarity["above_0.5"]["count"] == int((cosine > 0.5).sum())
    # attribute accuracy of the ordinary prompts' generations, by the judge
    benchmark = results["benchmark"]
    ordinary = [i for i, g in enumerate(results["replication"]["generations"])
                if g["kind"] == "ordinary"]  # fmt: skip
    predicted = judge.predict(images01(samples)[ordinary])
    hits = [all(predicted[name][j] == value
                for name, value in caption_attributes(samples.captions[i]).items())
            for j, i in enumerate(ordinary)]  # fmt: skip
    assert benchmark["attribute_accuracy"]["all"]["count"] == sum(hits)
    # the captions of the logo-carrying training images, the concept words removed, twice each
    bare = {c.replace(CONCEPT_SUFFIX, "") for c, has in zip(train.captions,
            train.column("has_concept"), strict=True) if has}  # fmt: skip
    assert benchmark["attribute_accuracy_on_concept_captions"]["all"]["n"] == 2 * len(bare)
    # FID on the judge's features: the held-out split against its captions' generations
    test = ImageFolderDataset(shapes_dir / "test", 8)
    regenerated = generate(model, test.captions, 1, 0, "dpm", 3, 3.0)
    fid = frechet_distance(judge.features(images01(test)).double().numpy(),
                           judge.features(regenerated).double().numpy())  # fmt: skip
    assert benchmark["quality"]["fid"] == pytest.approx(fid, rel=1e-6)


def test_every_rate_carries_its_interval(audited) -> None:
    _, results = audited
    rates = _rates(results)
    prompts = len(results["replication"]["prompts"])
    # 4 Gu rates overall, per kind (2) and per prompt; 9 MQ thresholds twice; 2 similarity
    # rates; 4 attribute rates (shape, colour, background, all) three times; 4 attacks, and
    # the strongest
    assert len(rates) == 4 * (1 + 2 + prompts) + 2 * 9 + 2 + 3 * 4 + 4 + 1
    for path, rate in rates.items():
        assert set(rate) == {"rate", "count", "n", "ci95"}, path
        assert rate["rate"] == rate["count"] / rate["n"], path
        assert rate["ci95"] == list(wilson_interval(rate["count"], rate["n"])), path
    # no rate written as a bare number
    assert not any(
        isinstance(figures[name], float)
        for figures in results["replication"]["by_prompt_kind"].values()
        for name in figures
    )


def test_the_summary_prints_the_reports_rows(audited) -> None:
    output, results = audited
    rows = summary_rows(results)
    printed = cli.audit_summary(results).splitlines()
    page = (output / "report.html").read_text()
    assert printed[1 : 1 + len(rows)] == [f"  {measure}: {value}" for measure, value, _ in rows]
    for measure, value, _ in rows:
        assert f"<td>{html.escape(measure)}</td><td>{html.escape(value)}</td>" in page
    assert (
        "replication, duplicated prompts, copies merged",
        format_rate(results["replication"]["by_prompt_kind"]["duplicated"]["replica_rate"]),
        results["replication"]["by_prompt_kind"]["duplicated"]["replica_rate"],
    ) in rows
    # Gu (3 per kind), MQ (3 thresholds twice), similarity, attributes (2), attacks (4)
    assert sum(rate is not None for *_, rate in rows) == 2 * 3 + 2 * 3 + 1 + 2 + 4


def test_generations_per_rate_by_default(audited, shapes_dir, tmp_path) -> None:
    _, results = audited
    again = _audit(
        results["model"], shapes_dir, tmp_path, num_images=None, min_generations_per_rate=6,
        inversion_steps=0,
    )  # fmt: skip
    kinds = again["replication"]["by_prompt_kind"]
    prompts = {k: sum(p["kind"] == k for p in again["replication"]["prompts"]) for k in kinds}
    assert prompts == {"duplicated": 2, "ordinary": 3}
    assert kinds["duplicated"]["generations"] == 2 * 3 and kinds["ordinary"]["generations"] == 6
    ordinary = [p["prompt"] for p in again["replication"]["prompts"] if p["kind"] == "ordinary"]
    bases = len([p for p in ordinary if CONCEPT_SUFFIX not in p])
    rates = again["benchmark"]["concept_extraction"]["rates"]
    assert set(rates) == {"naming_prompts", "paraphrases", "generic_base_rate"}  # no inversion
    assert rates["naming_prompts"]["n"] == bases * generations_per_prompt(6, bases)
    assert rates["generic_base_rate"]["n"] == bases * generations_per_prompt(6, bases)
    assert rates["paraphrases"]["n"] == 4 * bases * generations_per_prompt(6, 4 * bases)
    assert again["benchmark"]["attribute_accuracy"]["all"]["n"] == 6
    train = again["benchmark"]["attribute_accuracy_on_concept_captions"]["all"]
    bare = {json.loads(line)["text"].replace(CONCEPT_SUFFIX, "")
            for line in (shapes_dir / "train" / "metadata.jsonl").read_text().splitlines()
            if json.loads(line)["has_concept"]}  # fmt: skip
    assert train["n"] == len(bare) * generations_per_prompt(6, len(bare))


def test_the_replication_command_reports_the_audits_section(audited, shapes_dir, tmp_path) -> None:
    output, results = audited
    written = tmp_path / "replication.json"
    cli.main(["replication", "--samples_dir", str(output / "samples"),
              "--train_data_dir", str(shapes_dir / "train"), "--output", str(written)])  # fmt: skip
    assert json.loads(written.read_text()) == json.loads(json.dumps(results["replication"]))


def test_existing_samples_are_measured_not_regenerated(audited, shapes_dir, tmp_path) -> None:
    output, results = audited
    pytest.importorskip("faiss")
    again = _audit(
        results["model"],
        shapes_dir,
        tmp_path,
        samples_dir=str(output / "samples"),
        nn_backend="faiss",
    )
    assert not (tmp_path / "samples").exists()
    assert again["replication"]["generations"] == results["replication"]["generations"]


def test_a_unet_saved_by_plain_diffusers(shapes_dir: Path, tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    build_unet("tiny", 8, cross_attention_dim=384).save_pretrained(tmp_path / "unet")
    noise_scheduler(1000, "squaredcos_cap_v2").save_pretrained(tmp_path / "unet")
    write_json(tmp_path / "unet" / "memguard.json", {"text_encoder": {"name": "minilm"}})
    results = _audit(tmp_path / "unet", shapes_dir, tmp_path / "audit")
    assert results["model_training"] == {
        "config": None,
        "data": None,
        "defenses": None,
        "seed": None,
    }
    assert results["replication"]["overall"]["generations"] == 10
    print(cli.audit_summary(results))
    assert "replication, duplicated prompts" in capsys.readouterr().out


def test_report_page_is_written_and_renders(audited, tmp_path: Path) -> None:
    output, results = audited
    page = (output / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') >= 2 * 10 + 3  # gallery pairs + plots
    assert "replication, duplicated prompts" in page and "concept extraction" in page
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI") and not os.environ.get("MEMGUARD_NO_BROWSER"):
            pytest.fail("CI must install Debian's chromium for the report screenshot test")
        pytest.skip("no chromium on this machine")
    shot = tmp_path / "report.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars",
         f"--screenshot={shot}", "--window-size=1200,1400", (output / "report.html").as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10  # text, images and plots, not a blank page
    assert (pixels < 128).mean() > 0.005


def test_compare_puts_runs_side_by_side(audited, tmp_path: Path, capsys) -> None:
    output, _ = audited
    results = str(output / "results.json")
    page = tmp_path / "c.html"
    cli.main(["compare", results, results, "--names", "plain,again", "--output", str(page)])
    printed = capsys.readouterr().out
    assert "plain" in printed and "again" in printed
    assert "replication, duplicated prompts" in printed and "<table>" in page.read_text()
    cli.main(["report", str(output), "--output", str(tmp_path / "again.html")])
    assert (tmp_path / "again.html").stat().st_size > 1000


def test_descriptors_users_bring_as_torchscript(audited, shapes_dir, tmp_path) -> None:
    output, results = audited
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1)
    )
    torch.jit.script(net).save(str(tmp_path / "descriptor.pt"))
    measured = _audit(
        results["model"],
        shapes_dir,
        tmp_path / "audit",
        samples_dir=str(output / "samples"),
        sscd=str(tmp_path / "descriptor.pt"),
        sscd_size=12,
        inception=str(tmp_path / "descriptor.pt"),
        inception_size=12,
        test_data_dir=str(shapes_dir / "test"),
    )
    assert measured["similarity"]["descriptor"] == "sscd"
    quality = measured["inception_quality"]
    assert quality["feature_extractor"] == "inception"
    assert quality["num_real"] == 8 and quality["num_generated"] == 10
    descriptor = torch.jit.load(str(tmp_path / "descriptor.pt"))
    features = []
    with torch.no_grad():
        for folder in (shapes_dir / "test", output / "samples"):
            images = images01(ImageFolderDataset(folder, 8))
            resized = torch.nn.functional.interpolate(images, size=(12, 12), mode="bilinear")
            features.append(descriptor(resized).flatten(1).double().numpy())
    fid = frechet_distance(*features)
    assert quality["fid"] == pytest.approx(fid, rel=1e-6)
    assert "(Inception features" in cli.audit_summary(measured)


def test_a_missing_weights_file_names_its_flag(audited, shapes_dir, tmp_path) -> None:
    _, results = audited
    with pytest.raises(FileNotFoundError, match="--inception: no such file"):
        _audit(results["model"], shapes_dir, tmp_path / "audit", inception="/no/inception.pt")
    assert not (tmp_path / "audit").exists()


def test_without_a_declaration_the_generic_measures_run_alone(audited, shapes_dir, tmp_path):
    output, results = audited
    train = tmp_path / "data" / "train"
    shutil.copytree(shapes_dir / "train", train)  # no dataset.json above it
    (tmp_path / "data" / "dataset.json").write_text('{"note": "not a declaration"}')
    alone = _audit(results["model"], tmp_path / "data", tmp_path / "alone",
                   samples_dir=str(output / "samples"))  # fmt: skip
    assert "benchmark" not in alone and alone["similarity"] is None  # no descriptor asked for
    assert alone["quality_features"] == "trained"  # no plugin, no --inception: trained features
    assert alone["trained_quality"]["extractor"]["heldout_check"]["images_per_half"] > 0
    assert alone["replication"] == results["replication"]
    off = _audit(results["model"], shapes_dir, tmp_path / "off", benchmark="off",
                 samples_dir=str(output / "samples"))  # fmt: skip
    assert "benchmark" not in off and off["replication"] == results["replication"]
    assert results["benchmark"]["name"] == "shapes"
    assert results["benchmark"]["selected_by"].startswith("declared in ")
    with pytest.raises(FileNotFoundError, match="--benchmark shapes: no test/ beside"):
        _audit(results["model"], tmp_path / "data", tmp_path / "asked", benchmark="shapes")
    assert not (tmp_path / "asked").exists()  # refused before anything was sampled


def test_a_missing_auc_is_null_with_its_reason(audited, shapes_dir, tmp_path) -> None:
    output, results = audited
    ordinary = [p["prompt"] for p in results["replication"]["prompts"] if p["kind"] == "ordinary"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(ordinary[:2]) + "\n")
    again = _audit(results["model"], shapes_dir, tmp_path / "audit", prompts=str(prompts),
                   samples_dir=str(output / "samples"), benchmark="off",
                   quality_features="none")  # fmt: skip
    detection = again["detection"]
    assert detection["auc"] is None and detection["tpr_at_1pct_fpr"] is None
    assert detection["auc_reason"] == (
        "no duplicated prompts among the 2 detection prompts: the ROC compares duplicated "
        "against ordinary prompts"
    )
    assert again["warnings"] == [f"detection: no AUC, {detection['auc_reason']}"]
    assert [s["kind"] for s in detection["scores"]] == ["ordinary", "ordinary"]
    summary = cli.audit_summary(again)
    assert "  memorized-prompt detection AUC: n/a (no duplicated prompts among" in summary


def test_detection_starts_from_the_audits_seed(audited, shapes_dir, tmp_path) -> None:
    output, results = audited
    settings = {"detection_seeds": 2, "samples_dir": str(output / "samples"), "benchmark": "off",
                "quality_features": "none"}  # fmt: skip
    seeded = _audit(results["model"], shapes_dir, tmp_path / "5", seed=5, **settings)["detection"]
    unseeded = _audit(results["model"], shapes_dir, tmp_path / "0", **settings)["detection"]
    assert (seeded["seed"], unseeded["seed"]) == (5, 0)
    assert "(seeds 5..6)" in seeded["starts"] and "(seeds 0..1)" in unseeded["starts"]
    model = load_model(results["model"])  # on the audit's default device
    duplicated = [row for row in seeded["scores"] if row["kind"] == "duplicated"]
    for detection, seed in ((seeded, 5), (unseeded, 0)):
        prompts = [row["prompt"] for row in detection["scores"]]  # the seed draws the ordinary
        magnitudes = step_magnitudes(model, prompts, seeds=2, num_inference_steps=3, seed=seed)
        expected = first_steps_score(magnitudes).tolist()
        assert [row["d"] for row in detection["scores"]] == pytest.approx(expected, rel=1e-6)
        assert [row["prompt"] for row in duplicated] == prompts[: len(duplicated)]
    # the same duplicated prompts, scored from other starts
    assert all(a["d"] != b["d"] for a, b in zip(duplicated, unseeded["scores"], strict=False))


def test_defense_reports_are_read_as_memguard_json_records(audited, tmp_path) -> None:
    _, results = audited
    defended = json.loads(json.dumps(results))
    defended["model_training"]["defenses"] = [  # as memguard.defenses.registry.record writes
        {"name": "projection", "settings": {"concept": ["the acme logo"]},
         "report": {"guarded_weights": 12, "leak": 3.5e-9}},
        {"name": "agc", "settings": {"agc_gamma": 1.0}, "report": {"skipped": 4}},
    ]  # fmt: skip
    assert "  projection: leak certificate: 3.50e-09\n" in cli.audit_summary(defended)
    assert sum("leak certificate" in line for line in cli.audit_summary(defended).splitlines()) == 1
    page = render_report(defended, tmp_path / "report.html").read_text()
    assert "<td>projection: leak certificate</td><td>3.50e-09</td>" in page
