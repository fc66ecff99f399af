"""An audit's figures as rows (measure, value as text, the rate behind it): the one formatter of
results.json, behind `memguard audit`'s printed summary, `memguard replication`'s lines,
report.html's table and `memguard compare`. A figure added to results.json is added here once.

Every rate is written with its 95% Wilson interval (`memguard.metrics.intervals`); the sections
are replication (Gu et al. 2023) and MQ (IET-AGC, Liu et al., ECCV 2024), detection (Wen et al.,
ICLR 2024), feature similarity (Somepalli et al. 2023), FID/KID on Inception features or on
features trained on the training folder (`memguard.metrics.trained_features`, beside the
replication rows), the section of the audit plugin that ran, formatted by that plugin, and the
attacks on memorized images (DoRI's embedding trigger, Kowalczuk et al., arXiv 2507.16880).
"""

from __future__ import annotations

from memguard.metrics.intervals import format_rate

Row = tuple[str, str, dict | None]  # measure, value as text, the rate behind it (if one)

MQ_LABELS = {
    "iet_mq": "IET's MQ (squared L2, every training row)",
    "mq_distinct_l2": "MQ variant (plain L2, distinct images; not IET's)",
}
MQ_SHOWN = ("0.15", "0.3", "0.5")
GENERATIONS_OF = {"unconditional": "unconditional generations"}


def rate_row(measure: str, rate: dict | None) -> Row:
    return measure, format_rate(rate), rate


def replication_rows(replication: dict) -> list[Row]:
    """Gu et al.'s rates by prompt kind in both conventions, and MQ below a few thresholds."""
    rows: list[Row] = []
    for kind, figures in replication["by_prompt_kind"].items():
        prefix = f"replication, {GENERATIONS_OF.get(kind, f'{kind} prompts')}"
        rows += [
            (f"{prefix}, generations", str(figures["generations"]), None),
            rate_row(f"{prefix}, copies merged", figures["replica_rate"]),
            rate_row(f"{prefix}, every row (Gu et al.'s code)", figures["replica_rate_all_rows"]),
        ]
        if kind != "unconditional":  # where every training image is its own
            rows.append(
                rate_row(f"{prefix}, of their own training image", figures["own_replica_rate"])
            )
    if "images_hit" in replication:
        rows.append(("training images replicated", str(replication["images_hit"]["count"]), None))
    for name, label in MQ_LABELS.items():
        below = replication["mq"][name]["fraction_below"]
        rows += [rate_row(f"{label} < {threshold}", below[threshold]) for threshold in MQ_SHOWN]
    return rows


def detection_rows(detection: dict) -> list[Row]:
    measure = "memorized-prompt detection"
    if detection.get("auc") is None:
        return [(f"{measure} AUC", f"n/a ({detection.get('auc_reason', 'not measured')})", None)]
    return [
        (f"{measure} AUC", f"{detection['auc']:.3f}", None),
        (f"{measure} TPR at 1% FPR (last ROC point with FPR < 1%)",
         f"{detection['tpr_at_1pct_fpr']:.1%}", None),
    ]  # fmt: skip


def similarity_rows(similarity: dict) -> list[Row]:
    measure = f"similarity to the nearest training image ({similarity['descriptor']})"
    return [
        (f"{measure}, mean", f"{similarity['mean']:.3f}", None),
        (f"{measure}, 95th percentile", f"{similarity['p95']:.3f}", None),
        rate_row(f"{measure} > 0.5", similarity["above_0.5"]),
    ]


FEATURES_OF = {  # results.json's quality section -> the features' name in the rows
    "inception_quality": "Inception features",
    "trained_quality": "features trained on the training folder",
}


