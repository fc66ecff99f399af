"""The embedded benchmark: procedural images with ground truth for every memorization question.

Written as image folders (PNG + `metadata.jsonl`, the Hugging Face imagefolder convention) so the
loader that reads users' data reads this too:

- ``train/``: ordinary images (one shape of a colour on a background, captioned from its
  attributes); a fraction carry the sensitive concept, named in the caption; and planted
  duplicates, a few distinctive multi-shape images each repeated many times under one caption of
  its own (the memorization targets of Gu et al. / Somepalli et al. style audits).
- ``test/``: held-out ordinary images (quality metrics).
- ``concept_exemplars/``: the concept on other images, never trained on (the concept-extraction
  adversary and feature-mode projection use them).
- ``prompts/``: the duplicated captions, a sample of ordinary captions and captions naming the
  concept, one per line; and ``memorized.txt``, the planted duplicates as the images an
  extraction attack aims at (one training image of each group, ``../train/NAME<TAB>caption`` a
  line, the list format of `memguard.attacks.targets`; `memguard attack trigger --images` and
  `memguard train --strategy adversarial --memorized` read it).
- ``dataset.json``: the config and counts, the concept's kind, and ``"benchmark": "shapes"``,
  the declaration that makes `memguard audit` of a model trained on ``train/`` run the shapes
  plugin (`memguard.audit_plugins.shapes`).

The concept comes in kinds (`KINDS`, `--concept_kind`), the settings on which concept-level
selective learning (Kothandaraman & Pytlarz, arXiv 2512.11194) is to be tested:

- ``fixed``: "the acme logo", a mark stamped pixel-exact in the bottom-right corner;
- ``moving``: the same logo at a random position, scale and rotation on each image (area-sampled,
  so rotated logos are resampled, not snapped to pixels); the columns ``logo_x``, ``logo_y``
  (its centre, in pixels), ``logo_scale`` (its side over the fixed logo's) and ``logo_angle``
  (degrees) record where;
- ``texture``: a way of drawing rather than a mark: the shape's fill in "acme hatching",
  diagonal stripes of its colour alternating with a darker tone; only the shape changes.

`--captions` chooses what a model conditions on: the captions (``text``, the default), a
``class`` column instead (the shape's index, each planted duplicate a class of its own after the
shapes', as it has a caption of its own: a class-conditional DDPM), or nothing (``none``: no
caption column, for an unconditional DDPM, IET-AGC's setting, Liu et al., ECCV 2024); the images,
planted duplicates included, and the ground-truth columns are the same.

Every row records its attributes, whether it carries the concept (``has_concept``, true iff its
caption names the concept) and its duplicate group (-1 for none), so every audit can be scored
against ground truth. Everything is a function of the seed; the concept's placement draws from
a stream of its own, so the kinds of one seed show the same shapes.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from memguard.config import CONCEPT_KINDS, ConfigError, ShapesConfig, to_dict

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

CLASS_COLUMN = "class"  # --captions class: the shape's index, or a planted duplicate's own class
BENCHMARK = "shapes"  # the name of the audit plugin this dataset declares in dataset.json
MEMORIZED_FILE = "memorized.txt"  # under prompts/: the planted duplicates as attack targets
# The fixed kind's concept (the logo's name, how captions name it, paraphrases that avoid it).
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
# A moving logo's side, as a multiple of the fixed logo's (4 px at 16 px): big enough to stay
# recognisable at 16 px, small enough to leave the shape visible.
MOVING_SCALES = (1.0, 1.75)
# Acme hatching: stripes along the image's diagonal, HATCH_STRIPES periods per image side, half
# of each period the shape's colour and half that colour times HATCH_TONE.
HATCH_STRIPES = 4
HATCH_TONE = 0.45

_SUPERSAMPLE = 4
_LOGO_SUPERSAMPLE = 8  # sample points per pixel side when a logo is painted
_SYLLABLES = (
    "zor", "blax", "quin", "tessa", "mor", "vane", "til", "quor", "bex", "mira", "drun", "vale",
    "pesk", "ora", "von", "thar", "lum", "iraq", "ost", "rivel", "kal", "dimo", "sef", "urna",
)  # fmt: skip
_STREAMS = {"train": 1, "duplicates": 2, "test": 3, "exemplars": 4, "layout": 5, "placement": 6}

Color = tuple[int, int, int]
Shape = tuple[str, float, float, float, Color]  # name, centre x, centre y, radius, fill


@dataclass(frozen=True)
class Drawing:
    """What an image shows before any concept: a background and shapes, in output pixels."""

    size: int
    background: Color
    shapes: tuple[Shape, ...]

    def render(self, hatch_phase: float | None = None) -> Image.Image:
        """The image; with `hatch_phase` (in [0, 1)), every shape filled in acme hatching."""
        return _render(self.size, self.background, list(self.shapes), hatch_phase)


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
    concept_columns: dict[str, Any] = field(default_factory=dict)  # the concept kind's columns
    drawing: Drawing | None = field(default=None, compare=False, repr=False)

    @property
    def class_label(self) -> int:
        """Its class: the shape's index, or for a planted duplicate a class of its own after
        the shapes' (len(SHAPES) + its group)."""
        if self.shape is not None:
            return SHAPES.index(self.shape)
        return len(SHAPES) + self.duplicate_group

    def metadata(
        self, file_name: str, concept_columns: tuple[str, ...] = (), captions: str = "text"
    ) -> dict:
        """The row's metadata; `concept_columns` (the kind's, None where no concept) last;
        `captions`: the caption column (text), the class column (class) or neither (none)."""
        conditions = {"text": {"text": self.text}, "class": {CLASS_COLUMN: self.class_label}}
        return {
            "file_name": file_name,
            **conditions.get(captions, {}),
            "kind": self.kind,
            "shape": self.shape,
            "color": self.color,
            "background": self.background,
            "has_concept": self.has_concept,
            "duplicate_group": self.duplicate_group,
            **dict.fromkeys(concept_columns),
            **self.concept_columns,
        }


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


