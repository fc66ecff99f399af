"""Adversarial fine-tuning against embedding triggers (Kowalczuk et al., arXiv 2507.16880): at
weight 0 it is plain fine-tuning bit for bit, with weight the triggers found against the model
lead towards the surrogates, a killed run resumes to the same weights (without regenerating
the surrogates), it composes with IET and AGC, and bad input is an error naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import kill_after_first_checkpoint, tiny_run, tiny_settings, train_tiny
from memguard import Trainer, cli
from memguard.attacks.trigger import denoising_losses, draw, optimize_conditioning
from memguard.config import ConfigError
from memguard.data.folder import DataError, ImageFolderDataset
from memguard.defenses import adversarial as adversarial_module
from memguard.defenses.adversarial import SURROGATES_DIR, AdversarialFineTuning, read_memorized
from memguard.defenses.registry import build_training
from memguard.diffusion import per_sample_loss
from memguard.io import load_model
from memguard.models import build_unet, noise_scheduler
from test_trainer import WEIGHTS, assert_same_weights

MEMORIZED = [0, 1]  # training images listed as memorized


@pytest.fixture(scope="module")
def start(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder that `memguard train` wrote: what adversarial fine-tuning starts from."""
    folder = tmp_path_factory.mktemp("start")
    train_tiny(shapes_dir / "train", folder, max_train_steps=4)
    return folder