def quality_rows(results: dict) -> list[Row]:
    """FID/KID of the generations with the features the audit used (Inception, or trained on
    the training folder, with its held-out check); the benchmark plugin's own rows carry its
    judge's. Printed right after the replication rows: quality beside memorization."""
    rows: list[Row] = []
    for key, features in FEATURES_OF.items():
        quality = results.get(key)
        if not quality:
            continue
        rows += [
            (f"FID ({features})", f"{quality['fid']:.3f}", None),
            (f"KID ({features})", f"{quality['kid_mean']:.4f}", None),
            (f"FID/KID ({features}) reference", quality["reference"], None),
        ]
        check = (quality.get("extractor") or {}).get("heldout_check")
        if check is not None:
            verdict = "passed" if check["passed"] else "FAILED: cannot tell a broken model"
            apart = ", ".join(f"{k} {v:.1f}" for k, v in check["separation"].items())
            rows.append((
                f"held-out check of the {features}: degraded images' KID above real ones', in "
                f"standard deviations (>= {check['required_separation']} passes)",
                f"{verdict}: {apart} (FID real halves {check['fid_real_halves']:.3f}, "
                f"degraded / real {check['fid_ratio']:.2f})",
                None,
            ))  # fmt: skip
    if not rows and results.get("quality_features") == "none":
        rows.append(("FID/KID", "not measured (--quality_features none)", None))
    return rows


def headline_rows(results: dict) -> list[list[str]]:
    """[prompt kind, generations, replicas (copies merged), FID, KID, the features]: each
    memorization figure beside the model's quality, the head of the report. The quality is the
    audit's FID/KID (Inception or trained features), else the benchmark judge's."""
    quality, features = None, "not measured"
    for key, name in FEATURES_OF.items():
        if results.get(key):
            quality, features = results[key], name
            break
    if quality is None and (results.get("benchmark") or {}).get("quality"):
        quality, features = results["benchmark"]["quality"], "the benchmark judge's features"
    fid = f"{quality['fid']:.3f}" if quality else "n/a"
    kid = f"{quality['kid_mean']:.4f}" if quality else "n/a"
    return [
        [GENERATIONS_OF.get(kind, f"{kind} prompts"), str(figures["generations"]),
         format_rate(figures["replica_rate"]), fid, kid, features]
        for kind, figures in results["replication"]["by_prompt_kind"].items()
    ]  # fmt: skip


def benchmark_rows(section: dict) -> list[Row]:
    """The plugin's own rows for its section (results.json written before plugins were named
    holds the shapes benchmark's)."""
    from memguard.audit_plugins import plugin_class

    return plugin_class(section.get("name", "shapes")).summary_rows(section)


TRIGGER_PROMPT = "memorized targets replicated from their prompts"
TRIGGER_ATTACK = "memorized targets replicated under the embedding-trigger attack (DoRI)"


def trigger_rows(section: dict) -> list[Row]:
    """The two rates of the trigger attack's targets, side by side: from the prompt, from the
    trigger."""
    return [
        rate_row(TRIGGER_PROMPT, section["prompt_replicated"]),
        rate_row(TRIGGER_ATTACK, section["trigger_replicated"]),
    ]


def summary_rows(results: dict) -> list[Row]:
    """Every figure of an audit's results, in the order the summary prints them."""
    rows = replication_rows(results["replication"])
    rows += quality_rows(results)
    rows += detection_rows(results["detection"])
    if results.get("similarity"):
        rows += similarity_rows(results["similarity"])
    if results.get("benchmark"):
        rows += benchmark_rows(results["benchmark"])
    if (results.get("attacks") or {}).get("trigger"):
        rows += trigger_rows(results["attacks"]["trigger"])
    for defense in results.get("model_training", {}).get("defenses") or []:  # memguard.json's
        leak = (defense.get("report") or {}).get("leak")
        if leak is not None:
            rows.append((f"{defense['name']}: leak certificate", f"{leak:.2e}", None))
    return rows


def text_lines(rows: list[Row]) -> list[str]:
    """Rows as the terminal prints them."""
    return [f"  {measure}: {value}" for measure, value, _ in rows]