def _render(
    size: int, background: Color, shapes: list[Shape], hatch_phase: float | None = None
) -> Image.Image:
    """Anti-aliased rendering: draw at 4x and box-filter down. Geometry is in output pixels."""
    s = _SUPERSAMPLE
    big = Image.new("RGB", (size * s, size * s), background)
    draw = ImageDraw.Draw(big)
    for shape, cx, cy, r, fill in shapes:
        _draw_shape(draw, shape, cx * s, cy * s, r * s, fill)
    if hatch_phase is not None:
        big = _hatch(big, size, shapes, hatch_phase)
    return big.resize((size, size), Image.BOX)


def _hatch(big: Image.Image, size: int, shapes: list[Shape], phase: float) -> Image.Image:
    """`big` (drawn at the supersampled scale) with its shapes' fills in acme hatching: the
    darker stripes are painted where a shape covers the sample, in the tone of the topmost one."""
    s = _SUPERSAMPLE
    tones = Image.new("RGB", big.size)
    cover = Image.new("L", big.size)
    tone_draw, cover_draw = ImageDraw.Draw(tones), ImageDraw.Draw(cover)
    for shape, cx, cy, r, fill in shapes:
        tone = tuple(round(HATCH_TONE * c) for c in fill)
        _draw_shape(tone_draw, shape, cx * s, cy * s, r * s, tone)
        _draw_shape(cover_draw, shape, cx * s, cy * s, r * s, 255)
    centres = (np.arange(size * s) + 0.5) / s  # sample points, in output pixels
    period = size / HATCH_STRIPES
    stripes = ((centres[None, :] + centres[:, None]) / period + phase) % 1.0 < 0.5
    dark = stripes & (np.array(cover) > 0)
    return Image.fromarray(np.where(dark[..., None], np.array(tones), np.array(big)))


