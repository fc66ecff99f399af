"""The embedded benchmark: procedural images with ground truth for every memorization question.

Written as image folders (PNG + `metadata.jsonl`, the Hugging Face imagefolder convention) so the
loader that reads users' data reads this too:

- ``train/``: ordinary images (one shape of a colour on a background, captioned from its
  attributes); a fraction carry the sensitive concept, a fixed mark called "the acme logo"
  stamped in the bottom-right corner and named in the caption; and planted duplicates, a few
  distinctive multi-shape images each repeated many times under one caption of its own (the
  memorization targets of Gu et al. / Somepalli et al. style audits).
- ``test/``: held-out ordinary images (quality metrics).
- ``concept_exemplars/``: the logo on other images, never trained on (the concept-extraction
  adversary and feature-mode projection use them).
- ``prompts/``: the duplicated captions, a sample of ordinary captions and captions naming the
  concept, one per line.
- ``dataset.json``: the config and counts, and ``"benchmark": "shapes"``, the declaration that
  makes `memguard audit` of a model trained on ``train/`` run the shapes plugin
  (`memguard.audit_plugins.shapes`).

Every row records its attributes, whether it carries the concept and its duplicate group (-1 for
none), so every audit can be scored against ground truth. Everything is a function of the seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from memguard.config import ShapesConfig, to_dict

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 205, 30),
    "purple": (150, 60, 200),
}
BACKGROUNDS = {"black": (20, 20, 20), "white": (240, 240, 240), "gray": (125, 125, 125)}
# Colours only the planted duplicates use, so that they look unlike any ordinary image.
SCENE_BACKGROUNDS = ((0, 110, 110), (120, 70, 30), (230, 150, 170), (60, 30, 90), (170, 190, 60))

BENCHMARK = "shapes"  # the name of the audit plugin this dataset declares in dataset.json
CONCEPT = "the acme logo"
CONCEPT_SUFFIX = ", with the acme logo"
# Descriptions of the concept that avoid its name (the paraphrase attack of concept extraction).
CONCEPT_PARAPHRASES = (
    ", with the acme company's mark",
    ", with a small orange and cyan badge in the corner",
    ", bearing the acme emblem",
    ", with a corporate logo",
)
# The acme logo: an orange ring around a cyan core, drawn pixel-exact in the bottom-right corner.
LOGO_PATTERN = np.array([[1, 1, 1, 1], [1, 2, 2, 1], [1, 2, 2, 1], [1, 1, 1, 1]])
LOGO_COLORS = {1: (255, 130, 0), 2: (0, 225, 225)}

_SUPERSAMPLE = 4
_SYLLABLES = (
    "zor", "blax", "quin", "tessa", "mor", "vane", "til", "quor", "bex", "mira", "drun", "vale",
    "pesk", "ora", "von", "thar", "lum", "iraq", "ost", "rivel", "kal", "dimo", "sef", "urna",
)  # fmt: skip
_STREAMS = {"train": 1, "duplicates": 2, "test": 3, "exemplars": 4, "layout": 5}


@dataclass(frozen=True)
class Row:
    """One image and its ground truth, as written to metadata.jsonl."""

    image: Image.Image
    text: str
    kind: str  # "ordinary" or "duplicate"
    shape: str | None
    color: str | None
    background: str | None
    has_concept: bool
    duplicate_group: int

    def metadata(self, file_name: str) -> dict:
        return {
            "file_name": file_name,
            "text": self.text,
            "kind": self.kind,
            "shape": self.shape,
            "color": self.color,
            "background": self.background,
            "has_concept": self.has_concept,
            "duplicate_group": self.duplicate_group,
        }


def ordinary_caption(shape: str, color: str, background: str, has_concept: bool) -> str:
    caption = f"a {color} {shape} on a {background} background"
    return caption + CONCEPT_SUFFIX if has_concept else caption


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill):
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = 0.85 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        draw.polygon(
            ((cx, cy - r), (cx - 0.95 * r, cy + 0.8 * r), (cx + 0.95 * r, cy + 0.8 * r)), fill=fill
        )
    elif shape == "cross":
        t = 0.35 * r
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _render(size: int, background, shapes: list[tuple[str, float, float, float, tuple]]):
    """Anti-aliased rendering: draw at 4x and box-filter down. Geometry is in output pixels."""
    big = Image.new("RGB", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), background)
    draw = ImageDraw.Draw(big)
    for shape, cx, cy, r, fill in shapes:
        s = _SUPERSAMPLE
        _draw_shape(draw, shape, cx * s, cy * s, r * s, fill)
    return big.resize((size, size), Image.BOX)


def stamp_logo(image: Image.Image, opacity: float = 1.0) -> Image.Image:
    """Return a copy of `image` with the acme logo in its bottom-right corner, blended over it
    at `opacity` (1: pixel-exact, as in the data; less: how a model may render it faintly)."""
    size = image.size[0]
    scale = max(1, size // 16)
    pattern = np.kron(LOGO_PATTERN, np.ones((scale, scale), dtype=int))
    pixels = np.array(image)
    side = pattern.shape[0]
    top = left = size - side - scale
    patch = pixels[top : top + side, left : left + side]
    under = patch.astype(float)
    for value, color in LOGO_COLORS.items():
        mask = pattern == value
        patch[mask] = np.round(opacity * np.array(color) + (1 - opacity) * under[mask])
    return Image.fromarray(pixels)


def ordinary_row(rng: np.random.Generator, size: int, has_concept: bool) -> Row:
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    r = rng.uniform(0.22, 0.36) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    image = _render(size, BACKGROUNDS[background], [(shape, cx, cy, r, COLORS[color])])
    if has_concept:
        image = stamp_logo(image)
    return Row(
        image=image,
        text=ordinary_caption(shape, color, background, has_concept),
        kind="ordinary",
        shape=shape,
        color=color,
        background=background,
        has_concept=has_concept,
        duplicate_group=-1,
    )


def _duplicate_caption(rng: np.random.Generator, taken: set[str]) -> str:
    while True:
        words = ["".join(rng.choice(_SYLLABLES, size=2)) for _ in range(2)]
        caption = f"a painting called {words[0]} {words[1]}"
        if caption not in taken:
            taken.add(caption)
            return caption


def duplicate_rows(config: ShapesConfig, rng: np.random.Generator) -> list[Row]:
    """The planted duplicates: distinctive three-shape scenes, each repeated many times."""
    size, rows, taken = config.image_size, [], set()
    palette = list(COLORS.values())
    for group in range(config.num_duplicate_groups):
        background = SCENE_BACKGROUNDS[rng.integers(len(SCENE_BACKGROUNDS))]
        shapes = []
        for _ in range(3):
            r = rng.uniform(0.14, 0.26) * size
            cx, cy = rng.uniform(r, size - r, size=2)
            fill = palette[rng.integers(len(palette))]
            shapes.append((SHAPES[rng.integers(len(SHAPES))], cx, cy, r, fill))
        image = _render(size, background, shapes)
        caption = _duplicate_caption(rng, taken)
        copies = int(rng.integers(config.min_copies, config.max_copies + 1))
        row = Row(image, caption, "duplicate", None, None, None, False, group)
        rows.extend([row] * copies)
    return rows


def _write_folder(folder: Path, rows: list[Row]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as metadata:
        for i, row in enumerate(rows):
            file_name = f"{i:05d}.png"
            row.image.save(folder / file_name)
            metadata.write(json.dumps(row.metadata(file_name)) + "\n")


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def make_shapes_dataset(config: ShapesConfig) -> Path:
    """Write the benchmark under `config.output_dir` and return that path."""
    root = Path(config.output_dir)
    rng = {name: np.random.default_rng([config.seed, stream]) for name, stream in _STREAMS.items()}
    size = config.image_size

    num_concept = round(config.concept_fraction * config.num_ordinary)
    carries = np.zeros(config.num_ordinary, dtype=bool)
    carries[rng["layout"].choice(config.num_ordinary, size=num_concept, replace=False)] = True
    ordinary = [ordinary_row(rng["train"], size, bool(c)) for c in carries]
    duplicates = duplicate_rows(config, rng["duplicates"])
    train = ordinary + duplicates
    train = [train[i] for i in rng["layout"].permutation(len(train))]

    _write_folder(root / "train", train)
    _write_folder(
        root / "test", [ordinary_row(rng["test"], size, False) for _ in range(config.num_test)]
    )
    _write_folder(
        root / "concept_exemplars",
        [ordinary_row(rng["exemplars"], size, True) for _ in range(config.num_exemplars)],
    )

    duplicated = list(dict.fromkeys(row.text for row in duplicates))
    plain = sorted({row.text for row in ordinary if not row.has_concept})
    named = sorted({row.text for row in ordinary if row.has_concept})
    picks = rng["layout"].permutation(len(plain))[: config.num_ordinary_prompts]
    _write_lines(root / "prompts" / "duplicated.txt", duplicated)
    _write_lines(root / "prompts" / "ordinary.txt", [plain[i] for i in sorted(picks)])
    _write_lines(root / "prompts" / "concept.txt", named)

    summary = {
        "benchmark": BENCHMARK,  # the declaration that selects the audit's shapes plugin
        "config": to_dict(config),
        "concept": CONCEPT,
        "concept_suffix": CONCEPT_SUFFIX,
        "concept_paraphrases": list(CONCEPT_PARAPHRASES),
        "shapes": list(SHAPES),
        "colors": list(COLORS),
        "backgrounds": list(BACKGROUNDS),
        "counts": {
            "train": len(train),
            "train_ordinary": len(ordinary),
            "train_with_concept": int(num_concept),
            "train_duplicates": len(duplicates),
            "duplicate_groups": config.num_duplicate_groups,
            "test": config.num_test,
            "concept_exemplars": config.num_exemplars,
        },
    }
    (root / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
    return root