@pytest.fixture(scope="module")
def listing(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two training images with their prompts, in the trigger attack's list format."""
    root = tmp_path_factory.mktemp("memorized")
    train = ImageFolderDataset(shapes_dir / "train", 8)
    lines = []
    for i in MEMORIZED:
        shutil.copy(train.records[i].path, root / f"memorized{i}.png")
        lines.append(f"memorized{i}.png\t{train.captions[i]}")
    (root / "memorized.txt").write_text("\n".join(lines) + "\n")
    return root / "memorized.txt"


def adversarial(start: Path, listing: Path, **overrides) -> dict:
    """Fine-tuning settings from `start` against `listing`, cut down for the CPU."""
    return {
        "strategy": "adversarial",
        "pretrained_model_name_or_path": str(start),
        "memorized": str(listing),
        "adv_inner_steps": 4,
        "adv_batch_size": 4,
        "adv_surrogate_steps": 3,
        "max_train_steps": 12,
        "lr_warmup_steps": 0,
        **overrides,
    }


@pytest.fixture(scope="module")
def runs(shapes_dir: Path, start: Path, listing: Path, tmp_path_factory) -> dict[str, Path]:
    """Plain fine-tuning, and adversarial fine-tuning at weight 0 and at weight 1."""
    root, data = tmp_path_factory.mktemp("runs"), shapes_dir / "train"
    plain = adversarial(start, listing)
    for key in ("strategy", "memorized", "adv_inner_steps", "adv_batch_size"):
        del plain[key]
    del plain["adv_surrogate_steps"]
    train_tiny(data, root / "plain", **plain)
    train_tiny(data, root / "zero", **adversarial(start, listing, adv_weight=0.0))
    train_tiny(data, root / "one", **adversarial(start, listing, adv_weight=1.0, adv_images=2))
    return {name: root / name for name in ("plain", "zero", "one")}


def test_at_weight_zero_it_is_plain_fine_tuning(runs: dict[str, Path]) -> None:
    """Bit for bit: the attack runs, but L_adv enters as 0 x L_adv, whose gradient is exact
    zeros, and its draws come from a stream of their own."""
    assert_same_weights(runs["plain"], runs["zero"])
    metadata = json.loads((runs["zero"] / "memguard.json").read_text())
    assert metadata["config"]["strategy"] == "adversarial"
    (record,) = metadata["defenses"]
    assert record["name"] == "adversarial" and record["settings"]["adv_weight"] == 0.0
    assert record["report"]["attacks"] == 12  # one image per step
    assert record["report"]["memorized"] == ["memorized0.png", "memorized1.png"]
    logs = [
        [json.loads(line) for line in (runs[name] / "train_log.jsonl").open()]
        for name in ("plain", "zero")
    ]
    assert [line["loss"] for line in logs[0]] == [line["loss"] for line in logs[1]]
    assert all(line["adversarial/trigger_loss"] > 0 for line in logs[1])
    assert not (runs["plain"] / WEIGHTS).samefile(runs["zero"] / WEIGHTS)
    with pytest.raises(AssertionError):
        assert_same_weights(runs["plain"], runs["one"])


def _surrogate_gap(model_dir: Path, surrogates: torch.Tensor, listing: Path) -> float:
    """Mean over the memorized images of: the denoising loss towards the surrogate minus the
    loss towards the memorized image, under triggers that the attack finds against the model
    (20 steps from the prompt's states), on a fixed probe of 64 timesteps and noises."""
    model = load_model(model_dir, "cpu")
    scheduler = noise_scheduler(1000, "squaredcos_cap_v2")
    targets = read_memorized(listing, 8)
    x0 = targets.model_pixels()
    start = model.encoder.encode(list(targets.prompts))
    generator = torch.Generator().manual_seed(0)
    triggers, _ = optimize_conditioning(model.unet, scheduler, x0, start, 20, 0.1, 8, generator)
    probe = draw(x0, 64, 1000, torch.Generator().manual_seed(1))
    with torch.no_grad():
        towards = denoising_losses(model.unet, scheduler, surrogates, triggers, probe)
        memorized = denoising_losses(model.unet, scheduler, x0, triggers, probe)
    return float((towards - memorized).mean())


def test_with_weight_the_triggers_lead_towards_the_surrogates(runs, listing) -> None:
    folder = ImageFolderDataset(runs["one"] / SURROGATES_DIR, 8)
    assert folder.captions == [line.split("\t")[1] for line in listing.read_text().splitlines()]
    surrogates = folder.stacked(list(range(len(folder)))).float() / 127.5 - 1.0
    trained, plain = (_surrogate_gap(runs[name], surrogates, listing) for name in ("one", "plain"))
    # plain fine-tuning's triggers denoise towards the memorized image rather than the
    # surrogate; adversarial fine-tuning's lead towards the surrogate instead
    assert trained < 0.7 * plain, (trained, plain)


def test_the_attack_sends_no_gradient_into_the_model() -> None:
    torch.manual_seed(0)
    unet = build_unet("tiny", 8, 16)
    scheduler = noise_scheduler(1000, "squaredcos_cap_v2")
    x0, start = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 4, 16)
    generator = torch.Generator().manual_seed(0)
    triggers, losses = optimize_conditioning(unet, scheduler, x0, start, 3, 0.1, 2, generator)
    assert all(p.grad is None for p in unet.parameters())
    assert triggers.shape == start.shape and not triggers.requires_grad
    assert not torch.equal(triggers, start) and losses.shape == (2,)
    # per image, the mean of per_sample_loss over its copies
    d = draw(x0, 3, 1000, torch.Generator().manual_seed(1))
    with torch.no_grad():
        each = per_sample_loss(
            unet, scheduler, x0.repeat_interleave(3, 0), start.repeat_interleave(3, 0), *d
        )
        torch.testing.assert_close(
            denoising_losses(unet, scheduler, x0, start, d), each.view(2, 3).mean(1)
        )


@pytest.mark.parametrize("trigger_start", ["prompt", "previous"])
def test_killed_run_resumes_to_the_same_weights(
    shapes_dir, start, listing, tmp_path, monkeypatch, trigger_start
) -> None:
    """With `previous` the checkpoint keeps each image's last trigger, where its next attack
    starts."""
    data = shapes_dir / "train"
    run = adversarial(
        start, listing, max_train_steps=8, checkpointing_steps=3, logging_steps=3,
        adv_inner_steps=2, adv_trigger_start=trigger_start,
    )  # fmt: skip
    train_tiny(data, tmp_path / "full", **run)

    killed = tiny_settings(data, tmp_path / "killed", **run)
    latest = kill_after_first_checkpoint(killed)

    def regenerate(*_) -> None:
        raise AssertionError("the resumed run generated the surrogates again")

    monkeypatch.setattr(AdversarialFineTuning, "_make_surrogates", regenerate)
    config, defenses = tiny_run(data, tmp_path / "killed", **run, resume_from_checkpoint="latest")
    result = Trainer(config, defenses, progress=False).train()
    assert result.steps_run == 8 - latest["step"] > 0
    assert_same_weights(tmp_path / "full", tmp_path / "killed")
    reports = [
        json.loads((tmp_path / name / "memguard.json").read_text())["defenses"][0]["report"]
        for name in ("full", "killed")
    ]
    assert reports[1]["attacks"] == 8
    assert reports[1]["trigger_drift"] == reports[0]["trigger_drift"]
    if trigger_start == "previous":
        assert len(reports[1]["trigger_drift"]) == 2 and min(reports[1]["trigger_drift"]) > 0
    else:
        assert reports[1]["trigger_drift"] is None