def paint_logo(
    image: Image.Image, cx: float, cy: float, side: float, angle: float = 0.0,
    opacity: float = 1.0,
) -> Image.Image:  # fmt: skip
    """A copy of `image` with the acme logo, `side` pixels wide, centred at (`cx`, `cy`) and
    turned by `angle` degrees, blended over it at `opacity`. Area-sampled: each pixel averages
    the logo at 8 x 8 points inside it, so a rotated or sub-pixel logo is resampled, and an
    axis-aligned logo on whole pixels is painted pixel-exact."""
    size = image.size[0]
    s = _LOGO_SUPERSAMPLE
    centres = (np.arange(size * s) + 0.5) / s
    x, y = np.meshgrid(centres - cx, centres - cy)
    turn = np.deg2rad(angle)
    cos, sin = np.cos(turn), np.sin(turn)
    n = LOGO_PATTERN.shape[0]
    col = np.floor(((cos * x + sin * y) / side + 0.5) * n).astype(int)
    row = np.floor(((cos * y - sin * x) / side + 0.5) * n).astype(int)
    inside = (col >= 0) & (col < n) & (row >= 0) & (row < n)
    palette = np.array([(0, 0, 0), *(LOGO_COLORS[v] for v in sorted(LOGO_COLORS))], dtype=float)
    values = np.where(inside, LOGO_PATTERN[row.clip(0, n - 1), col.clip(0, n - 1)], 0)
    colour = palette[values].reshape(size, s, size, s, 3).mean(axis=(1, 3))
    alpha = inside.reshape(size, s, size, s).mean(axis=(1, 3))[..., None]
    under = np.array(image).astype(float)
    return Image.fromarray(
        np.round(under * (1 - opacity * alpha) + opacity * colour).astype(np.uint8)
    )


