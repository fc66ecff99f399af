"""Run configuration: frozen dataclasses that load from YAML and from CLI flags alike.

Each field carries its help text and, where the value is one of a few, its choices; the CLI builds
its flags from these fields, so a YAML file and the command line accept exactly the same keys
(the flag names of diffusers' training scripts). An unknown key or a value of the wrong type is a
`ConfigError` that names the key, and where it came from.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")

# The kinds of sensitive concept the shapes benchmark can plant (`memguard.data.shapes.KINDS`).
CONCEPT_KINDS = ("fixed", "moving", "texture")


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names it."""


def option(
    default: Any, help: str, choices: tuple[str, ...] | None = None, flag: str | None = None
) -> Any:
    """A dataclass field with CLI help text, optional choices, and the flag (YAML key) that sets
    it when that is not the field's name (a defense's settings share the train command's)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


# ----------------------------------------------------------------------------------- coercion


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert `value` (from YAML or a CLI string) to `annotation`, or raise naming `key`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        is_null = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_null and type(None) in options:
            return None
        errors = []
        for option_type in options:
            if option_type is type(None):
                continue
            try:
                return _coerce(value, option_type, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{key}: {value!r} is not allowed")
    if origin is tuple:
        items = value if isinstance(value, list | tuple) else [value]
        (item_type, _) = typing.get_args(annotation)
        return tuple(_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(items))
    if origin is dict:
        if value is None:
            return {}
        if isinstance(value, Mapping):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping of keys to values, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str | Path):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")


def build(cls: type[C], values: Mapping[str, Any], source: str = "config") -> C:
    """Instantiate the config dataclass `cls` from `values`, validating every key and value."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown key '{key}' (known keys: {known})")
        coerced = _coerce(value, hints[key], f"{source}: {key}")
        choices = fields[key].metadata.get("choices")
        if choices and coerced is not None and coerced not in choices:
            raise ConfigError(f"{source}: {key}: {coerced!r} is not one of {', '.join(choices)}")
        kwargs[key] = coerced
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config keys; a missing file or non-mapping is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values")
    return data


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }


