"""The linear layers a pruning mitigation chooses, and what it prunes in them, zeroed in place.

A selection maps a layer's module path in the UNet (its weight is `<name>.weight` in the
safetensors file) to indices of one unit: output channels (`neuron`: the row of the weight and
the entry of the bias, so the channel outputs 0) or flat indices row x in_features + column
into the weight (`weight`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fnmatch import fnmatchcase

import torch

from memguard.config import ConfigError

Selection = dict[str, torch.Tensor]  # layer name -> indices (long), ascending
UNITS = ("neuron", "weight")
TEXT_FED = ("attn2.to_k", "attn2.to_v")  # cross-attention projections of the text states


def select_linear(unet: torch.nn.Module, patterns: Sequence[str]) -> dict[str, torch.nn.Linear]:
    """The UNet's linear layers whose names end with one of `patterns` (shell wildcards
    allowed), in the UNet's order."""
    chosen = {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear)
        and any(fnmatchcase(name, f"*{pattern}") for pattern in patterns)
    }
    if not chosen:
        raise ConfigError(f"layers: no linear layer of the UNet matches {list(patterns)}")
    return chosen


def is_text_fed(name: str) -> bool:
    """Whether the layer reads the text states (a cross-attention key or value projection)."""
    return name.endswith(TEXT_FED)


@torch.no_grad()
def zero_(unet: torch.nn.Module, selection: Selection, unit: str) -> None:
    """Zero the selected units of the UNet's weights, in place."""
    if unit not in UNITS:
        raise ValueError(f"unit: {unit!r} is not one of {', '.join(UNITS)}")
    for name, indices in selection.items():
        layer = unet.get_submodule(name)
        indices = indices.to(layer.weight.device)
        if unit == "weight":
            layer.weight.view(-1)[indices] = 0
            continue
        layer.weight[indices] = 0
        if layer.bias is not None:
            layer.bias[indices] = 0


@contextmanager
def zeroed(unet: torch.nn.Module, selection: Selection, unit: str) -> Iterator[None]:
    """The selected units zeroed within the block, the weights restored after it."""
    saved = {name: unet.get_submodule(name).state_dict() for name in selection}
    saved = {name: {k: v.clone() for k, v in state.items()} for name, state in saved.items()}
    zero_(unet, selection, unit)
    try:
        yield
    finally:
        for name, state in saved.items():
            unet.get_submodule(name).load_state_dict(state)


def union(selections: Sequence[Selection]) -> Selection:
    """Every index selected by any of `selections`, per layer, ascending."""
    names = dict.fromkeys(name for selection in selections for name in selection)
    return {
        name: torch.cat([s[name] for s in selections if name in s]).unique(sorted=True)
        for name in names
    }


def as_lists(selection: Selection) -> dict[str, list[int]]:
    """A selection as JSON-ready lists."""
    return {name: indices.tolist() for name, indices in selection.items()}
