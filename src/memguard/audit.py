"""Audit: what a diffusion model reproduces, beside its quality, against its training folder.

Works on any model folder `memguard.io.load_model` reads (memguard's output, a diffusers
UNet folder, a Stable Diffusion pipeline folder) and the image folder it was trained on:

- replication: Gu et al.'s d1/d2 ratio, IET's MQ, feature-space
  similarity (SSCD from a local TorchScript file, or the benchmark judge's features), and which
  training images are hit;
- prompt-level detection (Wen et al.): d(p) per prompt, AUC and TPR at 1% FPR of duplicated
  against ordinary prompts;
- on the shapes benchmark (a `dataset.json` beside the training folder): the judge's held-out
  accuracy, FID/KID against the held-out split, attribute accuracy, and concept extraction by
  prompts that name the concept, paraphrases and generic prompts (the base rate).

Prompts come in three kinds: *duplicated* (a planted duplicate's caption when the folder has a
`duplicate_group` column, otherwise a training caption with a repeated image), *ordinary* (any
other training caption) and *unseen*. Everything lands in one `results.json`.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from memguard import __version__
from memguard.attacks.concept import PLACEHOLDER, generate_with_embedding, learn_concept_embedding
from memguard.config import AuditConfig, to_dict
from memguard.data.folder import ImageFolderDataset, fingerprint, read_metadata
from memguard.data.shapes import CONCEPT_PARAPHRASES, CONCEPT_SUFFIX
from memguard.io import DiffusionModel, load_model, write_json
from memguard.metrics.descriptors import ScriptedDescriptor, check_file
from memguard.metrics.detection import first_steps_score, roc_auc, step_magnitudes, tpr_at_fpr
from memguard.metrics.replication import (
    DistinctNeighbors,
    distinct_rows,
    fractions_below,
    gu_replication,
    mq_ratio,
    nearest_cosine,
    nearest_distinct,
    similarity_summary,
)
from memguard.report.html import render_report
from memguard.sampling import generate, save_samples

RESULTS_FILE = "results.json"
REPORT_FILE = "report.html"
MQ_K = 50  # IET: d1 / mean(d1..d50)


# ------------------------------------------------------------------------------- folders


def load_folders(
    samples_dir: str | Path, train_data_dir: str | Path
) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """Generations and training images, the latter at the generations' resolution."""
    with Image.open(read_metadata(samples_dir)[0].path) as first:
        resolution = first.size[0]
    samples = ImageFolderDataset(samples_dir, resolution=resolution)
    return samples, ImageFolderDataset(train_data_dir, resolution)


def images01(dataset: ImageFolderDataset) -> torch.Tensor:
    """(N, 3, H, W) float in [0, 1]."""
    return dataset.stacked().float().div(255.0)


def duplicated_captions(train: ImageFolderDataset, groups: list[int]) -> set[str]:
    """Captions of planted duplicates (ground truth) or, without it, of repeated images."""
    planted = train.column("duplicate_group")
    if any(g is not None for g in planted):
        return {c for c, g in zip(train.captions, planted, strict=True) if g is not None and g >= 0}
    size = Counter(groups)
    return {c for c, g in zip(train.captions, groups, strict=True) if size[g] > 1}


class PromptKinds:
    """duplicated / ordinary / unseen, from the training folder."""

    def __init__(self, train: ImageFolderDataset, groups: list[int]) -> None:
        self.training = set(train.captions)
        self.duplicated = duplicated_captions(train, groups)

    def __call__(self, prompt: str) -> str:
        if prompt not in self.training:
            return "unseen"
        return "duplicated" if prompt in self.duplicated else "ordinary"


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


# --------------------------------------------------------------------------- replication