def test_previous_start_continues_each_images_last_attack(
    shapes_dir, start, listing, tmp_path, monkeypatch
) -> None:
    """`--adv_trigger_start previous`: the first attack on an image starts from its prompt's
    states, every later one from the trigger the one before it found."""
    real, calls = adversarial_module.optimize_conditioning, []

    def recorded(unet, scheduler, x0, start_states, *args):
        triggers, losses = real(unet, scheduler, x0, start_states, *args)
        calls.append((x0.clone(), start_states.clone(), triggers.clone()))
        return triggers, losses

    monkeypatch.setattr(adversarial_module, "optimize_conditioning", recorded)
    settings = adversarial(start, listing, max_train_steps=4, adv_images=1,
                           adv_trigger_start="previous")  # fmt: skip
    train_tiny(shapes_dir / "train", tmp_path / "run", **settings)
    targets = read_memorized(listing, 8)
    images = targets.model_pixels()
    last = list(load_model(start, "cpu").encoder.encode(list(targets.prompts)))
    attacked = set()
    for x0, start_states, triggers in calls:
        (index,) = [i for i in range(len(images)) if torch.equal(images[i], x0[0])]
        torch.testing.assert_close(start_states[0], last[index], rtol=0, atol=0)
        assert not torch.equal(triggers[0], start_states[0])
        last[index] = triggers[0]
        attacked.add(index)
    assert len(calls) == 4 and attacked == {0, 1}  # each image attacked, and one again


def test_it_composes_with_iet_and_agc_from_a_pruned_model(
    shapes_dir, start, listing, tmp_path
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(line.split("\t")[1] for line in listing.read_text().splitlines()))
    cli.main(
        ["mitigate", "--model", str(start), "--method", "wanda", "--prompts", str(prompts),
         "--output_dir", str(tmp_path / "pruned"), "--num_images", "1",
         "--num_inference_steps", "2", "--device", "cpu"]
    )  # fmt: skip
    settings = adversarial(
        tmp_path / "pruned", listing, strategy="iet", defense=["agc", "adversarial"],
        num_proxies=2, rounds=1, max_train_steps=4, adv_inner_steps=2,
    )  # fmt: skip
    metadata = train_tiny(shapes_dir / "train", tmp_path / "iet", **settings)
    agc, adv = metadata["defenses"]
    assert (agc["name"], adv["name"]) == ("agc", "adversarial")
    assert [proxy["attacks"] for proxy in adv["report"]["proxies"]] == [2, 2]
    assert metadata["config"]["pretrained_model_name_or_path"] == str(tmp_path / "pruned")


def test_it_fine_tunes_a_latent_model(shapes_dir, pipeline_dir, listing, tmp_path) -> None:
    """The memorized images and the surrogates go through the VAE; the pipeline's layout stays."""
    metadata = train_tiny(
        shapes_dir / "train", tmp_path / "sd",
        **adversarial(pipeline_dir, listing, text_encoder="clip", resolution=16,
                      max_train_steps=2, adv_inner_steps=2),
    )  # fmt: skip
    assert metadata["defenses"][0]["report"]["attacks"] == 2
    assert (tmp_path / "sd" / "unet").is_dir() and (tmp_path / "sd" / "vae").is_dir()
    surrogates = ImageFolderDataset(tmp_path / "sd" / SURROGATES_DIR, 16)
    assert len(surrogates) == 2