def with_defaults(cls: type, recorded: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A config recorded as a dict (`to_dict`'s JSON) with every key it lacks at its default: a
    setting added after it was written took its default then (so a run recorded before
    `conditioning` existed is the text-conditional run it was)."""
    if recorded is None:
        return None
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
    return {**plain, **recorded}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# ------------------------------------------------------------------------------------ configs

TRIGGER_INITS = ("prompt", "gaussian", "unrelated")  # where DoRI's conditioning starts
AUDIT_ATTACKS = ("trigger",)  # what `memguard audit --attacks` runs after the audit
QUALITY_FEATURES = ("auto", "inception", "plugin", "trained", "none")  # FID/KID features

IET_ONLY = ("num_proxies", "rounds", "shard_by", "redistribute")  # settings of --strategy iet

MODEL_PRESETS = ("tiny", "compact", "bench", "small")  # memguard.models.PRESETS, by name
# Settings of a from-scratch model that a pretrained pipeline brings itself (None: the default).
FROM_SCRATCH_ONLY = ("model_preset", "num_train_timesteps", "beta_schedule", "prediction_type")
SCRATCH_DEFAULTS = {
    "model_preset": "bench",
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything `memguard train` needs; keys and defaults follow diffusers' training scripts."""

    train_data_dir: str | None = option(None, "image folder with metadata.jsonl")
    output_dir: str = option("memguard-model", "where the model, checkpoints and logs go")
    image_column: str = option("file_name", "metadata column holding the image path")
    caption_column: str = option("text", "metadata column holding the caption")
    conditioning: str = option(
        "text",
        "what the model is conditioned on: captions (text, a UNet2DConditionModel), a class "
        "label from --class_column (class, a UNet2DModel with class embeddings) or nothing "
        "(none, an unconditional UNet2DModel: IET-AGC's DDPM setting; no caption column needed)",
        choices=("text", "class", "none"),
    )
    class_column: str | None = option(
        None, "class: metadata column whose values are the class labels (required with class)"
    )
    pretrained_model_name_or_path: str | None = option(
        None,
        "fine-tune a model folder: a local Stable Diffusion pipeline (its UNet trains in VAE "
        "latent space) or a UNet folder that memguard train or mitigate wrote (it brings its "
        "text encoder and noise schedule)",
    )
    model_preset: str | None = option(
        None,
        "UNet preset when training from scratch (default: bench)",
        choices=MODEL_PRESETS,
    )
    text_encoder: str = option(
        "minilm",
        "text encoder: 'minilm' (all-MiniLM-L6-v2 package) or 'clip' (from the pipeline folder)",
        choices=("minilm", "clip"),
    )
    max_text_length: int = option(16, "tokens per caption for the MiniLM encoder")
    resolution: int = option(16, "images are resized and center-cropped to this size")
    random_flip: bool = option(False, "flip images horizontally at random")
    train_batch_size: int = option(64, "batch size per process (with --strategy iet: per proxy)")
    max_train_steps: int = option(
        3000, "optimizer steps to train for (with --strategy iet: of all proxies together)"
    )
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    learning_rate: float = option(1e-3, "AdamW learning rate")
    lr_scheduler: str = option(
        "constant_with_warmup",
        "learning-rate schedule (diffusers get_scheduler names)",
        choices=("constant", "constant_with_warmup", "linear", "cosine"),
    )
    lr_warmup_steps: int = option(100, "learning-rate warm-up steps")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_weight_decay: float = option(1e-2, "AdamW decoupled weight decay")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 disables)")
    caption_dropout: float = option(
        0.1,
        "probability of training on the empty caption, or with class conditioning the null "
        "class (for classifier-free guidance); unused without conditioning",
    )
    use_ema: bool = option(False, "keep an exponential moving average of the weights")
    ema_decay: float = option(0.999, "EMA decay")
    lora_rank: int = option(0, "train LoRA adapters of this rank instead of the full UNet")
    num_train_timesteps: int | None = option(
        None, "diffusion steps of a from-scratch model's noise schedule (default: 1000)"
    )
    beta_schedule: str | None = option(
        None,
        "noise schedule of a from-scratch model (default: squaredcos_cap_v2)",
        choices=("linear", "scaled_linear", "squaredcos_cap_v2"),
    )
    prediction_type: str | None = option(
        None,
        "what a from-scratch model predicts: the noise (epsilon, the default) or "
        "v = sqrt(abar) eps - sqrt(1 - abar) x0 (v_prediction, Salimans & Ho 2022)",
        choices=("epsilon", "v_prediction"),
    )
    snr_gamma: float = option(
        0.0, "min-SNR-gamma loss weighting (Hang et al. 2023); 5 is the paper's value (0: off)"
    )
    snr_floor: float = option(
        0.0,
        "lower bound of the min-SNR weight on the clean image, clip(SNR, floor, gamma): 1 "
        "truncates it as Salimans & Ho 2022 do, so high-noise steps keep weight (0: off)",
    )
    defense: tuple[str, ...] = option(
        (), "defense to attach (repeatable; see memguard.defenses.registry for the names)"
    )
    augment: str = option(
        "none",
        "taa: threshold-aware augmentation (IET-AGC+): the samples AGC keeps near its threshold "
        "are trained on again through RandAugment; needs --defense agc",
        choices=("none", "taa"),
    )
    strategy: str = option(
        "plain",
        "plain: one model, data parallel over the processes; iet: iterative ensemble training "
        "(Liu et al., ECCV 2024): proxies train apart on disjoint shards and are averaged "
        "every round; adversarial: plain training of a trained model with DoRI's adversarial "
        "fine-tuning attached (Kowalczuk et al., arXiv 2507.16880; --memorized FILE, the "
        "adv_* flags; the same as --defense adversarial, which also composes with iet)",
        choices=("plain", "iet", "adversarial"),
    )
    num_proxies: int | None = option(None, "iet: proxy models, one per shard (required)")
    rounds: int | None = option(
        None, "iet: training rounds, each ended by averaging the proxies (required)"
    )
    shard_by: str | None = option(
        None,
        "iet: metadata column whose values are spread evenly over the shards (e.g. "
        "duplicate_group; default: a seeded random split)",
    )
    redistribute: float | None = option(
        None,
        "iet: memory-sample redistribution (IET-AGC+): after rounds 1, 3, ... (never the last) "
        "each proxy hands the fraction P of its shard that AGC skipped most to the next proxy, "
        "instead of averaging; 0.2 is the paper's (default: off); needs --defense agc",
    )
    mixed_precision: str = option(
        "no", "accelerate mixed precision", choices=("no", "fp16", "bf16")
    )
    seed: int = option(0, "seed for initialisation, data order, noise and dropout")
    checkpointing_steps: int = option(500, "save a resumable checkpoint every N steps")
    checkpoints_total_limit: int = option(2, "keep at most this many checkpoints")
    resume_from_checkpoint: str | None = option(
        None, "'latest' or a checkpoint folder to resume from"
    )
    logging_steps: int = option(25, "write a log line every N steps")
    dataloader_num_workers: int = option(0, "data-loading worker processes")

    def _check_strategy(self) -> None:
        given = [key for key in IET_ONLY if getattr(self, key) is not None]
        if self.strategy != "iet":
            _require(
                not given,
                f"{', '.join(given)}: settings of --strategy iet, not of --strategy "
                f"{self.strategy}",
            )
            return
        for key in ("num_proxies", "rounds"):
            _require(getattr(self, key) is not None, f"{key}: required with --strategy iet")
        _require(self.num_proxies >= 2, "num_proxies: an ensemble needs at least 2 proxies")
        _require(self.rounds >= 1, "rounds: must be >= 1")
        per_round = self.num_proxies * self.rounds
        if self.max_train_steps % per_round:
            below = self.max_train_steps // per_round * per_round
            nearest = " or ".join(str(n) for n in (below, below + per_round) if n > 0)
            raise ConfigError(
                "max_train_steps: with --strategy iet it counts the optimizer steps of all "
                "proxies together (so the samples trained on are plain training's "
                "max_train_steps x train_batch_size x gradient_accumulation_steps), and each "
                "proxy trains max_train_steps / (num_proxies x rounds) steps a round: "
                f"{self.max_train_steps} is not a multiple of {self.num_proxies} x "
                f"{self.rounds} = {per_round} (nearest: {nearest})"
            )
        if self.redistribute is not None:
            _require(0.0 <= self.redistribute < 1.0, "redistribute: the fraction must be in [0, 1)")
            _require(
                "agc" in self.defense,
                "redistribute: moves the samples AGC skipped most; add --defense agc",
            )
            _require(
                self.redistribute == 0.0 or self.rounds >= 2,
                "redistribute: happens after rounds 1, 3, ... but never after the last, which "
                "averages; needs --rounds >= 2",
            )

    def _check_conditioning(self) -> None:
        if self.conditioning == "class":
            _require(
                self.class_column is not None, "class_column: required with --conditioning class"
            )
        else:
            _require(
                self.class_column is None,
                f"class_column: a setting of --conditioning class, not of --conditioning "
                f"{self.conditioning}",
            )
        if self.conditioning != "text":
            _require(
                self.pretrained_model_name_or_path is None,
                f"pretrained_model_name_or_path: --conditioning {self.conditioning} trains a "
                "UNet2DModel from a preset; fine-tuning is for text-conditional models",
            )

    @property
    def steps_per_round(self) -> int:
        """iet: the optimizer steps each proxy trains in a round."""
        return self.max_train_steps // (self.num_proxies * self.rounds)

    @property
    def captions_read(self) -> str | None:
        """The caption column the run reads from the metadata: none without text."""
        return self.caption_column if self.conditioning == "text" else None

    def scratch(self, key: str):
        """A from-scratch setting, its default when not given."""
        value = getattr(self, key)
        return SCRATCH_DEFAULTS[key] if value is None else value

    def __post_init__(self) -> None:
        _require(self.train_data_dir is not None, "train_data_dir: required")
        for key in ("resolution", "train_batch_size", "max_train_steps", "max_text_length"):
            _require(getattr(self, key) > 0, f"{key}: must be positive")
        _require(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps: must be >= 1")
        _require(self.learning_rate > 0, "learning_rate: must be positive")
        _require(0.0 <= self.caption_dropout < 1.0, "caption_dropout: must be in [0, 1)")
        _require(0.0 < self.ema_decay < 1.0, "ema_decay: must be in (0, 1)")
        _require(self.lora_rank >= 0, "lora_rank: must be >= 0")
        _require(self.checkpointing_steps > 0, "checkpointing_steps: must be positive")
        _require(self.snr_gamma >= 0, "snr_gamma: must be >= 0")
        _require(
            self.snr_floor == 0 or 0 < self.snr_floor <= self.snr_gamma,
            "snr_floor: must be between 0 and snr_gamma (and needs snr_gamma > 0)",
        )
        _require(
            len(set(self.defense)) == len(self.defense),
            f"defense: {list(self.defense)} names a defense twice",
        )
        _require(self.logging_steps > 0, "logging_steps: must be positive")
        self._check_strategy()
        self._check_conditioning()
        if self.pretrained_model_name_or_path is not None:
            for key in FROM_SCRATCH_ONLY:
                _require(
                    getattr(self, key) is None,
                    f"{key}: a setting of a model trained from scratch; the pipeline in "
                    "--pretrained_model_name_or_path brings its own",
                )
        _require(
            self.lora_rank == 0 or self.pretrained_model_name_or_path is not None,
            "lora_rank: LoRA needs --pretrained_model_name_or_path",
        )
        _require(
            self.text_encoder != "clip" or self.pretrained_model_name_or_path is not None,
            "text_encoder: 'clip' is read from --pretrained_model_name_or_path",
        )


@dataclass(frozen=True)
class ShapesConfig:
    """The procedural benchmark: shapes, attributes, one sensitive concept, planted duplicates."""

    output_dir: str = option("shapes", "where the image folders are written")
    seed: int = option(0, "everything is a function of this seed")
    image_size: int = option(16, "side of the square images, in pixels")
    num_ordinary: int = option(640, "ordinary training images (one shape each)")
    concept_fraction: float = option(0.2, "fraction of ordinary images carrying the concept")
    num_duplicate_groups: int = option(10, "planted duplicates: distinct images")
    min_copies: int = option(20, "copies of each planted duplicate, at least")
    max_copies: int = option(40, "copies of each planted duplicate, at most")
    num_test: int = option(256, "held-out ordinary images (quality metrics)")
    num_exemplars: int = option(64, "held-out images showing the concept (attacker, feature mode)")
    num_ordinary_prompts: int = option(20, "ordinary captions written to prompts/ordinary.txt")
    concept_kind: str = option(
        "fixed",
        "the concept: the acme logo in a fixed corner (fixed), at a random position, scale and "
        "rotation (moving), or the shape filled in acme hatching (texture)",
        choices=CONCEPT_KINDS,
    )
    captions: str = option(
        "text",
        "what the folders give a model to condition on: captions (text), a 'class' column "
        "(class: the shape's index, each planted duplicate a class of its own, as it has a "
        "caption of its own; train with --conditioning class --class_column class) or nothing "
        "(none: no caption column, for --conditioning none); the images are the same",
        choices=("text", "class", "none"),
    )

    def __post_init__(self) -> None:
        _require(
            self.concept_kind in CONCEPT_KINDS,
            f"concept_kind: {self.concept_kind!r} is not one of {', '.join(CONCEPT_KINDS)}",
        )
        _require(self.image_size >= 8, "image_size: must be >= 8")
        _require(0.0 <= self.concept_fraction <= 1.0, "concept_fraction: must be in [0, 1]")
        _require(1 <= self.min_copies <= self.max_copies, "min_copies/max_copies: need 1<=min<=max")
        for key in ("num_ordinary", "num_test", "num_exemplars"):
            _require(getattr(self, key) >= 0, f"{key}: must be >= 0")


@dataclass(frozen=True)
class SampleConfig:
    """`memguard sample`: prompts in, PNGs and a grid out, deterministic from the seed."""

    model: str | None = option(None, "model folder written by `memguard train` or diffusers")
    output_dir: str = option("samples", "where the PNGs, samples.jsonl and grid.png go")
    prompt: tuple[str, ...] = option((), "a prompt (repeat the flag for several)")
    prompt_file: tuple[str, ...] = option((), "a file with one prompt per line (repeatable)")
    class_label: tuple[str, ...] = option(
        (),
        "class-conditional model: a class, its value in the class column (repeatable; default: "
        "every class); an unconditional model takes neither prompts nor classes",
    )
    num_images: int = option(4, "images per prompt (per class; of an unconditional model)")
    seed: int = option(0, "image j of every prompt starts from the noise of seed + j")
    scheduler: str = option(
        "dpm", "sampler: DPM-Solver++ (dpm) or DDIM (ddim)", choices=("dpm", "ddim")
    )
    num_inference_steps: int = option(
        20, "denoising steps (DPM-Solver++ needs about 20, Lu et al. 2022)"
    )
    guidance_scale: float = option(3.0, "classifier-free guidance scale (1 disables)")
    batch_size: int = option(64, "images denoised at once")
    device: str | None = option(
        None, "torch device to sample on ('cuda', 'cuda:1', 'cpu'; default: cuda when present)"
    )

    def __post_init__(self) -> None:
        _require(self.model is not None, "model: required")
        _require(self.num_images > 0, "num_images: must be positive")
        _require(self.num_inference_steps > 0, "num_inference_steps: must be positive")
        _require(self.batch_size > 0, "batch_size: must be positive")


@dataclass(frozen=True)
class AuditConfig:
    """`memguard audit`: what a model reproduces, beside its quality, against its training set."""

    model: str | None = option(None, "model folder (memguard's, or any diffusers UNet/pipeline)")
    train_data_dir: str | None = option(None, "the image folder the model was trained on")
    output_dir: str = option("audit", "where results.json, the samples and the report go")
    prompts: str | None = option(
        None, "file of prompts, one per line (default: duplicated + sampled ordinary captions)"
    )
    samples_dir: str | None = option(None, "measure these existing generations instead of sampling")
    num_images: int | None = option(
        None,
        "generations per prompt in every part of the audit (default: enough for "
        "min_generations_per_rate)",
    )
    min_generations_per_rate: int = option(
        100,
        "generations behind every reported rate: each prompt of a set of P prompts is sampled "
        "ceil(this / P) times (>= 97 puts the 95% Wilson interval within 10 points of the rate)",
    )
    num_ordinary_prompts: int = option(20, "ordinary training captions sampled by default")
    seed: int = option(0, "seed of prompt sampling and generation")
    scheduler: str = option("dpm", "sampler", choices=("dpm", "ddim"))
    num_inference_steps: int = option(
        20, "denoising steps (DPM-Solver++ needs about 20, Lu et al. 2022)"
    )
    guidance_scale: float = option(3.0, "classifier-free guidance scale")
    replication_threshold: float = option(1 / 3, "Gu et al.: replica when d1/d2 is below this")
    nn_backend: str = option(
        "torch",
        "exact nearest-neighbour search: chunked torch (on --device), or faiss (on the CPU; its "
        "flat index holds the whole training set)",
        choices=("torch", "faiss"),
    )
    chunk_size: int = option(
        256,
        "training images (and generations) read, decoded and compared at once: the training set "
        "is streamed through duplicate merging, the search and the descriptors; the search's "
        "peak memory is about 32 bytes x chunk_size x 3 x side^2 (6 GiB at 256 images of 512 px)",
    )
    detection_seeds: int = option(16, "Wen et al. detection: starts averaged per prompt")
    detection_steps: int = option(5, "Wen et al. detection: first k sampling steps (0: all)")
    sscd: str | None = option(None, "SSCD TorchScript file for feature similarity on real data")
    sscd_size: int = option(288, "side the images are resized to for SSCD")
    inception: str | None = option(
        None, "Inception-v3 TorchScript feature file: FID/KID against --test_data_dir (real data)"
    )
    inception_size: int = option(299, "side the images are resized to for --inception")
    test_data_dir: str | None = option(
        None,
        "held-out real images for FID/KID (default: the benchmark's test/ split; for the trained "
        "extractor, a seeded quality_holdout_fraction of the training folder)",
    )
    quality_features: str = option(
        "auto",
        "features of the audit's FID/KID: 'inception' (--inception), 'plugin' (the benchmark's "
        "judge), 'trained' (a SimCLR network trained on the training folder, cached by its data "
        "hash, with its own held-out check), 'none'; 'auto': inception when given, else the "
        "plugin's when one runs, else trained",
        choices=QUALITY_FEATURES,
    )
    quality_steps: int = option(300, "trained feature extractor: SimCLR training steps")
    quality_holdout_fraction: float = option(
        0.2,
        "trained feature extractor without --test_data_dir: the share of the training folder "
        "(a seeded random split) held out from its training, its check's and FID's reference",
    )
    inversion_steps: int = option(
        300, "concept extraction: textual-inversion steps of the learned-embedding attack (0: off)"
    )
    benchmark: str | None = option(
        None,
        "audit plugin beside the generic measures: 'shapes' (the benchmark's judge, attributes "
        "and concept extraction) or 'off' (default: the plugin the dataset declares, as "
        "'benchmark' in the dataset.json above the training folder)",
    )
    attacks: tuple[str, ...] = option(
        (),
        "attacks on the memorized images after the audit, their replication beside the "
        "prompts' (repeatable): 'trigger', DoRI's embedding trigger (Kowalczuk et al., arXiv "
        "2507.16880)",
    )
    attack_targets: str | None = option(
        None,
        "the attacks' targets: an image folder with metadata.jsonl, a file listing image paths "
        "(each optionally followed by a tab and its caption) or one image (default: the "
        "benchmark plugin's planted duplicates, else the training images the audit found "
        "replicated)",
    )
    attack_max_targets: int = option(
        10,
        "attack at most this many targets: the first planted duplicates, the most replicated "
        "training images, or the first listed (10: every planted duplicate of the shapes "
        "benchmark, 10 to 20 s each for its model on one CPU thread)",
    )
    trigger_init: str = option(
        "prompt",
        "trigger attack: where the conditioning starts (as `memguard attack trigger --init`)",
        choices=TRIGGER_INITS,
    )
    trigger_steps: int = option(50, "trigger attack: Adam steps on the conditioning")
    batch_size: int = option(64, "images denoised at once")
    device: str | None = option(
        None,
        "torch device for the model's measures ('cuda', 'cuda:1', 'cpu'; default: cuda "
        "when present, else cpu)",
    )

    def __post_init__(self) -> None:
        _require(self.model is not None, "model: required")
        _require(self.train_data_dir is not None, "train_data_dir: required")
        _require(self.num_images is None or self.num_images > 0, "num_images: must be positive")
        _require(self.min_generations_per_rate > 0, "min_generations_per_rate: must be positive")
        _require(0 < self.replication_threshold < 1, "replication_threshold: must be in (0, 1)")
        _require(self.detection_seeds > 0, "detection_seeds: must be positive")
        _require(self.detection_steps >= 0, "detection_steps: must be >= 0")
        _require(self.inversion_steps >= 0, "inversion_steps: must be >= 0")
        _require(self.chunk_size > 0, "chunk_size: must be positive")
        _require(
            self.quality_features != "inception" or self.inception is not None,
            "quality_features: 'inception' needs --inception FILE",
        )
        _require(self.quality_steps > 0, "quality_steps: must be positive")
        _require(
            0 < self.quality_holdout_fraction < 1, "quality_holdout_fraction: must be in (0, 1)"
        )
        for attack in self.attacks:
            _require(
                attack in AUDIT_ATTACKS,
                f"attacks: unknown attack {attack!r} (known: {', '.join(AUDIT_ATTACKS)})",
            )
        _require(
            len(set(self.attacks)) == len(self.attacks),
            f"attacks: {list(self.attacks)} names an attack twice",
        )
        _require(
            self.attack_targets is None or bool(self.attacks),
            "attack_targets: the targets of --attacks; name an attack (--attacks trigger)",
        )
        _require(self.attack_max_targets > 0, "attack_max_targets: must be positive")
        _require(self.trigger_steps > 0, "trigger_steps: must be positive")


@dataclass(frozen=True)
class TriggerConfig:
    """`memguard attack trigger`: DoRI's embedding triggers (Kowalczuk et al., arXiv 2507.16880)
    for target images, and whether generating from them recovers the targets."""

    model: str | None = option(None, "model folder (memguard's, or a diffusers UNet/pipeline)")
    images: str | None = option(
        None,
        "the targets: an image folder with metadata.jsonl (its captions are the original "
        "prompts), a file listing image paths (each optionally followed by a tab and its "
        "caption), or one image file",
    )
    output_dir: str = option(
        "trigger-attack", "where triggers.safetensors, generations/ and triggers.json go"
    )
    train_data_dir: str | None = option(
        None,
        "the training folder: a generation recovers its target when Gu et al.'s criterion holds "
        "against it (the targets joining it) and the target is the nearest image (default: "
        "each target judged alone, by --distance_threshold)",
    )
    init: str = option(
        "prompt",
        "where the conditioning starts: the original prompt's text states, Gaussian noise with "
        "their mean and spread, or an unrelated prompt's states",
        choices=TRIGGER_INITS,
    )
    unrelated_prompt: str = option(
        "a bowl of fruit on a kitchen table", "the prompt whose states --init unrelated starts from"
    )
    steps: int = option(50, "Adam steps on the conditioning")
    learning_rate: float = option(0.1, "Adam learning rate")
    batch_size: int = option(
        8, "copies of the target per step, each with its own timestep and noise"
    )
    check_every: int = option(
        10,
        "generate from the conditioning and judge it every N steps (and at the start and the "
        "end): the steps a target needs to be recovered",
    )
    seed: int = option(0, "target i's draws come from seed + i; generations start from seed")
    replication_threshold: float = option(1 / 3, "Gu et al.: a replica when d1/d2 is below this")
    distance_threshold: float = option(
        0.1,
        "without --train_data_dir: recovered when the RMS distance to the target (pixel values "
        "in [0, 1]) is below this",
    )
    scheduler: str = option("dpm", "sampler", choices=("dpm", "ddim"))
    num_inference_steps: int = option(20, "denoising steps of each generation")
    guidance_scale: float = option(3.0, "classifier-free guidance scale (1 disables)")
    device: str | None = option(None, "torch device (default: cuda when present, else cpu)")
    locality: bool = option(
        False,
        "also measure how local memorization is (DoRI's locality analysis): per target, "
        "--locality_starts triggers from Gaussian starts of different seeds; their distances "
        "in the conditioning and in the cross-attention activations against those between "
        "the targets' prompts, and the IoU of NeMo's and of Wanda's selections between them "
        "(needs at least 2 targets, all with captions)",
    )
    locality_starts: int = option(4, "--locality: triggers per target (at least 2)")
    locality_z_threshold: float = option(
        3.0, "--locality: NeMo's candidates are the value neurons whose z-score exceeds this"
    )
    locality_sparsity: float = option(
        0.01, "--locality: Wanda's selection is this fraction of each layer's weights"
    )

    def __post_init__(self) -> None:
        _require(self.model is not None, "model: required")
        _require(self.images is not None, "images: required")
        _require(self.locality_starts >= 2, "locality_starts: needs at least 2 starts")
        _require(0 < self.locality_sparsity < 1, "locality_sparsity: must be in (0, 1)")
        for key in ("steps", "batch_size", "check_every", "num_inference_steps"):
            _require(getattr(self, key) > 0, f"{key}: must be positive")
        _require(self.learning_rate > 0, "learning_rate: must be positive")
        _require(0 < self.replication_threshold < 1, "replication_threshold: must be in (0, 1)")
        _require(self.distance_threshold > 0, "distance_threshold: must be positive")


@dataclass(frozen=True)
class MitigateConfig:
    """`memguard mitigate`: prune what makes memorized prompts replicate (NeMo, Hintersdorf et
    al. 2024; Wanda, Sun et al. 2024) and write the pruned model folder."""

    model: str | None = option(None, "model folder (memguard's, or a diffusers UNet/pipeline)")
    prompts: str | None = option(None, "file of memorized prompts, one per line")
    output_dir: str = option("mitigated", "the pruned model folder (with pruning.json)")
    method: str | None = option(
        None,
        "nemo: the outlier value neurons of each prompt, deactivated in growing groups until "
        "its generations stop replicating; wanda: the weights of largest |W| x ||X|| on it",
        choices=("nemo", "wanda"),
    )
    layers: tuple[str, ...] = option(
        ("attn2.to_v",),
        "linear layers to prune: name suffixes with shell wildcards, e.g. 'attn2.to_[kv]' "
        "(repeatable); nemo: layers fed by the text states (attn2.to_k / attn2.to_v)",
    )
    sparsity: float = option(0.01, "wanda: fraction of each chosen layer's weights pruned")
    reference_prompts: str | None = option(
        None,
        "nemo: file of ordinary prompts, one per line, that neuron activations are compared "
        "against (default: generic prompts written in memguard.mitigations.nemo)",
    )
    z_threshold: float = option(
        3.0, "nemo: a neuron is a candidate when its activation's z-score exceeds this"
    )
    train_data_dir: str | None = option(
        None, "nemo: the training folder; a generation replicates by Gu et al.'s criterion"
    )
    num_images: int = option(
        4,
        "generations per prompt: nemo's at each check; wanda's to collect the inputs of layers "
        "that do not read the text states",
    )
    seed: int = option(0, "generation j starts from the noise of seed + j")
    replication_threshold: float = option(1 / 3, "Gu et al.: a replica when d1/d2 is below this")
    scheduler: str = option("dpm", "sampler", choices=("dpm", "ddim"))
    num_inference_steps: int = option(20, "denoising steps of each generation")
    guidance_scale: float = option(3.0, "classifier-free guidance scale (1 disables)")
    device: str | None = option(None, "torch device (default: cuda when present, else cpu)")

    def __post_init__(self) -> None:
        _require(self.model is not None, "model: required")
        _require(self.prompts is not None, "prompts: required")
        _require(self.method is not None, "method: required (nemo or wanda)")
        _require(bool(self.layers), "layers: give at least one pattern")
        _require(0 < self.sparsity < 1, "sparsity: must be in (0, 1)")
        _require(self.num_images > 0, "num_images: must be positive")
        _require(self.num_inference_steps > 0, "num_inference_steps: must be positive")
        _require(0 < self.replication_threshold < 1, "replication_threshold: must be in (0, 1)")
        _require(
            self.method != "nemo" or self.train_data_dir is not None,
            "train_data_dir: nemo needs the training folder to tell when a prompt replicates",
        )
