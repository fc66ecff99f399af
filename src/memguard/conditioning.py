"""What a model is conditioned on: text, a class label, or nothing, chosen once per run or model.

`--conditioning text` is Stable Diffusion's setting (a diffusers `UNet2DConditionModel` reading
caption states through cross-attention); `class` and `none` are the class-conditional and
unconditional DDPMs of Ho et al. (2020) and of IET-AGC's main setting (Liu et al., ECCV 2024,
arXiv 2407.15328; IET-AGC+, arXiv 2502.09434: unconditional DDPMs on CIFAR-10 and AFHQ), a
diffusers `UNet2DModel`, with `num_class_embeds` for `class`.

A `Conditioning` is the one object that knows the difference; the rest of memguard asks it:

- `model_inputs(values)`: the keyword arguments of the UNet's forward pass for a batch of
  conditions (`{"encoder_hidden_states": states}`, `{"class_labels": labels}` or `{}`), and
  `null_inputs(n)` those of the unconditional branch (the empty caption, the null class), which
  caption (label) dropout trains and classifier-free guidance samples;
- `values(dataset)`: the condition of each training image (its caption, its class column);
- `spec()`: what `memguard.json` records, and `from_spec` reads back.

Classes are the sorted distinct values of the class column; label i is the i-th, and label
`num_classes` is the null class (so `num_class_embeds = num_classes + 1`). A model's class
labels are given by their values as strings ("circle", "3").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from memguard.data.folder import ImageFolderDataset
    from memguard.data.text import TextEncoder

CONDITIONINGS = ("text", "class", "none")
CONDITION_KEYS = ("encoder_hidden_states", "class_labels")  # the UNets' conditioning arguments


def condition_of(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The UNet keyword arguments a training micro-batch carries (none for an unconditional
    model)."""
    return {key: batch[key] for key in CONDITION_KEYS if key in batch}


