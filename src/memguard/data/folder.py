"""Image folders with `metadata.jsonl` (the Hugging Face / diffusers imagefolder convention).

Every line of `metadata.jsonl` is a JSON object with the image's path relative to the folder
(`file_name` by default) and its caption (`text` by default; a folder for an unconditional or
class-conditional model may have none, `caption_column=None`, and every caption is then ""); any
other columns ride along as ground truth. Reading validates every line up front, so a missing
image, a missing caption or an unreadable line is an error naming the file and line number
before any training starts; a corrupt image is named the same way when it is decoded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

METADATA = "metadata.jsonl"


class DataError(ValueError):
    """A problem with the user's data; the message names the file and line."""


@dataclass(frozen=True)
class Record:
    """One validated metadata line."""

    path: Path
    text: str
    line: int
    columns: dict = field(default_factory=dict)


def read_metadata(
    root: str | Path, image_column: str = "file_name", caption_column: str | None = "text"
) -> list[Record]:
    """Parse and validate `root/metadata.jsonl`; raise `DataError` naming the first bad line.
    `caption_column=None`: captions are not read (each is "")."""
    root = Path(root)
    metadata = root / METADATA
    if not metadata.is_file():
        raise DataError(f"{metadata}: not found (an image folder needs a {METADATA})")
    records = []
    with open(metadata) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{metadata}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object")
            name = row.get(image_column)
            if not isinstance(name, str) or not name:
                raise DataError(f"{where}: missing image column '{image_column}'")
            path = root / name
            if not path.is_file():
                raise DataError(f"{where}: image file not found: {path}")
            text = "" if caption_column is None else row.get(caption_column)
            if not isinstance(text, str):
                raise DataError(f"{where}: missing caption column '{caption_column}' for {path}")
            records.append(Record(path=path, text=text, line=number, columns=row))
    if not records:
        raise DataError(f"{metadata}: no images listed")
    return records


def load_image(record: Record, resolution: int) -> np.ndarray:
    """Decode, resize the short side to `resolution` and center-crop: uint8 array (H, W, 3)."""
    try:
        with Image.open(record.path) as image:
            image = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(
            f"{record.path} (metadata line {record.line}): cannot read image: {error}"
        ) from None
    width, height = image.size
    if (width, height) != (resolution, resolution):
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        image = image.resize(size, Image.BICUBIC)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    return np.array(image, dtype=np.uint8)


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [-1, 1], the diffusion models' convention."""
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div(127.5).sub(1.0)


def unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1], the measures' convention."""
    return images.float().div(255.0)


def fingerprint(records: list[Record]) -> str:
    """SHA-256 over every caption and image file: the identity of a training set."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(record.text.encode())
        digest.update(record.path.read_bytes())
    return digest.hexdigest()


CACHE_BUDGET_BYTES = 2 * 2**30  # decoded uint8 images kept in memory, at most


class ImageFolderDataset(Dataset):
    """Validated image folder; items are {'pixel_values', 'caption', 'index'}.

    Images are decoded once up front and kept in memory (as uint8) when they fit in
    CACHE_BUDGET_BYTES, which also checks every image before training starts; larger folders
    (Stable Diffusion fine-tunes) are decoded per item. `cache` forces either way.
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        image_column: str = "file_name",
        caption_column: str | None = "text",
        cache: bool | None = None,
    ) -> None:
        self.root = Path(root)
        self.resolution = resolution
        self.records = read_metadata(self.root, image_column, caption_column)
        self.captions = [record.text for record in self.records]
        self._cache: list[np.ndarray] | None = None
        if cache is None:
            cache = len(self.records) * 3 * resolution**2 <= CACHE_BUDGET_BYTES
        if cache:
            self._cache = [load_image(record, resolution) for record in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def pixels(self, index: int) -> np.ndarray:
        if self._cache is not None:
            return self._cache[index]
        return load_image(self.records[index], self.resolution)

    def __getitem__(self, index: int) -> dict:
        return {
            "pixel_values": to_tensor(self.pixels(index)),
            "caption": self.captions[index],
            "index": index,
        }

    def column(self, name: str) -> list:
        """Values of a metadata column (None where a row lacks it)."""
        return [record.columns.get(name) for record in self.records]

    def stacked(self, indices: Sequence[int] | None = None) -> torch.Tensor:
        """The images at `indices` (default: all) as one uint8 tensor (N, 3, H, W)."""
        indices = range(len(self)) if indices is None else indices
        return torch.from_numpy(np.stack([self.pixels(i) for i in indices])).permute(0, 3, 1, 2)

    def chunks(self, size: int, indices: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
        """The images at `indices` (default: all), in order, as uint8 tensors of at most `size`
        images each: a folder far larger than memory is read one chunk at a time."""
        indices = range(len(self)) if indices is None else indices
        for start in range(0, len(indices), size):
            yield self.stacked(indices[start : start + size])


def unit_batches(images: torch.Tensor | ImageFolderDataset, size: int) -> Iterator[torch.Tensor]:
    """Images (N, 3, H, W) in [0, 1], or an image folder decoded a batch at a time, as float
    batches in [0, 1] of at most `size` images."""
    if isinstance(images, ImageFolderDataset):
        return (unit_float(chunk) for chunk in images.chunks(size))
    return (images[start : start + size].float() for start in range(0, len(images), size))
