"""DoRI's locality analysis: the pairwise distances and IoUs are the brute-force ones on small
hand-made inputs, identical triggers give distance 0 and IoU 1, the probe's activations and
selections are those NeMo and Wanda compute directly, and `memguard attack trigger --locality`
writes the three numbers (and refuses a single target, naming the flag)."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_model_folder
from memguard import cli
from memguard.attacks.locality import (
    LocalityProbe,
    analyse_locality,
    iou,
    mean_pairwise_distance,
    mean_pairwise_iou,
    spread,
)
from memguard.config import ConfigError
from memguard.data.folder import ImageFolderDataset
from memguard.io import load_model

PROMPTS = ["a painting called blaxthar lumrivel", "a green square on a black background",
           "a red circle in the middle"]  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return load_model(tiny_model_folder(tmp_path_factory.mktemp("tiny")), "cpu")


def test_pairwise_distance_and_iou_are_the_brute_force_ones() -> None:
    vectors = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))
    rows = vectors.flatten(1).double().numpy()
    pairs = list(itertools.combinations(range(4), 2))
    expected = sum(math.dist(rows[i], rows[j]) for i, j in pairs) / len(pairs)
    assert mean_pairwise_distance(vectors) == pytest.approx(expected, rel=1e-12)
    assert mean_pairwise_distance(vectors[[1, 1, 1]]) == 0
    with pytest.raises(ValueError):
        mean_pairwise_distance(vectors[:1])

    def selection(**layers: list[int]) -> dict[str, torch.Tensor]:
        return {name: torch.tensor(indices) for name, indices in layers.items()}

    a = selection(k=[0, 1, 2], v=[5])
    b = selection(k=[1, 2, 3])
    c = selection(v=[5, 6])
    assert iou(a, b) == 2 / 5  # {k1, k2} of {k0, k1, k2, k3, v5}
    assert iou(a, c) == 1 / 5 and iou(b, c) == 0 and iou(a, a) == 1
    assert iou(selection(k=[1]), selection(v=[1])) == 0  # the same index in another layer
    assert iou({}, selection(k=[])) is None  # two empty selections
    assert mean_pairwise_iou([a, b, c]) == pytest.approx((2 / 5 + 1 / 5 + 0) / 3)
    assert mean_pairwise_iou([a, {}, {}]) == 0  # the empty pair is left out
    assert spread([0.5, None, 1.0, 0.0]) == {"mean": 0.5, "min": 0.0, "max": 1.0, "n": 3}
    assert spread([None])["mean"] is None


def test_the_probe_measures_what_nemo_and_wanda_compute(model) -> None:
    probe = LocalityProbe(model, z_threshold=1.0, sparsity=0.05)
    assert len(probe.layers) == 8 and len(probe.values) == 4
    states = model.encoder.encode(PROMPTS)
    states = torch.cat([states, states.mean() + states.std() * torch.randn(2, *states.shape[1:])])
    measures = probe.measures(states)

    s = states.double().numpy()
    reference = probe.reference.double().numpy()
    activations = {}
    for name, layer in probe.layers.items():
        weight, bias = layer.weight.double().numpy(), layer.bias
        out = s @ weight.T + (0 if bias is None else bias.double().numpy())
        activations[name] = np.abs(out).mean(axis=1)  # (n, channels)
        pairs = list(itertools.combinations(activations[name], 2))
        expected = np.mean([np.linalg.norm(x - y) for x, y in pairs])
        assert measures.activation_distance[name] == pytest.approx(expected, rel=1e-4), name

    def nemo(row: int) -> set:
        flat = np.concatenate([activations[name][row] for name in probe.values])
        z = (flat - reference.mean(axis=0)) / reference.std(axis=0)
        bounds = np.cumsum([0] + [layer.out_features for layer in probe.values.values()])
        chosen = set()
        for i in np.nonzero(z > 1.0)[0]:
            k = int(np.searchsorted(bounds, i, side="right")) - 1
            chosen.add((list(probe.values)[k], int(i - bounds[k])))
        return chosen

    def wanda(row: int) -> set:
        chosen = set()
        for name, layer in probe.layers.items():
            scores = np.abs(layer.weight.double().numpy()) * np.linalg.norm(s[row], axis=0)
            top = np.argsort(-scores, axis=None)[: math.ceil(0.05 * scores.size)]
            chosen |= {(name, int(i)) for i in top}
        return chosen

    def brute_iou(sets: list[set]) -> float:
        values = [len(x & y) / len(x | y) for x, y in itertools.combinations(sets, 2) if x | y]
        return float(np.mean(values))

    nemo_sets, wanda_sets = [nemo(i) for i in range(5)], [wanda(i) for i in range(5)]
    assert all(nemo_sets) and len({frozenset(x) for x in nemo_sets}) > 1
    assert measures.nemo_iou == pytest.approx(brute_iou(nemo_sets))
    assert measures.wanda_iou == pytest.approx(brute_iou(wanda_sets))
    assert measures.nemo_size == np.mean([len(x) for x in nemo_sets])
    assert 0 < measures.nemo_iou < 1 and 0 < measures.wanda_iou < 1

    same = probe.measures(states[[3, 3, 3]])  # identical triggers
    assert same.embedding_distance == 0 and set(same.activation_distance.values()) == {0}
    assert same.nemo_iou == 1 and same.wanda_iou == 1


def test_analysis_sets_each_target_beside_the_prompts(model) -> None:
    names = ["one", "two", "three"]
    prompts = model.encoder.encode(PROMPTS)
    noise = torch.randn(3, 2, *prompts.shape[1:], generator=torch.Generator().manual_seed(1))
    triggers = [prompts[i] + 0.1 * (i + 1) * noise[i] for i in range(3)]  # (2, L, d) each
    triggers[2] = prompts[2].expand(2, -1, -1)  # identical triggers
    block = analyse_locality(model, names, PROMPTS, triggers, [2, 1, 0], 1.0, 0.05)

    between = mean_pairwise_distance(prompts)
    rows = block["targets"]
    for row, states in zip(rows, triggers, strict=True):
        expected = float((states[0] - states[1]).double().norm()) / between
        assert row["embedding_distance_ratio"] == pytest.approx(expected, rel=1e-6)
        per_layer = row["activation_distance_ratio_per_layer"]
        assert row["activation_distance_ratio"] == pytest.approx(np.mean(list(per_layer.values())))
    assert [r["recovered"] for r in rows] == [2, 1, 0]
    assert block["recovered"] == {"count": 3, "n": 6}
    assert rows[2]["embedding_distance_ratio"] == 0 and rows[2]["activation_distance_ratio"] == 0
    assert rows[2]["nemo_iou"] in (1, None) and rows[2]["wanda_iou"] == 1
    assert rows[0]["embedding_distance_ratio"] < rows[1]["embedding_distance_ratio"]
    assert block["reference"]["embedding_distance"] == pytest.approx(between)
    summary = block["summary"]
    assert set(summary) == {"embedding_distance_ratio", "activation_distance_ratio",
                            "nemo_iou", "wanda_iou"}  # fmt: skip
    ratios = [r["embedding_distance_ratio"] for r in rows]
    expected = {"mean": pytest.approx(np.mean(ratios)), "min": 0, "max": max(ratios), "n": 3}
    assert summary["embedding_distance_ratio"] == expected
    assert set(block["activation_distance_ratio_per_layer"]) == set(block["layers"])

    with pytest.raises(ConfigError, match="--locality: .* at least 2 targets"):
        analyse_locality(model, names[:1], PROMPTS[:1], triggers[:1], [0], 1.0, 0.05)
    with pytest.raises(ConfigError, match="--locality: .*'two'.* no caption"):
        analyse_locality(model, names[:2], [PROMPTS[0], None], triggers[:2], [0, 0], 1.0, 0.05)


def test_attack_command_with_locality_writes_the_three_numbers(
    shapes_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = tiny_model_folder(tmp_path / "model")
    train = ImageFolderDataset(shapes_dir / "train", 8)
    for i in (0, 1):
        shutil.copy(train.records[i].path, tmp_path / f"target{i}.png")
    listing = tmp_path / "targets.txt"
    listing.write_text(f"target0.png\t{train.captions[0]}\ntarget1.png\t{train.captions[1]}\n")
    output = tmp_path / "attack"
    flags = ["attack", "trigger", "--model", str(model), "--images", str(listing),
             "--output_dir", str(output), "--init", "gaussian", "--steps", "2",
             "--check_every", "2", "--num_inference_steps", "2", "--locality",
             "--locality_starts", "3", "--locality_z_threshold", "1.0"]  # fmt: skip
    cli.main(flags)
    printed = capsys.readouterr().out
    assert "locality (Kowalczuk et al., arXiv 2507.16880), 3 triggers per target (" in printed
    assert "IoU of NeMo's selections between triggers:" in printed

    results = json.loads((output / "triggers.json").read_text())
    locality = results["locality"]
    assert locality["starts"] == 3 and [r["name"] for r in locality["targets"]] == [
        "target0.png", "target1.png"]  # fmt: skip
    for key in ("embedding_distance_ratio", "activation_distance_ratio", "nemo_iou", "wanda_iou"):
        value = locality["summary"][key]
        assert value["n"] == 2 and value["min"] <= value["mean"] <= value["max"], key
    triggers = load_file(output / "locality_triggers.safetensors")
    assert sorted(triggers) == [f"target{i}.png/{k}" for i in (0, 1) for k in range(3)]
    main = load_file(output / "triggers.safetensors")
    assert torch.equal(triggers["target1.png/0"], main["target1.png"])  # start 0: the attack
    assert not torch.equal(triggers["target1.png/0"], triggers["target1.png/1"])

    listing.write_text(f"target0.png\t{train.captions[0]}\n")
    with pytest.raises(SystemExit):
        cli.main(flags)
    assert "--locality: the reference" in capsys.readouterr().err
