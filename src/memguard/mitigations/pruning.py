"""Pruning mitigations on a saved model (`memguard mitigate`): NeMo (Hintersdorf et al., "Finding
NeMo: Localizing Neurons Responsible for Memorization in Diffusion Models", NeurIPS 2024;
`nemo.py`) and Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language
Models", ICLR 2024, as Chavhan et al. 2024 apply it to memorization; `wanda.py`).

For each memorized prompt (a file, one a line) the method chooses what to prune in the chosen
linear layers, on the unpruned model: NeMo whole value neurons, deactivated until the prompt's
generations stop replicating (Gu et al.'s criterion against the training folder), Wanda the top
fraction of each layer's weights by |W| x ||X|| on the prompt. The union over the prompts is then
zeroed in the weights themselves (not masked by a hook) and written with
`memguard.io.save_model`: a UNet folder, or a pipeline folder whose other parts are linked from
the source, which plain diffusers loads with the zeros in place. `pruning.json` in the folder
(written before `memguard.json`, which marks the folder complete) records what was pruned:

    {"method", "model", "settings", "unit": "neuron" | "weight", "layers": [names],
     "prompts": [{"prompt", "num_pruned", "pruned": {layer: [indices]}, ...}],
     "pruned": {layer: [indices]}, "num_pruned"}

Layers and indices as `memguard.mitigations.layers` defines them (a layer's weight is
`<name>.weight` in the safetensors file). NeMo's prompts also record `num_candidates`,
`replicated_before` (the unpruned model's generations replicate), `mitigated` (some group of
candidates stopped them) and `neurons_needed` (that group's size; None when none did, and then
all the candidates are pruned).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from memguard.config import ConfigError, MitigateConfig, to_dict
from memguard.data.folder import ImageFolderDataset
from memguard.io import METADATA_FILE, DiffusionModel, load_model, save_model, write_json
from memguard.metrics.neighbors import ImageRows, distinct_rows
from memguard.metrics.replication import gu_replication
from memguard.mitigations.layers import (
    Selection,
    as_lists,
    is_text_fed,
    select_linear,
    union,
    zero_,
    zeroed,
)
from memguard.mitigations.nemo import (
    REFERENCE_PROMPTS,
    candidate_neurons,
    deactivation_search,
    neuron_activations,
    neurons,
)
from memguard.mitigations.wanda import input_norms, wanda_selection
from memguard.sampling import generate

PRUNING_FILE = "pruning.json"
Pruned = tuple[Selection, dict]  # one prompt's selection, and the figures recorded beside it


def read_prompt_file(path: str | Path, flag: str) -> list[str]:
    """The non-empty lines of a prompt file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag}: no such file: {path}")
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{flag}: {path} holds no prompt")
    return prompts


def replication_check(
    model: DiffusionModel, train: ImageFolderDataset, config: MitigateConfig
) -> Callable[[str], bool]:
    """Whether any of the prompt's `num_images` generations (from `seed`) is a replica of a
    training image by Gu et al.'s criterion (copies merged), with the model as it is now."""
    reference = ImageRows(train)
    distinct = distinct_rows(reference)

    def replicates(prompt: str) -> bool:
        images = generate(
            model, [prompt], config.num_images, config.seed, config.scheduler,
            config.num_inference_steps, config.guidance_scale,
        )  # fmt: skip
        result = gu_replication(
            images.flatten(1), reference, config.replication_threshold, distinct=distinct,
            device=model.device,
        )  # fmt: skip
        return bool(result.is_replica.any())

    return replicates


def nemo_prompt(
    model: DiffusionModel,
    layers: dict[str, torch.nn.Linear],
    prompt: str,
    reference: torch.Tensor,  # (R, n) activations on the reference prompts
    z_threshold: float,
    replicates: Callable[[str], bool],
) -> Pruned:
    """NeMo for one prompt: its outlier neurons, and the smallest group that mitigates it."""
    order = candidate_neurons(layers, model.encoder.encode([prompt])[0], reference, z_threshold)

    def replicates_without(count: int) -> bool:
        with zeroed(model.unet, neurons(layers, order[:count]), "neuron"):
            return replicates(prompt)

    needed = deactivation_search(len(order), replicates_without)
    selection = neurons(layers, order[: len(order) if needed is None else needed])
    return selection, {
        "num_candidates": len(order),
        "replicated_before": needed != 0,
        "mitigated": needed is not None,
        "neurons_needed": needed,
    }