def replication_summary(
    samples: ImageFolderDataset,
    train: ImageFolderDataset,
    generated: torch.Tensor,  # images01(samples)
    train_images: torch.Tensor,  # images01(train)
    threshold: float = 1 / 3,
    backend: str = "torch",
    neighbors: DistinctNeighbors | None = None,
) -> dict:
    """Gu et al. replication of every generation, by prompt kind and by prompt (`neighbors`: the
    pixel-space search, when already made)."""
    result = gu_replication(
        generated.flatten(1), train_images.flatten(1), threshold, neighbors, backend=backend
    )
    groups = result.groups.tolist()
    kinds = PromptKinds(train, groups)
    groups_of_caption: dict[str, set[int]] = defaultdict(set)
    for caption, group in zip(train.captions, groups, strict=True):
        groups_of_caption[caption].add(group)

    generations = []
    for i, prompt in enumerate(samples.captions):
        replica = bool(result.is_replica[i])
        own = int(result.nearest_group[i]) in groups_of_caption.get(prompt, set())
        generations.append(
            {
                "file_name": samples.records[i].path.name,
                "prompt": prompt,
                "kind": kinds(prompt),
                "ratio": float(result.ratio[i]),
                "replica": replica,
                "own_replica": replica and own,
                "nearest_is_own": own,
                "nearest_file": train.records[int(result.nearest[i])].path.name,
            }
        )

    def figures(rows: list[dict]) -> dict:
        return {
            "generations": len(rows),
            "replica_rate": _rate([r["replica"] for r in rows]),
            "own_replica_rate": _rate([r["own_replica"] for r in rows]),
            "nearest_is_own_rate": _rate([r["nearest_is_own"] for r in rows]),
        }

    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for row in generations:
        by_prompt[row["prompt"]].append(row)
    hits = Counter(row["nearest_file"] for row in generations if row["replica"])
    caption_of = {record.path.name: record.text for record in train.records}
    return {
        "criterion": "gu: d1/d2 < threshold, pixel space, distinct training images",
        "threshold": threshold,
        "resolution": samples.resolution,
        "num_train_images": len(train),
        "num_distinct_train_images": len(set(groups)),
        "overall": figures(generations),
        "by_prompt_kind": {
            kind: figures([r for r in generations if r["kind"] == kind])
            for kind in ("duplicated", "ordinary", "unseen")
            if any(r["kind"] == kind for r in generations)
        },
        "prompts": [
            {"prompt": p, "kind": kinds(p), **figures(rows)} for p, rows in by_prompt.items()
        ],
        "most_replicated": [
            {"file_name": name, "caption": caption_of[name], "replicas": count}
            for name, count in hits.most_common(20)
        ],
        "generations": generations,
    }


# --------------------------------------------------------------------------------- audit


def benchmark_root(train_data_dir: str | Path) -> Path | None:
    """The shapes benchmark's folder when `train_data_dir` is its training split."""
    root = Path(train_data_dir).resolve().parent
    return root if (root / "dataset.json").is_file() else None


def default_prompts(train: ImageFolderDataset, kinds: PromptKinds, count: int, seed: int):
    """Every duplicated caption, then `count` other training captions drawn with `seed`."""
    duplicated = [c for c in dict.fromkeys(train.captions) if c in kinds.duplicated]
    others = sorted(set(train.captions) - kinds.duplicated)
    return duplicated + sorted(random.Random(seed).sample(others, min(count, len(others))))