class Conditioning(ABC):
    """See the module docstring."""

    kind: ClassVar[str]
    text: ClassVar[bool] = False  # whether prompts are captions read by a text encoder

    @abstractmethod
    def model_inputs(self, values: Sequence[str]) -> dict[str, torch.Tensor]:
        """The UNet's conditioning arguments for one condition per image."""

    @abstractmethod
    def null_inputs(self, count: int) -> dict[str, torch.Tensor]:
        """The unconditional branch's arguments for `count` images."""

    @abstractmethod
    def values(self, dataset: ImageFolderDataset) -> list[str]:
        """The condition of each training image, in order."""

    @abstractmethod
    def spec(self) -> dict:
        """What memguard.json records to rebuild this conditioning."""

    def training_inputs(
        self, values: Sequence[str], dropped: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """`model_inputs` of a training micro-batch, the null condition where `dropped` (B,)
        (caption or label dropout, for classifier-free guidance)."""
        null = self.null_inputs(len(values))
        return {
            key: torch.where(dropped.view(-1, *[1] * (value.dim() - 1)), null[key], value)
            for key, value in self.model_inputs(values).items()
        }

    @abstractmethod
    def choose(self, prompts: Sequence[str], class_labels: Sequence[str]) -> list[str]:
        """What `memguard sample` generates from, given its --prompt and --class_label values;
        a value of the wrong kind for this model is an error."""


class TextConditioning(Conditioning):
    """Caption states of a frozen text encoder, through cross-attention."""

    kind = "text"
    text = True

    def __init__(self, encoder: TextEncoder, embeddings: Any = None) -> None:
        self.encoder = encoder
        self.embeddings = embeddings  # memguard.data.text.CaptionEmbeddings, for training

    def model_inputs(self, values: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.embeddings is not None and all(v in self.embeddings.row for v in values):
            return {"encoder_hidden_states": self.embeddings.table[self.embeddings.rows(values)]}
        return {"encoder_hidden_states": self.encoder.encode(list(values))}

    def null_inputs(self, count: int) -> dict[str, torch.Tensor]:
        return self.model_inputs([""] * count)

    def values(self, dataset: ImageFolderDataset) -> list[str]:
        return list(dataset.captions)

    def spec(self) -> dict:
        return {"kind": self.kind}

    def choose(self, prompts: Sequence[str], class_labels: Sequence[str]) -> list[str]:
        if class_labels:
            raise ValueError("class_label: a text-conditional model takes --prompt, not classes")
        if not prompts:
            raise ValueError("give at least one --prompt or --prompt_file")
        return list(prompts)


class ClassConditioning(Conditioning):
    """A learned embedding per class (`UNet2DModel(num_class_embeds=num_classes + 1)`), the
    last one the null class."""

    kind = "class"

    def __init__(self, column: str, classes: Sequence[str]) -> None:
        self.column = column
        self.classes = [str(value) for value in classes]
        self.label = {value: i for i, value in enumerate(self.classes)}

    @classmethod
    def of_dataset(cls, dataset: ImageFolderDataset, column: str) -> ClassConditioning:
        """The classes of a training folder's `column`; a row without it is an error naming the
        column, the file and the line."""
        from memguard.data.folder import METADATA, DataError

        for record in dataset.records:
            value = record.columns.get(column)
            if value is None or isinstance(value, dict | list):
                raise DataError(
                    f"{dataset.root / METADATA}, line {record.line}: missing class column "
                    f"'{column}' (--class_column) for {record.path}"
                )
        values = {str(record.columns[column]) for record in dataset.records}
        return cls(column, sorted(values))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def labels(self, values: Sequence[str]) -> torch.Tensor:
        """Class labels (B,) of class values; an unknown one is an error listing the classes."""
        unknown = [str(v) for v in values if str(v) not in self.label]
        if unknown:
            raise ValueError(
                f"class_label: {unknown[0]!r} is not a class of the model's column "
                f"'{self.column}' (classes: {', '.join(self.classes)})"
            )
        return torch.tensor([self.label[str(v)] for v in values], dtype=torch.long)

    def model_inputs(self, values: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"class_labels": self.labels(values)}

    def null_inputs(self, count: int) -> dict[str, torch.Tensor]:
        return {"class_labels": torch.full((count,), self.num_classes, dtype=torch.long)}

    def values(self, dataset: ImageFolderDataset) -> list[str]:
        return [str(value) for value in dataset.column(self.column)]

    def spec(self) -> dict:
        return {"kind": self.kind, "column": self.column, "classes": self.classes}

    def choose(self, prompts: Sequence[str], class_labels: Sequence[str]) -> list[str]:
        if prompts:
            raise ValueError(
                f"prompt: a class-conditional model takes --class_label (classes of "
                f"'{self.column}': {', '.join(self.classes)})"
            )
        self.labels(class_labels)  # unknown classes are named
        return list(class_labels) or list(self.classes)


class Unconditional(Conditioning):
    """No condition: the UNet sees only the noisy image and the timestep."""

    kind = "none"

    def model_inputs(self, values: Sequence[str]) -> dict[str, torch.Tensor]:
        if any(values):
            raise ValueError(
                f"prompt: {next(v for v in values if v)!r}, but an unconditional model "
                "(conditioning none) takes no prompt or class; generate from the empty prompt"
            )
        return {}

    def null_inputs(self, count: int) -> dict[str, torch.Tensor]:
        return {}

    def values(self, dataset: ImageFolderDataset) -> list[str]:
        return [""] * len(dataset)

    def spec(self) -> dict:
        return {"kind": self.kind}

    def choose(self, prompts: Sequence[str], class_labels: Sequence[str]) -> list[str]:
        self.model_inputs([*prompts, *class_labels])  # anything given is an error
        return [""]


def from_spec(spec: Mapping[str, Any] | None, encoder: TextEncoder | None) -> Conditioning:
    """The conditioning a model folder's memguard.json records (none recorded: text)."""
    kind = (spec or {}).get("kind", "text")
    if kind == "text":
        if encoder is None:
            raise ValueError("a text-conditional model needs its text encoder")
        return TextConditioning(encoder)
    if kind == "class":
        return ClassConditioning(spec["column"], spec["classes"])
    if kind == "none":
        return Unconditional()
    raise ValueError(f"conditioning: unknown kind {kind!r} (known: {', '.join(CONDITIONINGS)})")
