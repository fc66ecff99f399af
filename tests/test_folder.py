"""Image folders: loading, resizing, and errors that name the file and line."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from memguard.data import folder as folder_module
from memguard.data.folder import DataError, ImageFolderDataset, fingerprint, read_metadata


def _folder(tmp_path: Path, rows: list, size=(8, 8)) -> Path:
    for i, row in enumerate(rows):
        if isinstance(row, dict) and "file_name" in row:
            Image.new("RGB", size, (i * 40, 100, 200)).save(tmp_path / row["file_name"])
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_items_are_normalised_tensors(shapes_dir: Path) -> None:
    dataset = ImageFolderDataset(shapes_dir / "train", resolution=8)
    item = dataset[0]
    assert item["pixel_values"].shape == (3, 8, 8)
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    raw = np.array(Image.open(dataset.records[0].path))
    expected = torch.from_numpy(raw).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(item["pixel_values"], expected)
    assert item["caption"] == dataset.records[0].text


def test_resize_short_side_and_center_crop(tmp_path: Path) -> None:
    image = np.zeros((20, 40, 3), dtype=np.uint8)
    image[:, :10] = 255  # a white band on the left, cropped away
    Image.fromarray(image).save(tmp_path / "wide.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "wide.png", "text": "x"}))
    pixels = ImageFolderDataset(tmp_path, resolution=10).pixels(0)
    assert pixels.shape == (10, 10, 3)
    assert pixels.max() < 30


def test_custom_columns(tmp_path: Path) -> None:
    _folder(tmp_path, [{"file_name": "a.png", "image": "a.png", "caption": "hello"}])
    records = read_metadata(tmp_path, image_column="image", caption_column="caption")
    assert records[0].text == "hello"


def test_missing_image_names_file_and_line(tmp_path: Path) -> None:
    _folder(tmp_path, [{"file_name": "a.png", "text": "a"}, '{"file_name": "b.png", "text": "b"}'])
    with pytest.raises(DataError, match=r"metadata.jsonl, line 2: image file not found: .*b.png"):
        ImageFolderDataset(tmp_path, resolution=8)


def test_missing_caption_names_line(tmp_path: Path) -> None:
    _folder(tmp_path, [{"file_name": "a.png", "text": "a"}, {"file_name": "b.png"}])
    with pytest.raises(DataError, match=r"line 2: missing caption column 'text' for .*b.png"):
        ImageFolderDataset(tmp_path, resolution=8)


def test_unreadable_line_is_named(tmp_path: Path) -> None:
    _folder(tmp_path, [{"file_name": "a.png", "text": "a"}, "{not json"])
    with pytest.raises(DataError, match=r"line 2: not valid JSON"):
        read_metadata(tmp_path)


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    _folder(tmp_path, [{"file_name": "a.png", "text": "a"}, {"file_name": "b.png", "text": "b"}])
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"b.png \(metadata line 2\): cannot read image"):
        ImageFolderDataset(tmp_path, resolution=8)


def test_fingerprint_follows_content(tmp_path: Path, shapes_dir: Path) -> None:
    copy = shutil.copytree(shapes_dir / "test", tmp_path / "copy")
    assert fingerprint(read_metadata(copy)) == fingerprint(read_metadata(shapes_dir / "test"))
    Image.new("RGB", (8, 8)).save(copy / "00000.png")
    assert fingerprint(read_metadata(copy)) != fingerprint(read_metadata(shapes_dir / "test"))


def test_folders_over_the_memory_budget_decode_per_item(
    shapes_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = ImageFolderDataset(shapes_dir / "test", resolution=8)
    monkeypatch.setattr(folder_module, "CACHE_BUDGET_BYTES", 0)
    lazy = ImageFolderDataset(shapes_dir / "test", resolution=8)
    assert cached._cache is not None and lazy._cache is None
    assert torch.equal(lazy[3]["pixel_values"], cached[3]["pixel_values"])
    data = shutil.copytree(shapes_dir / "test", tmp_path / "data")
    (data / "00002.png").write_bytes(b"not a png")
    lazy = ImageFolderDataset(data, resolution=8)  # not decoded yet, so no error yet
    with pytest.raises(DataError, match=r"00002.png \(metadata line 3\): cannot read image"):
        lazy[2]
