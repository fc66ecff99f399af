"""How local memorization is, measured on embedding triggers: the locality analysis of Kowalczuk
et al., "Finding Dori: Memorization in Text-to-Image Diffusion Models Is Less Local Than
Assumed" (arXiv 2507.16880). The paper finds that triggers of one memorized image found from
different random starts lie as far apart in the conditioning space as the states of different
prompts, drive different neurons, and lead NeMo and Wanda to select sets that overlap little
(IoU below 0.6): memorization is not held by a few weights that pruning could remove.

`memguard attack trigger --locality` finds K triggers per target (`memguard.attacks.trigger`;
start k is the attack from a Gaussian start with seed + k x N, N targets) and sets three
numbers beside the same measures taken between the targets' original prompts (their text
states: the reference, one per run):

1. embedding distance ratio: the mean pairwise L2 distance between the image's K triggers,
   each flattened (L x d), over the mean pairwise L2 distance between the prompts' states;
2. activation distance ratio: for each cross-attention layer that reads the conditioning
   (`attn2.to_k`, `attn2.to_v`), the activation of its output channels as NeMo takes it (the
   mean absolute output over the token positions, `memguard.mitigations.nemo`), the mean
   pairwise L2 distance between the triggers' activations over that between the prompts';
   per layer, and as one number their mean over the layers;
3. selection IoU: NeMo's candidates (the value neurons, `attn2.to_v`, whose z-score against
   ordinary prompts exceeds a threshold: NeMo's initial selection, without its deactivation
   search, which needs a replication check per trigger) and Wanda's selection (the top
   fraction of each layer's weights by |W| x ||X||, X the conditioning) computed from each
   trigger; the mean IoU over the pairs of triggers, beside the mean IoU over the pairs of
   prompts. A selection is a set of (layer, index) pairs; two empty selections have no IoU
   (None, left out of the means), and the selections' mean sizes are reported with it.

Identical triggers give distance 0 and IoU 1. Each number's spread over the targets (mean,
min, max) goes in triggers.json under `locality` and in the printed summary, with how many of
the triggers recover their target (the measures take every trigger, recovering or not: the
paper's claim is about triggers that do, so read the numbers beside that count).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from itertools import combinations

import torch

from memguard.config import ConfigError
from memguard.io import DiffusionModel
from memguard.mitigations.layers import TEXT_FED, Selection, select_linear
from memguard.mitigations.nemo import (
    REFERENCE_PROMPTS,
    candidate_neurons,
    neuron_activations,
    neurons,
)
from memguard.mitigations.wanda import input_norms, wanda_selection

PAPER = "Kowalczuk et al., arXiv 2507.16880"
PAPER_IOU_BOUND = 0.6  # the paper's selections between triggers of one image overlap less
VALUE_LAYERS = "attn2.to_v"


def mean_pairwise_distance(vectors: torch.Tensor) -> float:
    """The mean L2 distance over the unordered pairs of rows of `vectors` (n, ...), each row
    flattened, in float64; n >= 2."""
    if len(vectors) < 2:
        raise ValueError(f"a pairwise distance needs at least 2 rows, not {len(vectors)}")
    return float(torch.pdist(vectors.flatten(1).double()).mean())


def iou(first: Selection, second: Selection) -> float | None:
    """The intersection over the union of two selections as sets of (layer, index) pairs;
    None when both are empty."""
    a = {(name, int(i)) for name, indices in first.items() for i in indices}
    b = {(name, int(i)) for name, indices in second.items() for i in indices}
    return len(a & b) / len(a | b) if a | b else None


def mean_pairwise_iou(selections: list[Selection]) -> float | None:
    """The mean `iou` over the unordered pairs of `selections` (None pairs left out); None when
    no pair has one."""
    values = [v for a, b in combinations(selections, 2) if (v := iou(a, b)) is not None]
    return statistics.fmean(values) if values else None


def ratio(within: float, between: float) -> float | None:
    """within / between; None when the reference is 0 (identical prompts)."""
    return within / between if between > 0 else None


def spread(values: Iterable[float | None]) -> dict:
    """Mean, min and max of the values that are not None, and how many there are."""
    defined = [v for v in values if v is not None]
    if not defined:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(defined), "min": min(defined), "max": max(defined),
            "n": len(defined)}  # fmt: skip


def size(selection: Selection) -> int:
    return sum(len(indices) for indices in selection.values())


@dataclass(frozen=True)
class Measures:
    """The locality measures over a set of conditionings (an image's triggers, or the
    prompts' states): mean pairwise distances and IoUs, and the selections' mean sizes."""

    embedding_distance: float
    activation_distance: dict[str, float]  # per text-fed layer
    nemo_iou: float | None
    wanda_iou: float | None
    nemo_size: float
    wanda_size: float


class LocalityProbe:
    """The layers, NeMo's reference activations and the selection settings the measures use,
    for one model."""

    def __init__(self, model: DiffusionModel, z_threshold: float, sparsity: float) -> None:
        self.model, self.z_threshold, self.sparsity = model, z_threshold, sparsity
        self.layers = select_linear(model.unet, TEXT_FED)
        self.values = {n: layer for n, layer in self.layers.items() if n.endswith(VALUE_LAYERS)}
        if not self.values:
            raise ConfigError(f"--locality: the UNet has no {VALUE_LAYERS} layer for NeMo")
        references = model.encoder.encode(list(REFERENCE_PROMPTS))
        self.reference = neuron_activations(self.values, references)

    def nemo(self, states: torch.Tensor) -> Selection:
        """NeMo's candidates (its initial selection) under the conditioning `states` (L, d)."""
        flat = candidate_neurons(self.values, states, self.reference, self.z_threshold)
        return neurons(self.values, flat)

    def wanda(self, states: torch.Tensor) -> Selection:
        """Wanda's selection under the conditioning `states` (L, d)."""
        norms = input_norms(self.model, self.layers, states)  # text-fed layers: no generation
        return wanda_selection(self.layers, norms, self.sparsity)

    def measures(self, states: torch.Tensor) -> Measures:
        """The measures over the conditionings `states` (n, L, d), n >= 2."""
        states = states.to(self.model.device)
        activation = {
            name: mean_pairwise_distance(neuron_activations({name: layer}, states))
            for name, layer in self.layers.items()
        }
        nemo = [self.nemo(s) for s in states]
        wanda = [self.wanda(s) for s in states]
        return Measures(
            embedding_distance=mean_pairwise_distance(states),
            activation_distance=activation,
            nemo_iou=mean_pairwise_iou(nemo),
            wanda_iou=mean_pairwise_iou(wanda),
            nemo_size=statistics.fmean(size(s) for s in nemo),
            wanda_size=statistics.fmean(size(s) for s in wanda),
        )


def require_prompts(names: list[str], prompts: list[str | None]) -> list[str]:
    """The targets' prompts, the reference's conditionings; an error naming --locality when
    there are fewer than 2 targets or one has no caption."""
    if len(prompts) < 2:
        raise ConfigError(
            "--locality: the reference (the distances between different memorized prompts) "
            f"needs at least 2 targets; --images gives {len(prompts)}"
        )
    missing = [name for name, prompt in zip(names, prompts, strict=True) if prompt is None]
    if missing:
        raise ConfigError(
            f"--locality: the reference is the targets' prompts, and {missing} have no caption; "
            "give the images as a folder with captions or a list with a caption on every line"
        )
    return [prompt for prompt in prompts if prompt is not None]


def _target_row(name: str, measures: Measures, reference: Measures, recovered: int) -> dict:
    per_layer = {
        layer: ratio(distance, reference.activation_distance[layer])
        for layer, distance in measures.activation_distance.items()
    }
    return {
        "name": name,
        "recovered": recovered,
        "embedding_distance_ratio": ratio(
            measures.embedding_distance, reference.embedding_distance
        ),
        "activation_distance_ratio": spread(per_layer.values())["mean"],
        "activation_distance_ratio_per_layer": per_layer,
        **asdict(measures),
    }


SUMMARY = ("embedding_distance_ratio", "activation_distance_ratio", "nemo_iou", "wanda_iou")


def analyse_locality(
    model: DiffusionModel,
    names: list[str],
    prompts: list[str | None],
    triggers: list[torch.Tensor],
    recovered: list[int],
    z_threshold: float,
    sparsity: float,
) -> dict:
    """The `locality` block of triggers.json (see the module docstring): `triggers[i]`
    (K, L, d) are target i's triggers from K starts, `recovered[i]` how many of them recover
    it."""
    reference_prompts = require_prompts(names, prompts)
    probe = LocalityProbe(model, z_threshold, sparsity)
    reference = probe.measures(model.encoder.encode(reference_prompts))
    rows = [
        _target_row(name, probe.measures(states), reference, count)
        for name, states, count in zip(names, triggers, recovered, strict=True)
    ]
    summary = {key: spread(row[key] for row in rows) for key in SUMMARY}
    below = {
        key: None if summary[key]["mean"] is None else summary[key]["mean"] < PAPER_IOU_BOUND
        for key in ("nemo_iou", "wanda_iou")
    }
    return {
        "paper": PAPER,
        "starts": len(triggers[0]),
        "start": "gaussian; start k of target i: the attack with seed + k x N + i",
        "distance": "L2; embeddings flattened (L x d), activations per layer (mean |output| "
        "over tokens per channel); ratios: within a target's triggers / between the prompts",
        "layers": list(probe.layers),
        "nemo_layers": list(probe.values),
        "z_threshold": z_threshold,
        "sparsity": sparsity,
        "recovered": {"count": sum(recovered), "n": len(triggers) * len(triggers[0])},
        "summary": summary,
        "activation_distance_ratio_per_layer": {
            layer: spread(row["activation_distance_ratio_per_layer"][layer] for row in rows)
            for layer in probe.layers
        },
        "iou_below_paper_bound": {"bound": PAPER_IOU_BOUND, **below},
        "reference": asdict(reference),
        "targets": rows,
    }


def summary_lines(locality: dict) -> list[str]:
    """The printed summary of a `locality` block: the three numbers' spreads over targets."""

    def text(value: dict) -> str:
        if value["mean"] is None:
            return "undefined (no selection)"
        return f"{value['mean']:.3f} (min {value['min']:.3f}, max {value['max']:.3f})"

    summary, reference = locality["summary"], locality["reference"]
    iou_nemo, iou_wanda = reference["nemo_iou"], reference["wanda_iou"]
    recovered = locality["recovered"]
    return [
        f"locality ({locality['paper']}), {locality['starts']} triggers per target "
        f"({recovered['count']} of {recovered['n']} recover their target), spread over "
        f"{len(locality['targets'])} targets:",
        f"  embedding distance between triggers / between prompts: "
        f"{text(summary['embedding_distance_ratio'])}",
        f"  activation distance between triggers / between prompts (mean over "
        f"{len(locality['layers'])} layers): {text(summary['activation_distance_ratio'])}",
        f"  IoU of NeMo's selections between triggers: {text(summary['nemo_iou'])}; "
        f"between prompts: {'undefined' if iou_nemo is None else f'{iou_nemo:.3f}'}",
        f"  IoU of Wanda's selections between triggers: {text(summary['wanda_iou'])}; "
        f"between prompts: {'undefined' if iou_wanda is None else f'{iou_wanda:.3f}'}",
        f"  the paper: triggers as far apart as different prompts, IoU < {PAPER_IOU_BOUND}",
    ]
