"""Audit: what a diffusion model reproduces, beside its quality, against its training folder.

Works on any model folder `memguard.io.load_model` reads (memguard's output, a diffusers
UNet folder, a Stable Diffusion pipeline folder) and the image folder it was trained on:

- replication: Gu et al.'s d1/d2 criterion (copies merged, and over every training row as the
  paper's code counts), IET's MQ (and memguard's variant on distinct images, named apart), and
  which training images are hit (`memguard.metrics.replication`);
- feature similarity (Somepalli et al. 2023) with SSCD from a local TorchScript file, or the
  features an audit plugin offers (`memguard.metrics.similarity`);
- prompt-level detection (Wen et al., ICLR 2024): d(p) per prompt, AUC and TPR at 1% FPR of
  duplicated against ordinary prompts; without both kinds among the prompts the AUC is null,
  with the reason, and a warning;
- FID/KID (`--quality_features`) with an Inception network from a local TorchScript file, the
  plugin's features, or, with neither, a network trained on the training folder itself (SimCLR,
  Chen et al. 2020; `memguard.metrics.trained_features`), cached by the data's hash and checked
  on held-out images against degraded ones, so that real data has a quality figure too; which
  extractor served is recorded (`quality_features`);
- the measures of an audit plugin, when one is selected (`memguard.audit_plugins`): on the
  shapes benchmark, the judge's held-out accuracy, FID/KID against the held-out split,
  attribute accuracy, and concept extraction;
- with `--attacks trigger`, replication of the memorized images (the plugin's planted
  duplicates, else the images found replicated, or `--attack_targets`) under DoRI's
  embedding-trigger attack (Kowalczuk et al., arXiv 2507.16880) beside their prompts'
  (`memguard.audit_attacks`).

A model without text (`memguard.conditioning`: class-conditional or unconditional, IET-AGC's
DDPM setting, Liu et al., ECCV 2024) is audited on what it generates by itself: an
unconditional model draws `min_generations_per_rate` samples (or `--num_images`) from the empty
prompt, all of one kind ("unconditional"); a class-conditional one is audited as a text one with
its classes for prompts (duplicated: the classes of planted duplicates, or of repeated images);
replication (Gu et al.'s fraction of replicas in both conventions, MQ at every threshold, the
count of replicas of every training image hit) and FID/KID are measured as for text, and the
caption-based sections (the plugin's attribute accuracy and concept extraction, the attacks) are
skipped with the reason in results.json, and so is Wen et al.'s detection for an unconditional
model (a class model's classes are scored as prompts are, against the null class).

Prompts come in three kinds: *duplicated* (a planted duplicate's caption when the folder has a
`duplicate_group` column, otherwise a training caption with a repeated image), *ordinary* (any
other training caption) and *unseen*. Every rate is reported with its 95% Wilson interval
(`memguard.metrics.intervals`), and each rests on at least `min_generations_per_rate`
generations: a set of P prompts behind one rate (a prompt kind, an attack) is sampled
ceil(min_generations_per_rate / P) times per prompt, unless `num_images` fixes the count.
Everything lands in one `results.json`.

Memory and devices: the training folder is streamed, `chunk_size` images at a time, through
exact-duplicate merging, the nearest-neighbour searches, the descriptors and FID/KID, so a
Stable Diffusion-sized training set never sits in memory (the generations do). The model
(sampling, detection, textual inversion), the searches and the user's TorchScript descriptors
run on `device`; the text encoder and the benchmark's judge stay on the CPU, where their inputs
are and where, small beside the UNet, they cost less than the transfers would.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from memguard import __version__
from memguard.audit_attacks import ATTACK_RUNNERS
from memguard.audit_plugins import AuditPlugin, plugin_class, selected
from memguard.conditioning import Unconditional
from memguard.config import AuditConfig, ConfigError, to_dict
from memguard.data.folder import ImageFolderDataset, fingerprint, read_metadata, unit_float
from memguard.io import DiffusionModel, load_model, write_json
from memguard.metrics.descriptors import ScriptedDescriptor, check_file
from memguard.metrics.detection import MemorizationDetection, first_steps_score, step_magnitudes
from memguard.metrics.intervals import generations_per_prompt, rate_of
from memguard.metrics.neighbors import ImageRows, distinct_rows
from memguard.metrics.replication import MQ_K, Replication, fractions_below, replication_metrics
from memguard.metrics.similarity import Descriptor, FeatureSimilarity, similarity_summary
from memguard.metrics.trained_features import heldout_split, load_trained_features
from memguard.report.html import render_report
from memguard.sampling import generate, save_samples

RESULTS_FILE = "results.json"
REPORT_FILE = "report.html"


# ------------------------------------------------------------------------------- folders


def load_folders(
    samples_dir: str | Path, train_data_dir: str | Path
) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """Generations and training images, the latter at the generations' resolution (a training
    folder without a caption column, for a model without text, is read without captions)."""
    with Image.open(read_metadata(samples_dir)[0].path) as first:
        resolution = first.size[0]
    samples = ImageFolderDataset(samples_dir, resolution=resolution)
    rows = read_metadata(train_data_dir, caption_column=None)
    captions = "text" if all("text" in row.columns for row in rows) else None
    return samples, ImageFolderDataset(train_data_dir, resolution, caption_column=captions)


def images01(dataset: ImageFolderDataset) -> torch.Tensor:
    """(N, 3, H, W) float in [0, 1]: for the generations, which the audit holds in memory."""
    return unit_float(dataset.stacked())


def duplicated_captions(
    train: ImageFolderDataset, groups: list[int], conditions: Sequence[str] | None = None
) -> set[str]:
    """Captions (`conditions`: the training images' classes, say) of planted duplicates (ground
    truth) or, without it, of repeated images."""
    conditions = train.captions if conditions is None else conditions
    planted = train.column("duplicate_group")
    if any(g is not None for g in planted):
        return {c for c, g in zip(conditions, planted, strict=True) if g is not None and g >= 0}
    size = Counter(groups)
    return {c for c, g in zip(conditions, groups, strict=True) if size[g] > 1}


def unconditional(prompt: str) -> str:
    """The one kind of every generation of an unconditional model."""
    return "unconditional"


PROMPT_KINDS = ("duplicated", "ordinary", "unseen", "unconditional")


class PromptKinds:
    """duplicated / ordinary / unseen, from the training folder; `conditions`: what a prompt is
    (default: the training captions; a class-conditional model's classes)."""

    def __init__(
        self, train: ImageFolderDataset, groups: list[int], conditions: Sequence[str] | None = None
    ) -> None:
        conditions = train.captions if conditions is None else conditions
        self.training = set(conditions)
        self.duplicated = duplicated_captions(train, groups, conditions)

    def __call__(self, prompt: str) -> str:
        if prompt not in self.training:
            return "unseen"
        return "duplicated" if prompt in self.duplicated else "ordinary"


# --------------------------------------------------------------------------- replication

DEFINITIONS = {
    "replica_rate": "Gu et al. 2023, copies merged: d1/d2 < threshold with d1, d2 the distances to "
    "the two nearest DISTINCT training images, so a copy of a duplicated image counts",
    "replica_rate_all_rows": "Gu et al. 2023 as DiffMemorize's mem_ratio.py computes it: d1/d2 < "
    "threshold over every training row, so a copy of an image duplicated in the training set "
    "has d1 = d2 and does not count",
    "own_replica_rate": "replica (copies merged) whose nearest image carries the prompt as caption "
    "(its class, for a class-conditional model; any image, for an unconditional one)",
    "nearest_is_own_rate": "the nearest distinct training image carries the prompt as caption "
    "(as above)",
    "images_hit": "every training image some generation replicates (copies merged, the image "
    "nearest to the replica), with the number of replicas of it",
    "iet_mq": "IET-AGC (Liu et al., ECCV 2024), attack/all_in.py: d1^2 / mean(d1^2..dk^2), squared "
    "L2 to the k nearest training rows, copies kept, the mean including d1",
    "mq_distinct_l2": "memguard's variant, not IET's figure: d1 / mean(d1..dk), plain L2 to the k "
    "nearest distinct training images, copies merged",
}


RATES = {  # rate in results.json: the flag of each generation it counts
    "replica_rate": "replica",
    "replica_rate_all_rows": "replica_all_rows",
    "own_replica_rate": "own_replica",
    "nearest_is_own_rate": "nearest_is_own",
}


def _figures(rows: list[dict]) -> dict:
    """The rates of a set of generations (at least one)."""
    rates = {name: rate_of(row[flag] for row in rows) for name, flag in RATES.items()}
    return {"generations": len(rows), **rates}


def _generation_rows(
    samples: ImageFolderDataset,
    train: ImageFolderDataset,
    result: Replication,
    mq: dict[str, torch.Tensor],
    kinds: Callable[[str], str],
    conditions: Sequence[str],
) -> list[dict]:
    """One row per generation: its prompt and kind, both Gu ratios and verdicts, both MQs.
    `conditions`: each training image's condition (its caption, class, or "")."""
    groups_of_caption: dict[str, set[int]] = defaultdict(set)
    for caption, group in zip(conditions, result.groups.tolist(), strict=True):
        groups_of_caption[caption].add(group)
    rows = []
    for i, prompt in enumerate(samples.captions):
        replica = bool(result.is_replica[i])
        own = int(result.nearest_group[i]) in groups_of_caption.get(prompt, set())
        rows.append(
            {
                "file_name": samples.records[i].path.name,
                "prompt": prompt,
                "kind": kinds(prompt),
                "ratio": float(result.ratio[i]),
                "replica": replica,
                "ratio_all_rows": float(result.ratio_all_rows[i]),
                "replica_all_rows": bool(result.is_replica_all_rows[i]),
                "own_replica": replica and own,
                "nearest_is_own": own,
                "nearest_file": train.records[int(result.nearest[i])].path.name,
                **{name: float(values[i]) for name, values in mq.items()},
            }
        )
    return rows


def replication_summary(
    samples: ImageFolderDataset,
    train: ImageFolderDataset,
    generated: torch.Tensor,  # images01(samples)
    threshold: float = 1 / 3,
    backend: str = "torch",
    distinct: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_size: int = AuditConfig.chunk_size,
    device: str | torch.device | None = None,
    kinds: Callable[[str], str] | None = None,
    conditions: Sequence[str] | None = None,
) -> dict:
    """The replication section of results.json, for the audit and `memguard replication` alike:
    Gu et al.'s criterion in both conventions, overall, by prompt kind and by prompt; IET's MQ
    and memguard's variant; the training images hit most. One exact search of the distinct
    training images, streamed from the folder `chunk_size` images at a time on `device`,
    serves every figure (`distinct`: `distinct_rows` of the training images, when already
    computed). `kinds`: each prompt's kind (default: duplicated / ordinary / unseen by the
    training captions); `conditions`: each training image's condition that a prompt is compared
    with for the "own" rates (default: its caption)."""
    reference = ImageRows(train)
    if distinct is None:
        distinct = distinct_rows(reference, chunk_size)
    metrics = replication_metrics(
        reference, distinct, threshold, backend=backend, chunk_size=chunk_size
    ).to(device or "cpu")
    metrics.update(generated)
    result, mq = metrics["replication"].compute(), metrics["mq"].compute()
    conditions = train.captions if conditions is None else conditions
    kinds = kinds or PromptKinds(train, result.groups.tolist(), conditions)
    generations = _generation_rows(samples, train, result, mq, kinds, conditions)
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for row in generations:
        by_prompt[row["prompt"]].append(row)
    hits = Counter(row["nearest_file"] for row in generations if row["replica"])
    caption_of = {record.path.name: record.text for record in train.records}
    num_distinct = len(distinct[0])
    return {
        "criterion": "Gu et al. 2023: a replica when d1/d2 < threshold, pixel space",
        "definitions": DEFINITIONS,
        "threshold": threshold,
        "resolution": samples.resolution,
        "num_train_images": len(train),
        "num_distinct_train_images": num_distinct,
        "overall": _figures(generations),
        "by_prompt_kind": {
            kind: _figures([r for r in generations if r["kind"] == kind])
            for kind in PROMPT_KINDS
            if any(r["kind"] == kind for r in generations)
        },
        "prompts": [
            {"prompt": p, "kind": kinds(p), **_figures(rows)} for p, rows in by_prompt.items()
        ],
        "mq": {
            "iet_mq": {"k": min(MQ_K, len(train)), "fraction_below": fractions_below(mq["iet_mq"])},
            "mq_distinct_l2": {
                "k": min(MQ_K, num_distinct),
                "fraction_below": fractions_below(mq["mq_distinct_l2"]),
            },
        },
        "most_replicated": [
            {"file_name": name, "caption": caption_of[name], "replicas": count}
            for name, count in hits.most_common(20)
        ],
        "images_hit": {
            "count": len(hits),
            "replicas": dict(sorted(hits.items(), key=lambda item: (-item[1], item[0]))),
        },
        "generations": generations,
    }


# --------------------------------------------------------------------------------- audit


def default_prompts(train: ImageFolderDataset, kinds: PromptKinds, count: int, seed: int):
    """Every duplicated caption, then `count` other training captions drawn with `seed`."""
    duplicated = [c for c in dict.fromkeys(train.captions) if c in kinds.duplicated]
    others = sorted(set(train.captions) - kinds.duplicated)
    return duplicated + sorted(random.Random(seed).sample(others, min(count, len(others))))


def detection_figures(scores: torch.Tensor, memorized: torch.Tensor) -> dict[str, float]:
    """Wen et al.'s AUC and TPR at 1% FPR of memorized against other prompts."""
    metric = MemorizationDetection()
    metric.update(scores, memorized)
    return metric.compute()


class Auditor:
    """Runs every measure of an audit for one model and training folder, and the audit plugin
    the config or the dataset selects (`plugin`: a configured instance to use if its name is
    the one selected; otherwise the registry's default is built)."""

    def __init__(self, config: AuditConfig, plugin: AuditPlugin | None = None) -> None:
        self.config = config
        self.output = Path(config.output_dir)
        for path, flag in ((config.sscd, "--sscd"), (config.inception, "--inception")):
            if path is not None:  # before anything is sampled or written
                check_file(path, flag)
        selection = selected(config.benchmark, config.train_data_dir)
        self.plugin: AuditPlugin | None = None
        self.selected_by: str | None = None
        if selection is not None:
            name, self.selected_by = selection
            given = plugin is not None and plugin.name == name
            self.plugin = plugin if given else plugin_class(name)()
        self.model: DiffusionModel = load_model(config.model, config.device)
        self.device = self.model.device
        self.text = self.model.conditioning.text
        # why the caption-based measures do not apply (None for a text-conditional model)
        self.no_prompts: str | None = None
        if not self.text:
            self.no_prompts = (
                f"the model has conditioning {self.model.conditioning.kind}: no captions to "
                "vary or attack"
            )
            if config.attacks:
                raise ConfigError(f"attacks: {self.no_prompts}")
        if config.quality_features == "plugin" and self.plugin is None:
            raise ConfigError(
                "quality_features: 'plugin' needs an audit plugin (--benchmark NAME, or the "
                "dataset's declaration); none is selected"
            )
        self.warnings: list[str] = []
        self.attacks = {name: ATTACK_RUNNERS[name](config, self.model.image_size)
                        for name in config.attacks}  # fmt: skip
        if self.plugin is not None:
            self.plugin.setup(self)

    def per_prompt(self, num_prompts: int) -> int:
        """Generations per prompt of a set of `num_prompts` prompts behind one reported rate:
        --num_images when given, else enough for `min_generations_per_rate` over the set."""
        if self.config.num_images is not None:
            return self.config.num_images
        return generations_per_prompt(self.config.min_generations_per_rate, num_prompts)

    def generate(self, prompts: list[str], num_images: int | list[int]) -> torch.Tensor:
        c = self.config
        return generate(
            self.model,
            prompts,
            num_images,
            c.seed,
            c.scheduler,
            c.num_inference_steps,
            c.guidance_scale,
            c.batch_size,
            progress=False,
        )

    def generate_set(self, prompts: list[str]) -> tuple[list[str], torch.Tensor]:
        """The generations of one rate's prompts, and the prompt of each generation."""
        per_prompt = self.per_prompt(len(prompts))
        return [p for p in prompts for _ in range(per_prompt)], self.generate(prompts, per_prompt)

    def samples(self, prompts: list[str], kinds: Callable[[str], str]) -> Path:
        """The generations replication is measured on: each prompt kind is one rate."""
        if self.config.samples_dir is not None:
            return Path(self.config.samples_dir)
        size = Counter(kinds(p) for p in prompts)
        counts = [self.per_prompt(size[kinds(p)]) for p in prompts]
        images = self.generate(prompts, counts)
        return save_samples(images, prompts, counts, self.config.seed, self.output / "samples")

    def detection(self, prompts: list[str], kinds: Callable[[str], str]) -> dict:
        """Wen et al.'s detection of the prompts (a class model's classes) that replicate; an
        unconditional model has none, and the section says so."""
        c = self.config
        if isinstance(self.model.conditioning, Unconditional):
            reason = (
                "the model is unconditional: no prompt or class to compare with the "
                "unconditional prediction"
            )
            return {"skipped": reason, "auc": None, "auc_reason": reason}
        magnitudes = step_magnitudes(
            self.model,
            prompts,
            seeds=c.detection_seeds,
            num_inference_steps=c.num_inference_steps,
            guidance_scale=c.guidance_scale,
            sampler=c.scheduler,
            batch_size=c.batch_size,
            seed=c.seed,
        )
        scores = first_steps_score(magnitudes, c.detection_steps)
        rows = [
            {"prompt": p, "kind": kinds(p), "d": float(d)}
            for p, d in zip(prompts, scores, strict=True)
        ]
        labelled = [i for i, r in enumerate(rows) if r["kind"] in ("duplicated", "ordinary")]
        labels = torch.tensor([rows[i]["kind"] == "duplicated" for i in labelled], dtype=bool)
        last = c.seed + c.detection_seeds - 1
        result: dict = {
            "method": "Wen et al. 2024: mean ||eps(x_t, p) - eps(x_t, '')|| over sampling steps",
            "seed": c.seed,
            "seeds": c.detection_seeds,
            "starts": f"the same {c.detection_seeds} starting noises (seeds {c.seed}..{last}) for "
            "every prompt, a paired comparison; Wen et al. draw each prompt's own",
            "steps": c.detection_steps or c.num_inference_steps,
            "scores": rows,
        }
        present = {rows[i]["kind"] for i in labelled}
        missing = [kind for kind in ("duplicated", "ordinary") if kind not in present]
        if missing:
            reason = (
                f"no {' and no '.join(missing)} prompts among the {len(prompts)} detection "
                "prompts: the ROC compares duplicated against ordinary prompts"
            )
            self.warnings.append(f"detection: no AUC, {reason}")
            return result | {"auc": None, "tpr_at_1pct_fpr": None, "auc_reason": reason}
        result |= detection_figures(scores[labelled], labels)
        result["tpr_at_1pct_fpr_rule"] = (
            "Wen et al.'s: the last ROC point (scikit-learn's roc_curve) with FPR < 0.01"
        )
        # how the choice of steps matters: the same score over the first k steps
        total = magnitudes.shape[1]
        result["auc_by_first_steps"] = {
            str(k): detection_figures(first_steps_score(magnitudes[labelled], k), labels)["auc"]
            for k in sorted({1, 2, 3, 5, 10, total})
            if k <= total
        }
        return result

    def descriptor(self) -> Descriptor | None:
        """SSCD when given, else the plugin's features, else none."""
        c = self.config
        if c.sscd is not None:
            extract = ScriptedDescriptor(c.sscd, "--sscd", c.sscd_size, self.device)
            return Descriptor("sscd", extract)
        return self.plugin.descriptor() if self.plugin is not None else None

    def similarity(self, generated: torch.Tensor, train: ImageFolderDataset) -> dict | None:
        descriptor = self.descriptor()
        if descriptor is None:
            return None
        metric = FeatureSimilarity(descriptor.of(train), descriptor.centre, self.config.nn_backend)
        metric.to(self.device).update(descriptor.of(generated))
        similarity, _ = metric.compute()
        return {"descriptor": descriptor.name, **similarity_summary(similarity)}

    def inception_quality(self, generated: torch.Tensor, train: ImageFolderDataset) -> dict:
        """FID/KID with the user's Inception features, against --test_data_dir (held-out real
        images) or, without one, the training images (read a batch at a time)."""
        from memguard.metrics.quality import fid_kid

        c = self.config
        reference, source = train, "training images"
        if c.test_data_dir is not None:
            reference = ImageFolderDataset(c.test_data_dir, self.model.image_size)
            source = str(Path(c.test_data_dir).resolve())
        extractor = ScriptedDescriptor(c.inception, "--inception", c.inception_size, self.device)
        return {"feature_extractor": "inception", "reference": source,
                **fid_kid(reference, generated, extractor)}  # fmt: skip

    def quality_features(self) -> str:
        """The features of the audit's FID/KID: --quality_features, 'auto' resolved to inception
        when given, else the plugin's when one runs, else the trained extractor."""
        c = self.config
        if c.quality_features != "auto":
            return c.quality_features
        if c.inception is not None:
            return "inception"
        return "plugin" if self.plugin is not None else "trained"

    def trained_quality(self, generated: torch.Tensor, train: ImageFolderDataset) -> dict:
        """FID/KID on features trained on the training folder (`memguard.metrics.
        trained_features`), against --test_data_dir (the extractor trained on the whole training
        folder) or, without one, a seeded split of the training folder held out from the
        extractor's training (not from the diffusion model's); the extractor's held-out check
        beside them, and a warning when it fails."""
        c = self.config
        if c.test_data_dir is not None:
            indices = list(range(len(train)))
            test = ImageFolderDataset(c.test_data_dir, self.model.image_size, caption_column=None)
            heldout, source = unit_float(test.stacked()), str(Path(c.test_data_dir).resolve())
        else:
            indices, held = heldout_split(len(train), c.quality_holdout_fraction, seed=0)
            heldout = unit_float(train.stacked(held))
            source = (
                f"{len(held)} training images held out from the extractor (a seeded "
                f"{c.quality_holdout_fraction:.0%} split; the diffusion model trained on them)"
            )
        features = load_trained_features(train, indices, heldout, steps=c.quality_steps)
        self.warnings += features.warnings()
        figures = features.fid_kid(heldout, generated)
        return {"feature_extractor": "trained", "reference": source, **figures,
                "extractor": features.summary()}  # fmt: skip

    def run(self) -> dict:
        start = time.perf_counter()
        c = self.config
        self.output.mkdir(parents=True, exist_ok=True)
        captions = "text" if self.text else None  # a folder without text may have no captions
        train = ImageFolderDataset(c.train_data_dir, self.model.image_size, caption_column=captions)
        distinct = distinct_rows(ImageRows(train), c.chunk_size)
        conditioning = self.model.conditioning
        conditions = conditioning.values(train)  # captions, classes, or "" each
        kinds = PromptKinds(train, distinct[1].tolist(), conditions)
        if isinstance(conditioning, Unconditional):
            kinds = unconditional
        given: list[str] = []
        if c.prompts is not None:
            if not Path(c.prompts).is_file():
                raise FileNotFoundError(f"--prompts: no such file: {c.prompts}")
            given = [p.strip() for p in Path(c.prompts).read_text().splitlines() if p.strip()]
        if not self.text:  # the classes given (default: all), or the empty prompt
            try:
                prompts = conditioning.choose([], given)
            except ValueError as error:
                raise ConfigError(f"--prompts: {error}") from None
        elif c.prompts is not None:
            prompts = given
        else:
            prompts = default_prompts(train, kinds, c.num_ordinary_prompts, c.seed)

        samples = ImageFolderDataset(self.samples(prompts, kinds), self.model.image_size)
        generated = images01(samples)
        replication = replication_summary(
            samples, train, generated, c.replication_threshold, c.nn_backend, distinct,
            c.chunk_size, self.device, kinds, conditions,
        )  # fmt: skip
        results = {
            "memguard_version": __version__,
            "model": str(Path(c.model).resolve()),
            "model_training": {
                k: self.model.metadata.get(k) for k in ("config", "data", "defenses", "seed")
            },
            "train_data": {
                "path": str(Path(c.train_data_dir).resolve()),
                "sha256": fingerprint(train.records),
                "num_images": len(train),
            },
            "settings": to_dict(c),
            "samples_dir": str(Path(samples.root).resolve()),
            "replication": replication,
            "similarity": self.similarity(generated, train),
            "detection": self.detection(list(dict.fromkeys(prompts)), kinds),
            "conditioning": self.model.conditioning.spec(),
        }
        results["quality_features"] = self.quality_features()
        if results["quality_features"] == "inception":
            results["inception_quality"] = self.inception_quality(generated, train)
        elif results["quality_features"] == "trained":
            results["trained_quality"] = self.trained_quality(generated, train)
        if self.plugin is not None:
            results["benchmark"] = {
                "name": self.plugin.name,
                "selected_by": self.selected_by,
                **self.plugin.measure(self, train, samples, kinds),
            }
        if self.attacks:
            results["attacks"] = {
                name: attack.run(self, train, distinct[1], replication)
                for name, attack in self.attacks.items()
            }
        results["warnings"] = self.warnings
        results["seconds"] = time.perf_counter() - start
        write_json(self.output / RESULTS_FILE, results)
        render_report(results, self.output / REPORT_FILE)
        return results


def run_audit(config: AuditConfig, plugin: AuditPlugin | None = None) -> dict:
    """Run every measure and write `results.json` under `config.output_dir`; `plugin`: a
    configured audit plugin, used when the audit selects one of its name."""
    return Auditor(config, plugin).run()


def load_results(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no results file: {path}")
    return json.loads(path.read_text())