def nemo(
    model: DiffusionModel,
    layers: dict[str, torch.nn.Linear],
    prompts: list[str],
    config: MitigateConfig,
) -> list[Pruned]:
    """NeMo for every prompt, against the reference prompts and the training folder."""
    if not all(is_text_fed(name) for name in layers):
        raise ConfigError(
            "layers: nemo's neurons are those of layers that read the text states "
            f"(attn2.to_k, attn2.to_v); {[n for n in layers if not is_text_fed(n)]} do not"
        )
    references = list(REFERENCE_PROMPTS)
    if config.reference_prompts is not None:
        references = read_prompt_file(config.reference_prompts, "--reference_prompts")
    reference = neuron_activations(layers, model.encoder.encode(references))
    train = ImageFolderDataset(config.train_data_dir, model.image_size)
    replicates = replication_check(model, train, config)
    return [
        nemo_prompt(model, layers, prompt, reference, config.z_threshold, replicates)
        for prompt in prompts
    ]


def wanda(
    model: DiffusionModel,
    layers: dict[str, torch.nn.Linear],
    prompts: list[str],
    config: MitigateConfig,
) -> list[Pruned]:
    """Wanda's top fraction of every layer, for every prompt."""
    pruned = []
    for prompt in prompts:
        states = model.encoder.encode([prompt])[0]
        norms = input_norms(model, layers, states, config.num_images, config.seed,
                            config.scheduler, config.num_inference_steps)  # fmt: skip
        pruned.append((wanda_selection(layers, norms, config.sparsity), {}))
    return pruned


METHODS = {"nemo": (nemo, "neuron"), "wanda": (wanda, "weight")}


def count(selection: Selection) -> int:
    return sum(len(indices) for indices in selection.values())


def mitigate(config: MitigateConfig) -> dict:
    """Prune the model for the prompts and write the pruned model folder and its
    pruning.json (see the module docstring); return what pruning.json holds."""
    output = Path(config.output_dir)
    if output.resolve() == Path(config.model).resolve():
        raise ConfigError("output_dir: write the pruned model to a new folder, not over --model")
    model = load_model(config.model, config.device)
    model.require_text("memguard mitigate (pruning what memorized prompts activate)")
    prompts = read_prompt_file(config.prompts, "--prompts")
    layers = select_linear(model.unet, config.layers)
    method, unit = METHODS[config.method]
    per_prompt = method(model, layers, prompts, config)
    pruned = union([selection for selection, _ in per_prompt])
    zero_(model.unet, pruned, unit)
    record = {
        "method": config.method,
        "model": config.model,
        "settings": to_dict(config),
        "unit": unit,
        "layers": list(layers),
        "prompts": [
            {"prompt": p, "num_pruned": count(s), **figures, "pruned": as_lists(s)}
            for p, (s, figures) in zip(prompts, per_prompt, strict=True)
        ],
        "pruned": as_lists(pruned),
        "num_pruned": count(pruned),
    }
    (output / METADATA_FILE).unlink(missing_ok=True)  # incomplete until save_model's last write
    write_json(output / PRUNING_FILE, record)
    metadata = {
        **model.metadata,
        "mitigation": {
            "method": config.method,
            "source": config.model,
            "record": PRUNING_FILE,
            "num_pruned": record["num_pruned"],
        },
    }
    pipeline = config.model if (Path(config.model) / "unet").is_dir() else None
    scheduler = DDPMScheduler.from_config(model.scheduler_config)
    save_model(output, model.unet, scheduler, metadata, pipeline)
    return record