def test_bad_input_is_an_error_naming_the_file(shapes_dir, start, listing, tmp_path) -> None:
    def build(**overrides):
        settings = adversarial(start, listing, **overrides)
        return build_training(
            tiny_settings(shapes_dir / "train", tmp_path / "out", **settings), source="test"
        )

    with pytest.raises(FileNotFoundError, match=r"--memorized: no such file or folder: .*nope"):
        build(memorized=str(tmp_path / "nope.txt"))
    shutil.copy(listing.parent / "memorized0.png", tmp_path / "memorized0.png")
    broken = tmp_path / "broken.txt"
    broken.write_text("memorized0.png\ta prompt\nmissing.png\tanother\n")
    with pytest.raises(DataError, match=r"broken.txt, line 2: image file not found: .*missing"):
        build(memorized=str(broken))
    unprompted = tmp_path / "unprompted.txt"
    unprompted.write_text("memorized0.png\n")
    with pytest.raises(ConfigError, match=r"unprompted.txt: no prompt for memorized0.png"):
        build(memorized=str(unprompted))
    with pytest.raises(ConfigError, match="memorized: required by --strategy adversarial"):
        build(memorized=None)
    with pytest.raises(ConfigError, match="adv_inner_steps: must be >= 0"):
        build(adv_inner_steps=-1)
    with pytest.raises(ConfigError, match="adv_surrogate_fallback: 'prompt' is not one of"):
        build(adv_surrogate_fallback="prompt")
    with pytest.raises(ConfigError, match="adv_trigger_start: 'random' is not one of"):
        build(adv_trigger_start="random")
    with pytest.raises(ConfigError, match="starts from a trained model"):
        build(pretrained_model_name_or_path=None, model_preset="tiny")
    with pytest.raises(
        ConfigError, match="a setting of --defense adversarial, which this run does not use"
    ):
        build(strategy="plain", adv_weight=2.0)
    config, defenses = build(max_text_length=16)
    with pytest.raises(ConfigError, match=r"give --max_text_length 8"):
        Trainer(config, defenses, progress=False).train()


def test_a_surrogate_that_replicates_its_image_is_drawn_again(
    shapes_dir: Path, start: Path, listing: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DoRI's surrogate is what the mitigated model makes instead of the memorized image: where
    the first noise still makes the image itself, the next noise's generation is taken; where
    every noise does, the replica is kept with a warning, or with the `empty` fallback the empty
    prompt's generation is taken (and where that too replicates, the replica, with a warning)."""
    targets = read_memorized(listing, 8)
    memorized = targets.pixels.float() / 255
    real = adversarial_module.generate

    def replicating(from_empty_prompt: bool):
        def generate(model, prompts, num_images, seed, *args):
            if seed == 0 and (from_empty_prompt or "" not in prompts):
                return memorized[: len(prompts) * num_images].clone()
            return real(model, prompts, num_images, seed, *args)

        return generate

    def surrogates(name: str, **extra) -> dict:
        settings = adversarial(start, listing, max_train_steps=1) | extra
        (record,) = train_tiny(shapes_dir / "train", tmp_path / name, **settings)["defenses"]
        return record["report"]

    monkeypatch.setattr(adversarial_module, "generate", replicating(from_empty_prompt=False))
    retried = surrogates("retried")
    assert retried["surrogate_seeds"] == [1, 1]
    assert retried["surrogate_prompts"] == targets.prompts
    assert min(retried["surrogate_rms_distance"]) >= 0.1
    anchored = surrogates("anchored", adv_surrogate_tries=1, adv_surrogate_fallback="empty")
    assert anchored["surrogate_prompts"] == ["", ""]
    assert min(anchored["surrogate_rms_distance"]) >= 0.1

    with pytest.warns(UserWarning, match=r"with each of 1 noises \(RMS"):
        told = surrogates("told", adv_surrogate_tries=1)
    assert max(told["surrogate_rms_distance"]) < 1e-6

    monkeypatch.setattr(adversarial_module, "generate", replicating(from_empty_prompt=True))
    with pytest.warns(UserWarning, match="with each of 1 noises and from the empty prompt"):
        kept = surrogates("kept", adv_surrogate_tries=1, adv_surrogate_fallback="empty")
    assert kept["surrogate_seeds"] == [0, 0]
    assert max(kept["surrogate_rms_distance"]) < 1e-6
