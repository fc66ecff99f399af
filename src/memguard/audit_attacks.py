"""Attacks the audit runs on the memorized images (`memguard audit --attacks trigger`), so that
every defense is measured against them, not only the one an attack was first aimed at.

`trigger`: DoRI's embedding-trigger attack (Kowalczuk et al., "Finding Dori: Memorization in
Text-to-Image Diffusion Models Is Less Local Than Assumed", arXiv 2507.16880), run by
`memguard.attacks.trigger` with the audit's seed, device, sampler and settings. Memorization is
less local than pruning assumes: a model that no longer replicates an image from its prompt may
still replicate it from an optimized conditioning. So, beside prompt replication, the audit
reports how many memorized images are replicated under the attack.

The targets, at most `attack_max_targets` of them:

- the images in `--attack_targets` (a folder, a list file or one image, as `memguard attack
  trigger --images` reads them), the first listed, when given;
- else the benchmark plugin's planted duplicates (`AuditPlugin.planted_duplicates`), in order;
- else the training images the audit found replicated (d1/d2 < threshold), the most replicated
  first.

Training images are taken once per distinct image (exact copies merged), with their caption as
the prompt. Each target is generated once from its prompt and once from its trigger, both from
the noise of the audit's seed (a paired comparison: only the conditioning differs), and both
generations are judged by the same criterion (`memguard.attacks.targets.RecoveryJudge`): Gu et
al.'s d1/d2 < the audit's `replication_threshold` against the distinct training images (the
audit's replica_rate, copies merged; a target outside the training folder joins the
reference), and the nearest image is the target. Rates carry their 95% Wilson intervals.

Output: `results["attacks"]["trigger"]` and the folder `attacks/trigger/` beside results.json:
`targets/` (the targets at the model's resolution, an image folder that `memguard attack
trigger --images` reads), `prompt_generations/`, and what `memguard attack trigger` writes
(`triggers.safetensors`, `generations/`, `triggers.json`).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from memguard.attacks.targets import RecoveryJudge, Targets, Verdict, read_targets
from memguard.attacks.trigger import ATTACK, attack_targets, write_attack
from memguard.config import AuditConfig, ConfigError, TriggerConfig, to_dict
from memguard.data.folder import ImageFolderDataset, unit_float
from memguard.io import atomic_path
from memguard.metrics.intervals import rate_of
from memguard.sampling import save_samples, to_pil

if TYPE_CHECKING:
    from memguard.audit import Auditor

ATTACKS_DIR = "attacks"
TARGETS_DIR, PROMPT_DIR = "targets", "prompt_generations"


@dataclass(frozen=True)
class ChosenTargets:
    """The targets of an attack, and how they were chosen."""

    targets: Targets
    source: str  # where they come from, in words
    num_candidates: int  # before the cap


def training_targets(train: ImageFolderDataset, indices: list[int]) -> Targets:
    """Training images as targets: named by their path in the folder, their caption the
    prompt."""
    names = [str(train.records[i].path.relative_to(train.root)) for i in indices]
    return Targets(names, [train.captions[i] for i in indices], train.stacked(indices))


def replicated_images(
    generations: list[dict], train: ImageFolderDataset, groups: torch.Tensor
) -> list[int]:
    """One training image per distinct image that the audit's replicas (its generation rows)
    are nearest to, the most replicated first, copies' replicas counted together (ties, and
    which copy names the image: folder order)."""
    index_of: dict[str, int] = {}
    for index, record in enumerate(train.records):
        index_of.setdefault(record.path.name, index)  # the rows' `nearest_file`
    hit = [index_of[row["nearest_file"]] for row in generations if row["replica"]]
    counts = Counter(int(groups[index]) for index in hit)
    first = distinct_first(sorted(hit), groups)
    return sorted(first, key=lambda index: (-counts[int(groups[index])], index))


def distinct_first(indices: list[int], groups: torch.Tensor) -> list[int]:
    """`indices` with later exact copies of an earlier one (same `groups` entry) left out."""
    seen: set[int] = set()
    kept = []
    for index in indices:
        group = int(groups[index])
        if group not in seen:
            seen.add(group)
            kept.append(index)
    return kept


def cap(targets: Targets, count: int) -> Targets:
    """The first `count` targets."""
    return Targets(targets.names[:count], targets.prompts[:count], targets.pixels[:count])


def write_targets(targets: Targets, folder: Path) -> list[str]:
    """The targets as an image folder (PNG and metadata.jsonl: file name, caption, and the
    target's own name); their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    files, lines = [], []
    for index, (name, prompt, pixels) in enumerate(
        zip(targets.names, targets.prompts, targets.pixels, strict=True)
    ):
        file_name = f"{index:04d}.png"
        to_pil(unit_float(pixels)).save(folder / file_name)
        files.append(file_name)
        lines.append(json.dumps({"file_name": file_name, "text": prompt or "", "target": name}))
    with atomic_path(folder / "metadata.jsonl") as partial:
        partial.write_text("".join(line + "\n" for line in lines))
    return files


def _verdict(prefix: str, verdict: Verdict | None) -> dict:
    if verdict is None:
        return {f"{prefix}_replicated": None, f"{prefix}_ratio": None, f"{prefix}_distance": None}
    return {
        f"{prefix}_replicated": verdict.replicated,
        f"{prefix}_ratio": verdict.ratio,
        f"{prefix}_distance": verdict.distance,
    }


def _rate(flags: list[bool | None]) -> dict | None:
    """The rate of the true flags among those that are not None (None: no such flag)."""
    known = [flag for flag in flags if flag is not None]
    return rate_of(known) if known else None


class TriggerAudit:
    """The `trigger` attack of an audit: built with the Auditor (so that a bad
    `--attack_targets` fails before anything is sampled), run after its measures."""

    def __init__(self, config: AuditConfig, image_size: int) -> None:
        self.config = config
        self.given: Targets | None = None
        if config.attack_targets is not None:
            path = Path(config.attack_targets)
            if not path.exists():
                raise FileNotFoundError(f"--attack_targets: no such file or folder: {path}")
            self.given = read_targets(path, image_size)
            if config.trigger_init == "prompt" and None in self.given.prompts:
                unnamed = self.given.names[self.given.prompts.index(None)]
                raise ConfigError(
                    f"--attack_targets {path}: {unnamed} has no caption for --trigger_init "
                    "prompt to start from; give captions, or use --trigger_init gaussian or "
                    "unrelated"
                )

    def choose(
        self, auditor: Auditor, train: ImageFolderDataset, groups: torch.Tensor, replication: dict
    ) -> ChosenTargets:
        """The targets (see the module docstring), capped; `groups`: the distinct group of each
        training image, `replication`: the audit's replication section."""
        limit = self.config.attack_max_targets
        if self.given is not None:
            source = f"--attack_targets {self.config.attack_targets}"
            return ChosenTargets(cap(self.given, limit), source, len(self.given))
        planted = auditor.plugin.planted_duplicates(train) if auditor.plugin is not None else []
        if planted:
            source = f"the planted duplicates of the {auditor.plugin.name} benchmark"
            indices = distinct_first(planted, groups)
        else:
            source = "the training images the audit found replicated, the most replicated first"
            indices = replicated_images(replication["generations"], train, groups)
        return ChosenTargets(training_targets(train, indices[:limit]), source, len(indices))

    def trigger_config(self, output: Path, images: Path) -> TriggerConfig:
        """`memguard attack trigger`'s settings under the audit's seed, sampler and device."""
        c = self.config
        return TriggerConfig(
            model=c.model, images=str(images), output_dir=str(output),
            train_data_dir=c.train_data_dir, init=c.trigger_init, steps=c.trigger_steps,
            seed=c.seed, replication_threshold=c.replication_threshold, scheduler=c.scheduler,
            num_inference_steps=c.num_inference_steps, guidance_scale=c.guidance_scale,
            device=c.device,
        )  # fmt: skip

    def run(
        self, auditor: Auditor, train: ImageFolderDataset, groups: torch.Tensor, replication: dict
    ) -> dict:
        """Attack the chosen targets; the section `results["attacks"]["trigger"]`."""
        start = time.perf_counter()
        chosen = self.choose(auditor, train, groups, replication)
        output = (auditor.output / ATTACKS_DIR / "trigger").resolve()
        config = self.trigger_config(output, output / TARGETS_DIR)
        section: dict = {
            "attack": ATTACK,
            "dir": str(output),
            "targets_from": chosen.source,
            "num_candidates": chosen.num_candidates,
            "max_targets": self.config.attack_max_targets,
            "settings": to_dict(config),
        }
        targets = chosen.targets
        if not len(targets):
            reason = f"no targets: none among {chosen.source}"
            auditor.warnings.append(f"trigger attack: {reason}")
            rates = {"trigger_replicated": None, "prompt_replicated": None, "trigger_only": None}
            return section | rates | {"reason": reason, "targets": [], "seconds": 0.0}
        judge = RecoveryJudge(
            targets, train, self.config.replication_threshold, device=auditor.device
        )
        files = write_targets(targets, output / TARGETS_DIR)
        runs = attack_targets(auditor.model, targets, judge, config)
        attacked = write_attack(targets, runs, judge, config)

        prompted = [i for i, prompt in enumerate(targets.prompts) if prompt is not None]
        prompt_verdicts: dict[int, Verdict] = {}
        prompt_files: dict[int, str] = {}
        if prompted:
            prompts = [targets.prompts[i] for i in prompted]
            images = auditor.generate(prompts, 1)  # image 0 of each: the noise of the seed
            save_samples(images, prompts, 1, self.config.seed, output / PROMPT_DIR)
            prompt_verdicts = dict(zip(prompted, judge(images, prompted), strict=True))
            prompt_files = {i: f"{PROMPT_DIR}/{k:04d}_00.png" for k, i in enumerate(prompted)}
        rows = []
        for index, row in enumerate(attacked["targets"]):
            run = runs[index]
            rows.append(
                {
                    "target": row["name"],
                    "prompt": row["prompt"],
                    "target_in_train": row["target_in_train"],
                    "image": f"{TARGETS_DIR}/{files[index]}",
                    **_verdict("prompt", prompt_verdicts.get(index)),
                    **_verdict("trigger", run.checks[-1].verdict),
                    "prompt_generation": prompt_files.get(index),
                    "trigger_generation": row["generation"],
                    "steps_to_replicate": row["steps_to_replicate"],
                    "initial_loss": row["initial_loss"],
                    "final_loss": row["final_loss"],
                }
            )
        trigger_only = [
            row["trigger_replicated"] and not row["prompt_replicated"]
            for row in rows
            if row["prompt_replicated"] is not None
        ]
        return section | {
            "criterion": attacked["criterion"],
            "trigger_replicated": rate_of(row["trigger_replicated"] for row in rows),
            "prompt_replicated": _rate([row["prompt_replicated"] for row in rows]),
            "trigger_only": _rate(trigger_only),
            "rates": {
                "trigger_replicated": "targets whose trigger's generation replicates them",
                "prompt_replicated": "targets with a prompt whose prompt's generation "
                "replicates them (the same starting noise)",
                "trigger_only": "of the targets with a prompt, those replicated from the "
                "trigger and not from the prompt",
            },
            "targets": rows,
            "seconds": time.perf_counter() - start,
        }


ATTACK_RUNNERS = {"trigger": TriggerAudit}  # each of config.AUDIT_ATTACKS -> its runner
