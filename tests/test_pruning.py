"""Pruning mitigations: NeMo's outliers are numpy's z-scores of the same activations, its search
deactivates growing groups and puts the weights back, Wanda's selection is the direct top
fraction of |W| x ||X||, and `memguard mitigate` writes zeros that plain diffusers loads, exactly
where pruning.json says and nowhere else."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from helpers import tiny_model_folder
from memguard import cli
from memguard.config import MitigateConfig
from memguard.io import load_model
from memguard.mitigations import pruning
from memguard.mitigations.layers import as_lists, select_linear
from memguard.mitigations.nemo import (
    REFERENCE_PROMPTS,
    group_sizes,
    neuron_activations,
    outlier_neurons,
)
from memguard.mitigations.pruning import nemo_prompt, neurons, wanda

PROMPT = "a painting called blaxthar lumrivel"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def values(tiny: Path):
    """The tiny model, its value layers and their activations on the reference prompts."""
    model = load_model(tiny, "cpu")
    layers = select_linear(model.unet, ["attn2.to_v"])
    reference = neuron_activations(layers, model.encoder.encode(list(REFERENCE_PROMPTS)))
    return model, layers, reference


def test_nemo_outliers_are_numpy_z_scores(values) -> None:
    model, layers, reference = values
    assert reference.shape == (len(REFERENCE_PROMPTS), sum(v.out_features for v in layers.values()))
    states = model.encoder.encode([PROMPT])
    activation = neuron_activations(layers, states)[0]
    first = next(iter(layers.values())).weight.double().numpy()
    direct = np.abs(states[0].double().numpy() @ first.T).mean(axis=0)
    np.testing.assert_allclose(activation[: len(direct)].numpy(), direct, rtol=1e-5)

    order, z = outlier_neurons(activation, reference, 2.0)
    a, r = activation.double().numpy(), reference.double().numpy()
    expected_z = (a - r.mean(axis=0)) / r.std(axis=0)
    expected = [int(i) for i in np.argsort(-expected_z, kind="stable") if expected_z[i] > 2.0]
    assert order.tolist() == expected and expected
    np.testing.assert_allclose(z.numpy(), expected_z[expected], rtol=1e-9)


def test_nemo_deactivates_growing_groups_until_the_prompt_stops_replicating(values) -> None:
    assert (group_sizes(0), group_sizes(4), group_sizes(5)) == ([0], [0, 1, 2, 4], [0, 1, 2, 4, 5])
    model, layers, reference = values
    activation = neuron_activations(layers, model.encoder.encode([PROMPT]))[0]
    order, _ = outlier_neurons(activation, reference, 0.5)
    assert len(order) > 4
    ((name, (channel,)),) = as_lists(neurons(layers, order[2:3])).items()
    before = {key: value.clone() for key, value in model.unet.state_dict().items()}
    zero_rows = []

    def replicates(prompt: str) -> bool:  # while the third candidate is active
        rows = [(layer.weight.abs().sum(dim=1) == 0).sum() for layer in layers.values()]
        zero_rows.append(int(sum(rows)))
        return bool(model.unet.get_submodule(name).weight[channel].any())

    selection, figures = nemo_prompt(model, layers, PROMPT, reference, 0.5, replicates)
    assert zero_rows == [0, 1, 2, 4]
    assert figures == {"num_candidates": len(order), "replicated_before": True,
                       "mitigated": True, "neurons_needed": 4}  # fmt: skip
    assert as_lists(selection) == as_lists(neurons(layers, order[:4]))
    for key, value in model.unet.state_dict().items():
        assert torch.equal(value, before[key]), key  # put back after every check

    selection, figures = nemo_prompt(model, layers, PROMPT, reference, 0.5, lambda p: True)
    assert not figures["mitigated"] and figures["neurons_needed"] is None
    assert sum(len(i) for i in selection.values()) == len(order)  # then every candidate goes


def test_wanda_prunes_the_top_fraction_of_weight_times_input_norm(tiny: Path, values) -> None:
    model = values[0]
    layers = select_linear(model.unet, ["attn2.to_[kv]"])
    assert len(layers) == 8
    config = MitigateConfig(model=str(tiny), prompts="-", method="wanda", sparsity=0.05)
    ((selection, _),) = wanda(model, layers, [PROMPT], config)
    states = model.encoder.encode([PROMPT])[0].double().numpy()
    for name, layer in layers.items():
        scores = np.abs(layer.weight.double().numpy()) * np.linalg.norm(states, axis=0)[None]
        count = math.ceil(0.05 * scores.size)
        expected = np.sort(np.argsort(-scores, axis=None)[:count])
        assert selection[name].tolist() == expected.tolist(), name


def unet_weights(folder: Path, **kwargs) -> dict[str, torch.Tensor]:
    return UNet2DConditionModel.from_pretrained(folder, **kwargs).state_dict()


def assert_zeroed_exactly(before: dict, after: dict, record: dict) -> None:
    """The recorded units are zero after (and were not before); every other value is equal."""
    assert record["num_pruned"] > 0 and set(before) == set(after)
    for layer, indices in record["pruned"].items():
        key = f"{layer}.weight"
        mask = torch.zeros_like(before[key], dtype=torch.bool)
        if record["unit"] == "neuron":
            mask[indices] = True
        else:
            mask.view(-1)[indices] = True
        assert (after[key][mask] == 0).all() and (before[key][mask] != 0).all(), key
        assert torch.equal(after[key][~mask], before[key][~mask]), key
    pruned = {f"{layer}.weight" for layer in record["pruned"]}
    for key in set(before) - pruned:
        assert torch.equal(before[key], after[key]), key


def mitigate(model: Path, output: Path, prompts: Path, *flags: str) -> dict:
    cli.main(
        ["mitigate", "--model", str(model), "--prompts", str(prompts), "--output_dir",
         str(output), "--num_images", "1", "--num_inference_steps", "2", *flags]
    )  # fmt: skip
    return json.loads((output / "pruning.json").read_text())


def test_wanda_writes_zeros_that_diffusers_loads(tiny: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\na green square on a black background\n")
    output = tmp_path / "pruned"
    flags = ["--method", "wanda", "--layers", "attn2.to_v", "--layers", "ff.net.2"]
    record = mitigate(tiny, output, prompts, *flags)
    assert record["unit"] == "weight" and len(record["prompts"]) == 2
    assert {layer.rsplit(".", 2)[-2] for layer in record["pruned"]} == {"attn2", "net"}
    per_prompt = [set(p["pruned"][layer]) for p in record["prompts"] for layer in p["pruned"]]
    union = sum(len(indices) for indices in record["pruned"].values())
    assert max(len(s) for s in per_prompt) < union <= sum(len(s) for s in per_prompt)
    assert_zeroed_exactly(unet_weights(tiny), unet_weights(output), record)
    assert json.loads((output / "memguard.json").read_text())["mitigation"]["method"] == "wanda"


def test_nemo_writes_zeroed_neurons(
    tiny: Path, shapes_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def three_neurons_stop_it(model, train, config):  # the generations, replaced
        def replicates(prompt: str) -> bool:
            layers = select_linear(model.unet, config.layers).values()
            return sum(int((v.weight.abs().sum(dim=1) == 0).sum()) for v in layers) < 3

        return replicates

    monkeypatch.setattr(pruning, "replication_check", three_neurons_stop_it)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n")
    output = tmp_path / "pruned"
    record = mitigate(tiny, output, prompts, "--method", "nemo", "--z_threshold", "0.5",
                      "--train_data_dir", str(shapes_dir / "train"))  # fmt: skip
    (prompt,) = record["prompts"]
    assert prompt["neurons_needed"] == 4 and prompt["num_pruned"] == record["num_pruned"] == 4
    assert record["unit"] == "neuron"
    assert_zeroed_exactly(unet_weights(tiny), unet_weights(output), record)


def test_a_pruned_pipeline_loads_in_diffusers(pipeline_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    output = tmp_path / "pruned"
    record = mitigate(pipeline_dir, output, prompts, "--method", "wanda")
    after = StableDiffusionPipeline.from_pretrained(output).unet.state_dict()
    assert_zeroed_exactly(unet_weights(pipeline_dir, subfolder="unet"), after, record)