def logo_side(size: int) -> int:
    """The fixed logo's side at image side `size`: 4 pixels per 16."""
    return LOGO_PATTERN.shape[0] * max(1, size // 16)


def stamp_logo(image: Image.Image, opacity: float = 1.0) -> Image.Image:
    """Return a copy of `image` with the acme logo in its bottom-right corner, blended over it
    at `opacity` (1: pixel-exact, as in the data; less: how a model may render it faintly)."""
    size, side = image.size[0], logo_side(image.size[0])
    centre = size - side // LOGO_PATTERN.shape[0] - side / 2
    return paint_logo(image, centre, centre, side, 0.0, opacity)


class ConceptKind(ABC):
    """One kind of sensitive concept: how captions name it, how it is drawn on an image, and
    the metadata columns (beyond ``has_concept``) that record where."""

    name: str
    concept: str  # its name, as in "--concept" of gradient projection
    template: str  # how a caption names it: `template.format(concept)` is appended
    paraphrases: tuple[str, ...]  # caption endings that describe it without its name
    columns: tuple[str, ...] = ()

    @property
    def suffix(self) -> str:
        """What a caption naming the concept ends with."""
        return self.template.format(self.concept)

    @abstractmethod
    def draw(
        self, drawing: Drawing, plain: Image.Image, rng: np.random.Generator
    ) -> tuple[Image.Image, dict[str, Any]]:
        """`plain` (the render of `drawing`) carrying the concept in full, and its columns."""


class FixedLogo(ConceptKind):
    """The acme logo, pixel-exact in the bottom-right corner of every image that carries it."""

    name, concept, template = "fixed", CONCEPT, ", with {}"
    paraphrases = CONCEPT_PARAPHRASES

    def draw(self, drawing, plain, rng):
        return stamp_logo(plain), {}


class MovingLogo(ConceptKind):
    """The acme logo at a random position, scale and rotation, wholly inside the image."""

    name, concept, template = "moving", CONCEPT, ", with {}"
    paraphrases = (
        ", with the acme company's mark",
        ", with a small orange and cyan badge",
        ", bearing the acme emblem",
        ", with a corporate logo",
    )
    columns = ("logo_x", "logo_y", "logo_scale", "logo_angle")

    def draw(self, drawing, plain, rng):
        size, base = drawing.size, logo_side(drawing.size)
        # a logo whose diagonal spans the image could not turn inside it
        scale = round(min(rng.uniform(*MOVING_SCALES), size / base / np.sqrt(2)), 3)
        angle = round(float(rng.uniform(0.0, 360.0)), 2)
        turn = np.deg2rad(angle)
        half = scale * base / 2 * (abs(np.cos(turn)) + abs(np.sin(turn)))
        x, y = (round(float(v), 3) for v in rng.uniform(half, size - half, size=2))
        image = paint_logo(plain, x, y, scale * base, angle)
        return image, {"logo_x": x, "logo_y": y, "logo_scale": scale, "logo_angle": angle}


class Hatching(ConceptKind):
    """Acme hatching: the shapes' fills in diagonal stripes of their colour and a darker tone,
    at a random phase; the background is untouched."""

    name, concept, template = "texture", "acme hatching", " in {}"
    paraphrases = (
        " in the acme company's striped style",
        " filled with diagonal dark stripes",
        " drawn with acme's trademark stripes",
        " in a striped corporate pattern",
    )

    def draw(self, drawing, plain, rng):
        return drawing.render(hatch_phase=float(rng.uniform())), {}


KINDS: dict[str, ConceptKind] = {
    kind.name: kind for kind in (FixedLogo(), MovingLogo(), Hatching())
}
assert tuple(KINDS) == CONCEPT_KINDS
# Every metadata column the benchmark may write (what a bench's `drop_where` may test).
COLUMNS = (
    "text", "kind", "shape", "color", "background", "has_concept", "duplicate_group",
    *dict.fromkeys(c for kind in KINDS.values() for c in kind.columns),
)  # fmt: skip


def concept_kind(name: str) -> ConceptKind:
    """The kind called `name`; a clear error naming `concept_kind` otherwise."""
    if name not in KINDS:
        raise ConfigError(f"concept_kind: {name!r} is not one of {', '.join(KINDS)}")
    return KINDS[name]


def dataset_concept_kind(root: str | Path) -> ConceptKind:
    """The concept kind of the benchmark folder `root`, as its dataset.json records it (a
    folder written before the kinds existed, or without dataset.json, is ``fixed``)."""
    summary = Path(root) / "dataset.json"
    written = json.loads(summary.read_text()) if summary.is_file() else {}
    try:
        return concept_kind(written.get("concept_kind", "fixed"))
    except ConfigError as error:
        raise ConfigError(f"{summary}: {error}") from None


def blend_concept(
    plain: Image.Image, full: Image.Image, opacity: float = 1.0, keep: np.ndarray | None = None
) -> Image.Image:
    """An instance of a concept between `plain` (without it) and `full` (with it in full):
    `opacity` of the way (a faded instance), only where `keep` (H, W) is true (a partial one)."""
    a, b = np.array(plain).astype(float), np.array(full).astype(float)
    weight = opacity * (np.ones(a.shape[:2]) if keep is None else keep.astype(float))
    return Image.fromarray(np.round(a + weight[..., None] * (b - a)).astype(np.uint8))


def half_plane(plain: Image.Image, full: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """A mask (H, W) of the pixels on one side of a random line through the centre of where
    `full` differs from `plain`: with `blend_concept`, about half of the concept."""
    changed = np.argwhere((np.array(plain) != np.array(full)).any(axis=-1))
    cy, cx = changed.mean(axis=0) if len(changed) else (0.0, 0.0)
    turn = rng.uniform(0.0, 2 * np.pi)
    y, x = np.mgrid[: plain.size[1], : plain.size[0]]
    return (x - cx) * np.cos(turn) + (y - cy) * np.sin(turn) >= 0


def ordinary_caption(
    shape: str, color: str, background: str, has_concept: bool, concept: ConceptKind | None = None
) -> str:
    """The caption of an ordinary image; naming `concept` (default: the fixed logo) if it
    carries it."""
    caption = f"a {color} {shape} on a {background} background"
    return caption + (concept or KINDS["fixed"]).suffix if has_concept else caption


def ordinary_row(
    rng: np.random.Generator,
    size: int,
    has_concept: bool,
    concept: ConceptKind | None = None,
    placement: np.random.Generator | None = None,
) -> Row:
    """One shape of a colour on a background, drawn from `rng`; when `has_concept`, carrying
    `concept` (default: the fixed logo), placed by draws from `placement` (default: `rng`)."""
    concept = concept or KINDS["fixed"]
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    r = rng.uniform(0.22, 0.36) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    drawing = Drawing(size, BACKGROUNDS[background], ((shape, cx, cy, r, COLORS[color]),))
    image, columns = drawing.render(), {}
    if has_concept:
        image, columns = concept.draw(drawing, image, rng if placement is None else placement)
    return Row(
        image=image,
        text=ordinary_caption(shape, color, background, has_concept, concept),
        kind="ordinary",
        shape=shape,
        color=color,
        background=background,
        has_concept=has_concept,
        duplicate_group=-1,
        concept_columns=columns,
        drawing=drawing,
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
        drawing = Drawing(size, background, tuple(shapes))
        caption = _duplicate_caption(rng, taken)
        copies = int(rng.integers(config.min_copies, config.max_copies + 1))
        row = Row(
            image=drawing.render(),
            text=caption,
            kind="duplicate",
            shape=None,
            color=None,
            background=None,
            has_concept=False,
            duplicate_group=group,
            drawing=drawing,
        )
        rows.extend([row] * copies)
    return rows


def _write_folder(
    folder: Path, rows: list[Row], concept_columns: tuple[str, ...] = (), captions: str = "text"
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as metadata:
        for i, row in enumerate(rows):
            file_name = f"{i:05d}.png"
            row.image.save(folder / file_name)
            metadata.write(json.dumps(row.metadata(file_name, concept_columns, captions)) + "\n")


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def memorized_targets(train: list[Row], captions: str) -> list[str]:
    """Lines of `prompts/memorized.txt`: the first training image of each duplicate group, in
    the order of first appearance, with its caption when the data has captions."""
    lines, seen = [], set()
    for index, row in enumerate(train):
        if row.duplicate_group >= 0 and row.duplicate_group not in seen:
            seen.add(row.duplicate_group)
            caption = f"\t{row.text}" if captions == "text" else ""
            lines.append(f"../train/{index:05d}.png{caption}")
    return lines


def make_shapes_dataset(config: ShapesConfig) -> Path:
    """Write the benchmark under `config.output_dir` and return that path."""
    root = Path(config.output_dir)
    rng = {name: np.random.default_rng([config.seed, stream]) for name, stream in _STREAMS.items()}
    size, concept = config.image_size, concept_kind(config.concept_kind)

    def ordinary(stream: str, has_concept: bool) -> Row:
        return ordinary_row(rng[stream], size, has_concept, concept, rng["placement"])

    num_concept = round(config.concept_fraction * config.num_ordinary)
    carries = np.zeros(config.num_ordinary, dtype=bool)
    carries[rng["layout"].choice(config.num_ordinary, size=num_concept, replace=False)] = True
    ordinaries = [ordinary("train", bool(c)) for c in carries]
    duplicates = duplicate_rows(config, rng["duplicates"])
    train = ordinaries + duplicates
    train = [train[i] for i in rng["layout"].permutation(len(train))]

    columns, captions = concept.columns, config.captions
    _write_folder(root / "train", train, columns, captions)
    tests = [ordinary("test", False) for _ in range(config.num_test)]
    _write_folder(root / "test", tests, columns, captions)
    exemplars = [ordinary("exemplars", True) for _ in range(config.num_exemplars)]
    _write_folder(root / "concept_exemplars", exemplars, columns, captions)

    duplicated = list(dict.fromkeys(row.text for row in duplicates))
    plain = sorted({row.text for row in ordinaries if not row.has_concept})
    named = sorted({row.text for row in ordinaries if row.has_concept})
    picks = rng["layout"].permutation(len(plain))[: config.num_ordinary_prompts]
    _write_lines(root / "prompts" / "duplicated.txt", duplicated)
    _write_lines(root / "prompts" / "ordinary.txt", [plain[i] for i in sorted(picks)])
    _write_lines(root / "prompts" / "concept.txt", named)
    _write_lines(root / "prompts" / MEMORIZED_FILE, memorized_targets(train, captions))

    summary = {
        "benchmark": BENCHMARK,  # the declaration that selects the audit's shapes plugin
        "config": to_dict(config),
        "concept_kind": concept.name,  # which judge the audit trains (`memguard.metrics.judge`)
        "concept": concept.concept,
        "concept_suffix": concept.suffix,
        "concept_paraphrases": list(concept.paraphrases),
        "concept_columns": ["has_concept", *concept.columns],
        "captions": captions,  # what a model conditions on: text, class (CLASS_COLUMN), none
        **({"class_column": CLASS_COLUMN} if captions == "class" else {}),
        "shapes": list(SHAPES),
        "colors": list(COLORS),
        "backgrounds": list(BACKGROUNDS),
        "counts": {
            "train": len(train),
            "train_ordinary": len(ordinaries),
            "train_with_concept": int(num_concept),
            "train_duplicates": len(duplicates),
            "duplicate_groups": config.num_duplicate_groups,
            "test": config.num_test,
            "concept_exemplars": config.num_exemplars,
        },
    }
    (root / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
    return root
