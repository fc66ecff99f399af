"""The shapes benchmark as an audit plugin (`--benchmark shapes`, or declared by the dataset.json
that `memguard data shapes` writes): what the benchmark's ground truth lets the audit score.

- the judge (`memguard.metrics.judge`): its held-out accuracy, with a warning below 95%; its
  features for feature similarity (Somepalli et al. 2023) when no SSCD file is given, centred
  on the training set's mean;
- quality beside memorization: FID/KID (Heusel et al. 2017; Binkowski et al. 2018) on the
  judge's features against the held-out split, and attribute accuracy of generations (for a
  model without text, FID/KID of the audit's generations, and no prompt-based measure);
- concept extraction: how often the judge's concept detector fires on generations from prompts
  that name the concept, paraphrase it, or carry a learned embedding of it (textual inversion,
  Gal et al. 2023, on the held-out concept exemplars), and from the generic prompts they extend
  (the base rate): the attacks on concept-level selective learning (Kothandaraman & Pytlarz,
  arXiv 2512.11194);
- the planted duplicates, one copy each: the targets of the audit's attacks on memorized images
  (`memguard audit --attacks trigger`, `memguard.audit_attacks`).

The benchmark's layout is that of `memguard data shapes`: the training folder's parent holds
`test/` and `concept_exemplars/` beside it, and its dataset.json names the concept's kind
(`memguard.data.shapes.KINDS`: the fixed or moving acme logo, or acme hatching), which sets the
judge's concept head and the words that name and paraphrase the concept.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from memguard.attacks.concept import PLACEHOLDER, generate_with_embedding, learn_concept_embedding
from memguard.audit_plugins import AuditPlugin
from memguard.config import ConfigError
from memguard.data.folder import ImageFolderDataset, unit_float
from memguard.data.shapes import KINDS, ConceptKind, dataset_concept_kind
from memguard.metrics.intervals import rate_of
from memguard.metrics.judge import FeatureExtractor, Judge, JudgeSpec, load_judge
from memguard.metrics.quality import attribute_accuracy, fid_kid
from memguard.metrics.similarity import Descriptor
from memguard.report.summary import Row, rate_row

if TYPE_CHECKING:
    from memguard.audit import Auditor, PromptKinds

TEST, EXEMPLARS = "test", "concept_exemplars"


class ShapesBenchmark(AuditPlugin):
    """The shapes benchmark's measures; `judge_spec`: the judge to use (default: the audit's
    judge at the model's image size, for the data's concept kind; a spec for another kind is
    an error)."""

    name = "shapes"

    def __init__(self, judge_spec: JudgeSpec | None = None) -> None:
        self.judge_spec = judge_spec
        self.judge: Judge | None = None
        self.root = Path()
        self.concept: ConceptKind = KINDS["fixed"]

    def setup(self, auditor: Auditor) -> None:
        c = auditor.config
        self.root = Path(c.train_data_dir).resolve().parent
        needed = ([] if c.test_data_dir else [TEST]) + ([EXEMPLARS] if c.inversion_steps else [])
        for split in needed:
            if not (self.root / split).is_dir():
                raise FileNotFoundError(
                    f"--benchmark shapes: no {split}/ beside the training folder in {self.root} "
                    "(the layout `memguard data shapes` writes)"
                )
        self.concept = dataset_concept_kind(self.root)
        spec = self.judge_spec or JudgeSpec(
            image_size=auditor.model.image_size, concept_kind=self.concept.name
        )
        if spec.concept_kind != self.concept.name:
            raise ConfigError(
                f"judge concept_kind: {spec.concept_kind!r}, but the data in {self.root} has "
                f"concept_kind {self.concept.name!r} (its dataset.json); the judge must detect "
                "the data's concept"
            )
        self.judge = load_judge(spec)
        auditor.warnings += self.judge.warnings()

    def descriptor(self) -> Descriptor:
        return Descriptor(
            "judge features, centred on the training set's mean", self.judge.features, centre=True
        )

    def planted_duplicates(self, train: ImageFolderDataset) -> list[int]:
        """The first copy of each planted duplicate (metadata `duplicate_group` >= 0), by
        group."""
        first: dict[int, int] = {}
        for index, group in enumerate(train.column("duplicate_group")):
            if group is not None and group >= 0:
                first.setdefault(group, index)
        return [first[group] for group in sorted(first)]

    def measure(
        self,
        auditor: Auditor,
        train: ImageFolderDataset,
        samples: ImageFolderDataset,
        kinds: PromptKinds,
    ) -> dict:
        """Judge accuracy, quality and concept extraction."""
        judge = self.judge
        suffix = self.concept.suffix
        results: dict = {
            "concept_kind": self.concept.name,
            "judge": {"heldout_accuracy": judge.heldout_accuracy, "spec": asdict(judge.spec)},
        }
        test = ImageFolderDataset(auditor.config.test_data_dir or self.root / TEST,
                                  samples.resolution,
                                  caption_column="text" if auditor.text else None)  # fmt: skip
        if auditor.no_prompts is not None:  # class-conditional or unconditional
            generated = unit_float(samples.stacked())
            reason = auditor.no_prompts
            return results | {
                "quality": {"feature_extractor": "judge", "generations": len(samples),
                            **fid_kid(test, generated, FeatureExtractor(judge.net))},
                "skipped": {"attribute_accuracy": reason, "concept_extraction": reason},
            }  # fmt: skip
        ordinary_prompts = [p for p in dict.fromkeys(samples.captions) if kinds(p) == "ordinary"]
        ordinary = [i for i, p in enumerate(samples.captions) if kinds(p) == "ordinary"]
        if ordinary:
            predicted = judge.predict(unit_float(samples.stacked(ordinary)))
            prompts = [samples.captions[i] for i in ordinary]
            results["attribute_accuracy"] = attribute_accuracy(prompts, predicted)
        # What the concept-carrying training images taught, the concept words removed: the data
        # that oracle filtering throws away and projection keeps.
        carried = [c for c, has in zip(train.captions, train.column("has_concept"), strict=True)
                   if has and suffix in c]  # fmt: skip
        if carried:
            bare = sorted({c.replace(suffix, "") for c in carried})
            prompts, images = auditor.generate_set(bare)
            results["attribute_accuracy_on_concept_captions"] = attribute_accuracy(
                prompts, judge.predict(images)
            )

        test_images = auditor.generate(test.captions, 1)
        results["quality"] = {
            "feature_extractor": "judge",
            **fid_kid(test, test_images, FeatureExtractor(judge.net)),
            "attribute_accuracy_on_test_captions": attribute_accuracy(
                test.captions, judge.predict(test_images)
            ),
        }
        bases = [p for p in sorted(set(ordinary_prompts)) if suffix not in p][:8]
        if bases:
            results["concept_extraction"] = self.concept_extraction(auditor, bases)
        return results

    def concept_extraction(self, auditor: Auditor, bases: list[str]) -> dict:
        """How often the judge finds the concept in generations from prompts that name it,
        paraphrase it, or carry a learned embedding of it, all built on the generic `bases`,
        and from the bases alone (the base rate)."""
        concept = self.concept
        attacks = {
            "naming_prompts": [b + concept.suffix for b in bases],
            "paraphrases": [b + ending for b in bases for ending in concept.paraphrases],
        }
        rates = {attack: self.concept_rate(auditor, prompts) for attack, prompts in attacks.items()}
        if auditor.config.inversion_steps > 0:
            rates["learned_embedding"] = self.learned_embedding_rate(auditor, bases)
        rates["generic_base_rate"] = self.concept_rate(auditor, bases)
        strongest = max(
            (k for k in rates if k != "generic_base_rate"), key=lambda k: rates[k]["rate"]
        )
        return {
            "detector": "judge concept head",
            "rates": rates,
            "strongest_attack": strongest,
            "strongest_rate": rates[strongest],
        }

    def concept_rate(self, auditor: Auditor, prompts: list[str]) -> dict:
        """How often the judge finds the concept in generations from `prompts`."""
        _, images = auditor.generate_set(prompts)
        return rate_of(self.judge.predict(images)["concept"])

    def learned_embedding_rate(self, auditor: Auditor, bases: list[str]) -> dict:
        """Textual inversion on the held-out concept exemplars, then generation with it."""
        c, model = auditor.config, auditor.model
        exemplars = ImageFolderDataset(self.root / EXEMPLARS, model.image_size)
        phrase = self.concept.template.format(PLACEHOLDER)
        captions = [caption.replace(self.concept.suffix, phrase) for caption in exemplars.captions]
        pixels = exemplars.stacked().float() / 127.5 - 1.0
        vector = learn_concept_embedding(
            model, pixels, captions, steps=c.inversion_steps, seed=c.seed
        )
        images = generate_with_embedding(
            model, [b + phrase for b in bases], vector, auditor.per_prompt(len(bases)), c.seed,
            c.scheduler, c.num_inference_steps, c.guidance_scale,
        )  # fmt: skip
        return rate_of(self.judge.predict(images)["concept"])

    @staticmethod
    def summary_rows(section: dict) -> list[Row]:
        accuracy = ", ".join(
            f"{head} {value:.1%}" for head, value in section["judge"]["heldout_accuracy"].items()
        )
        quality = section["quality"]
        rows: list[Row] = [
            ("judge held-out accuracy", accuracy, None),
            ("FID (judge features)", f"{quality['fid']:.3f}", None),
            ("KID (judge features)", f"{quality['kid_mean']:.4f}", None),
        ]
        for key, measure in (
            ("attribute_accuracy", "attribute accuracy, ordinary prompts"),
            ("attribute_accuracy_on_concept_captions", "attribute accuracy, concept images' "
             "captions"),
        ):  # fmt: skip
            rows.append(rate_row(measure, section.get(key, {}).get("all")))
        rates = section.get("concept_extraction", {}).get("rates", {})
        rows += [
            rate_row(f"concept extraction, {attack.replace('_', ' ')}", rate)
            for attack, rate in rates.items()
        ]
        return rows