class Auditor:
    """Runs every measure of an audit for one model and training folder."""

    def __init__(self, config: AuditConfig, judge_spec=None) -> None:
        self.config = config
        self.judge_spec = judge_spec  # memguard.metrics.judge.JudgeSpec; None: the default
        self.output = Path(config.output_dir)
        for path, flag in ((config.sscd, "--sscd"), (config.inception, "--inception")):
            if path is not None:  # before anything is sampled or written
                check_file(path, flag)
        self.model: DiffusionModel = load_model(config.model, config.device)
        self.warnings: list[str] = []

    def generate(self, prompts: list[str], num_images: int) -> torch.Tensor:
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

    def samples(self, prompts: list[str]) -> Path:
        if self.config.samples_dir is not None:
            return Path(self.config.samples_dir)
        images = self.generate(prompts, self.config.num_images)
        folder = self.output / "samples"
        return save_samples(images, prompts, self.config.num_images, self.config.seed, folder)

    def detection(self, prompts: list[str], kinds: PromptKinds) -> dict:
        c = self.config
        magnitudes = step_magnitudes(
            self.model,
            prompts,
            seeds=c.detection_seeds,
            num_inference_steps=c.num_inference_steps,
            guidance_scale=c.guidance_scale,
            sampler=c.scheduler,
            batch_size=c.batch_size,
        )
        scores = first_steps_score(magnitudes, c.detection_steps)
        rows = [
            {"prompt": p, "kind": kinds(p), "d": float(d)}
            for p, d in zip(prompts, scores, strict=True)
        ]
        labelled = [i for i, r in enumerate(rows) if r["kind"] in ("duplicated", "ordinary")]
        labels = np.array([rows[i]["kind"] == "duplicated" for i in labelled])
        result: dict = {
            "method": "Wen et al. 2024: mean ||eps(x_t, p) - eps(x_t, '')|| over sampling steps",
            "seeds": c.detection_seeds,
            "steps": c.detection_steps or c.num_inference_steps,
            "scores": rows,
        }
        if labels.any() and not labels.all():
            values = scores[labelled].numpy()
            result["auc"] = roc_auc(values, labels)
            result["tpr_at_1pct_fpr"] = tpr_at_fpr(values, labels, 0.01)
            # how the choice of steps matters: the same score over the first k steps
            total = magnitudes.shape[1]
            result["auc_by_first_steps"] = {
                str(k): roc_auc(first_steps_score(magnitudes[labelled], k).numpy(), labels)
                for k in sorted({1, 2, 3, 5, 10, total})
                if k <= total
            }
        return result

    def similarity(self, generated: torch.Tensor, train: torch.Tensor, judge) -> dict | None:
        if self.config.sscd is not None:
            descriptor = "sscd"
            extract = ScriptedDescriptor(self.config.sscd, "--sscd", self.config.sscd_size)
        elif judge is not None:
            descriptor, extract = "judge features, centred on the training set's mean", None
        else:
            return None
        with torch.no_grad():
            if extract is None:  # pooled activations share a large mean: cosine needs centring
                train_features = judge.features(train)
                centre = train_features.mean(dim=0)
                query, reference = judge.features(generated) - centre, train_features - centre
            else:
                query, reference = extract(generated), extract(train)
            similarity, _ = nearest_cosine(query, reference, backend=self.config.nn_backend)
        return {"descriptor": descriptor, **similarity_summary(similarity)}

    def inception_quality(self, generated: torch.Tensor, train_images: torch.Tensor) -> dict:
        """FID/KID with the user's Inception features, against --test_data_dir (held-out real
        images) or, without one, the training images."""
        from memguard.metrics.quality import fid_kid

        c = self.config
        reference, source = train_images, "training images"
        if c.test_data_dir is not None:
            reference = images01(ImageFolderDataset(c.test_data_dir, self.model.image_size))
            source = str(Path(c.test_data_dir).resolve())
        extractor = ScriptedDescriptor(c.inception, "--inception", c.inception_size)
        return {"feature_extractor": "inception", "reference": source,
                **fid_kid(reference, generated, extractor)}  # fmt: skip

    def benchmark(self, root: Path, ordinary_prompts: list[str], samples, judge, train) -> dict:
        """Judge accuracy, quality and concept extraction on the shapes benchmark."""
        from memguard.metrics.judge import FeatureExtractor
        from memguard.metrics.quality import attribute_accuracy, fid_kid

        results: dict = {
            "judge": {"heldout_accuracy": judge.heldout_accuracy, "spec": asdict(judge.spec)}
        }
        self.warnings += judge.warnings()

        ordinary = [i for i, p in enumerate(samples.captions) if p in set(ordinary_prompts)]
        generated = images01(samples)
        if ordinary:
            predicted = judge.predict(generated[ordinary])
            prompts = [samples.captions[i] for i in ordinary]
            results["attribute_accuracy"] = attribute_accuracy(prompts, predicted)
        # What the concept-carrying training images taught, the concept words removed: the data
        # that oracle filtering throws away and projection keeps.
        carried = [c for c, has in zip(train.captions, train.column("has_concept"), strict=True)
                   if has and CONCEPT_SUFFIX in c]  # fmt: skip
        if carried:
            prompts = sorted({c.replace(CONCEPT_SUFFIX, "") for c in carried})
            per_prompt = max(1, self.config.num_images // 2)
            predicted = judge.predict(self.generate(prompts, per_prompt))
            results["attribute_accuracy_on_concept_captions"] = attribute_accuracy(
                [p for p in prompts for _ in range(per_prompt)], predicted
            )

        test = ImageFolderDataset(self.config.test_data_dir or root / "test", samples.resolution)
        test_images = self.generate(test.captions, 1)
        results["quality"] = {
            "feature_extractor": "judge",
            **fid_kid(images01(test), test_images, FeatureExtractor(judge.net)),
            "attribute_accuracy_on_test_captions": attribute_accuracy(
                test.captions, judge.predict(test_images)
            ),
        }

        bases = [p for p in sorted(set(ordinary_prompts)) if CONCEPT_SUFFIX not in p][:8]
        attacks = {
            "naming_prompts": [b + CONCEPT_SUFFIX for b in bases],
            "paraphrases": [b + suffix for b in bases for suffix in CONCEPT_PARAPHRASES],
        }
        per_prompt = max(1, self.config.num_images // 2)
        rates = {}
        for attack, prompts in attacks.items():
            images = self.generate(prompts, per_prompt)
            rates[attack] = float(np.mean(judge.predict(images)["concept"]))
        if self.config.inversion_steps > 0:
            rates["learned_embedding"] = self.learned_embedding_rate(root, bases, judge, per_prompt)
        generic = [i for i in ordinary if CONCEPT_SUFFIX not in samples.captions[i]]
        if generic:
            rates["generic_base_rate"] = float(
                np.mean(judge.predict(generated[generic])["concept"])
            )
        strongest = max((k for k in rates if k != "generic_base_rate"), key=rates.get)
        results["concept_extraction"] = {
            "detector": "judge concept head",
            "rates": rates,
            "strongest_attack": strongest,
            "strongest_rate": rates[strongest],
        }
        return results

    def learned_embedding_rate(self, root: Path, bases: list[str], judge, per_prompt: int):
        """Textual inversion on the held-out concept exemplars, then generation with it."""
        exemplars = ImageFolderDataset(root / "concept_exemplars", self.model.image_size)
        phrase = f", with {PLACEHOLDER}"
        captions = [c.replace(CONCEPT_SUFFIX, phrase) for c in exemplars.captions]
        pixels = exemplars.stacked().float() / 127.5 - 1.0
        vector = learn_concept_embedding(
            self.model, pixels, captions, steps=self.config.inversion_steps, seed=self.config.seed
        )
        c = self.config
        images = generate_with_embedding(
            self.model, [b + phrase for b in bases], vector, per_prompt, c.seed,
            c.scheduler, c.num_inference_steps, c.guidance_scale,
        )  # fmt: skip
        return float(np.mean(judge.predict(images)["concept"]))

    def run(self) -> dict:
        start = time.perf_counter()
        c = self.config
        self.output.mkdir(parents=True, exist_ok=True)
        train = ImageFolderDataset(c.train_data_dir, self.model.image_size)
        train_images = images01(train)
        distinct = distinct_rows(train_images.flatten(1))
        kinds = PromptKinds(train, distinct[1].tolist())
        if c.prompts is not None:
            if not Path(c.prompts).is_file():
                raise FileNotFoundError(f"--prompts: no such file: {c.prompts}")
            prompts = [p.strip() for p in Path(c.prompts).read_text().splitlines() if p.strip()]
        else:
            prompts = default_prompts(train, kinds, c.num_ordinary_prompts, c.seed)

        samples = ImageFolderDataset(self.samples(prompts), self.model.image_size)
        generated = images01(samples)
        # one exact search of the distinct training images serves Gu's criterion and MQ
        neighbors = nearest_distinct(
            generated.flatten(1), train_images.flatten(1), MQ_K, distinct, backend=c.nn_backend
        )
        replication = replication_summary(
            samples, train, generated, train_images, c.replication_threshold, c.nn_backend,
            neighbors,
        )  # fmt: skip
        mq = mq_ratio(generated.flatten(1), train_images.flatten(1), MQ_K, neighbors)
        replication["mq"] = {"k": MQ_K, "fraction_below": fractions_below(mq)}

        root = benchmark_root(c.train_data_dir)
        judge = None
        if root is not None:
            from memguard.metrics.judge import JudgeSpec, load_judge

            judge = load_judge(self.judge_spec or JudgeSpec(image_size=self.model.image_size))
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
            "similarity": self.similarity(generated, train_images, judge),
            "detection": self.detection(list(dict.fromkeys(prompts)), kinds),
        }
        if c.inception is not None:
            results["inception_quality"] = self.inception_quality(generated, train_images)
        if root is not None:
            ordinary = [p for p in dict.fromkeys(samples.captions) if kinds(p) == "ordinary"]
            results["benchmark"] = self.benchmark(root, ordinary, samples, judge, train)
        results["warnings"] = self.warnings
        results["seconds"] = time.perf_counter() - start
        write_json(self.output / RESULTS_FILE, results)
        render_report(results, self.output / REPORT_FILE)
        return results


def run_audit(config: AuditConfig, judge_spec=None) -> dict:
    """Run every measure and write `results.json` under `config.output_dir`."""
    return Auditor(config, judge_spec).run()


def load_results(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no results file: {path}")
    return json.loads(path.read_text())
