"""The embedding-trigger attack of DoRI: Kowalczuk et al., "Finding Dori: Memorization in
Text-to-Image Diffusion Models Is Less Local Than Assumed" (arXiv 2507.16880; ICML 2026 as
"Finding DoRI: Discovery of Retained Images in Diffusion Models").

With the model frozen, the attacker optimizes the whole conditioning y, the text states (L, d)
that the UNet's cross-attention reads, so that the model denoises a target image: Adam on
E_{t, eps} ||target - model(x_t, t, y)||^2, the target being the noise or v as the model
predicts (`memguard.diffusion.per_sample_loss`; a latent model's target image is VAE-encoded
first), each step on a batch of copies of the target with fresh timesteps and noise. y starts
from the states of the target's original prompt (`prompt`), from Gaussian noise with their mean
and standard deviation (`gaussian`; the empty prompt's, for a target without a caption), or from
an unrelated prompt's states (`unrelated`). The model then generates from y
(`memguard.sampling.generate`) and `memguard.attacks.targets.RecoveryJudge` says whether the
generation recovers the target. DoRI finds such triggers for memorized images in models that
pruning (NeMo, Wanda: `memguard.mitigations`) had made stop replicating from the prompt.

Every `check_every` steps, and at the start and the end, the attack generates from the current
y (always from the same starting noise) and judges it. `steps_to_replicate` is the first checked
step at which the generation recovers the target (0: the start already does; None: not within
`steps`), an upper bound at the checks' resolution: the steps a memorized image needs, beside
those of a non-memorized one. The losses reported are means over a probe batch of timesteps and
noise drawn once per target, so that they compare across steps.

Randomness: target i's draws (the Gaussian start, the probe, every step's timesteps and noise)
come from a `torch.Generator` seeded with seed + i, and every generation starts from the noise
of `seed` (sampling's convention), so the same seed gives the same triggers.

The optimization itself (`optimize_conditioning`) is one function for every use: this attack,
and adversarial fine-tuning (`memguard.defenses.adversarial`), which runs it against the model
being trained in every step's inner loop.

Output (`run_trigger_attack`): `triggers.safetensors` (one (L, d) tensor per target, named as
the target), `generations/` (an image folder: each target's last generation, captioned with its
original prompt) and `triggers.json` (per target: init, losses, the verdict, the distance, the
steps to replicate and every check).

With `locality` set, the attack also runs from `locality_starts` Gaussian starts per target
(start k: init gaussian, seed + k x N for N targets, so target i's draws come from
seed + k x N + i; start 0 is the attack itself when it started from Gaussian noise), writes
those triggers to `locality_triggers.safetensors` (named `<target>/<k>`), and
`memguard.attacks.locality` measures how far apart they lie, in the conditioning, in the
cross-attention activations and in NeMo's and Wanda's selections: triggers.json's `locality`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from safetensors.torch import save_file

from memguard.attacks.locality import analyse_locality, require_prompts
from memguard.attacks.targets import RecoveryJudge, Targets, Verdict, read_targets
from memguard.config import ConfigError, TriggerConfig, to_dict
from memguard.data.folder import ImageFolderDataset
from memguard.diffusion import per_sample_loss, to_latents
from memguard.io import DiffusionModel, atomic_path, load_model, write_json
from memguard.metrics.intervals import rate_of
from memguard.sampling import generate, save_samples

Draw = tuple[torch.Tensor, torch.Tensor]  # timesteps (B,) and noise (B, C, H, W)

TRIGGERS_FILE = "triggers.safetensors"
LOCALITY_TRIGGERS_FILE = "locality_triggers.safetensors"
RESULTS_FILE = "triggers.json"
GENERATIONS_DIR = "generations"
ATTACK = "DoRI embedding trigger (Kowalczuk et al., arXiv 2507.16880)"


def initial_states(
    model: DiffusionModel,
    init: str,
    prompt: str | None,
    unrelated_prompt: str,
    generator: torch.Generator,
) -> torch.Tensor:
    """Where the conditioning starts, (L, d) on the CPU (see the module docstring)."""
    if init == "unrelated":
        return model.encoder.encode([unrelated_prompt])[0].cpu()
    if init == "prompt":
        if prompt is None:
            raise ConfigError(
                "--init prompt: a target has no caption to start from; give the images as a "
                "folder with captions, or use --init gaussian or unrelated"
            )
        return model.encoder.encode([prompt])[0].cpu()
    if init == "gaussian":
        own = model.encoder.encode([prompt or ""])[0].cpu()
        return own.mean() + own.std() * torch.randn(own.shape, generator=generator)
    raise ValueError(f"init: {init!r} is not one of prompt, gaussian, unrelated")


@dataclass(frozen=True)
class Check:
    """The conditioning at one step: its probe loss, and the verdict on its generation."""

    step: int
    loss: float
    verdict: Verdict


@dataclass(frozen=True)
class TriggerRun:
    """One target's attack: the trigger, every check, and the last check's generation."""

    trigger: torch.Tensor  # (L, d)
    checks: list[Check]  # the first at step 0, the last at the final step
    generation: torch.Tensor  # (3, H, W) in [0, 1]

    @property
    def steps_to_replicate(self) -> int | None:
        return next((c.step for c in self.checks if c.verdict.replicated), None)


def draw(x0: torch.Tensor, copies: int, num_timesteps: int, generator: torch.Generator) -> Draw:
    """Timesteps and noise for `copies` copies of each image of `x0` (n, C, H, W), image-major,
    drawn on the CPU from `generator` (timesteps first) and moved to `x0`'s device."""
    size = len(x0) * copies
    timesteps = torch.randint(0, num_timesteps, (size,), generator=generator)
    noise = torch.randn((size, *x0.shape[1:]), generator=generator)
    return timesteps.to(x0.device), noise.to(x0.device)


def denoising_losses(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    states: torch.Tensor,
    draw_: Draw,
) -> torch.Tensor:
    """The denoising loss of each image of `x0` (n, C, H, W) under its conditioning `states`
    (n, L, d), averaged over its copies in `draw_` (`draw`'s layout): (n,)."""
    timesteps, noise = draw_
    copies = len(timesteps) // len(x0)
    return per_sample_loss(
        unet, scheduler, x0.repeat_interleave(copies, dim=0),
        states.repeat_interleave(copies, dim=0), timesteps, noise,
    ).view(len(x0), copies).mean(dim=1)  # fmt: skip


def optimize_conditioning(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    start: torch.Tensor,
    steps: int,
    learning_rate: float,
    batch_size: int,
    generator: torch.Generator,
    observe: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DoRI's attack: Adam on the conditioning y (n, L, d), from `start`, so that `unet`
    denoises the images `x0` (n, C, H, W), each under its own y. Each of the `steps` steps
    draws fresh timesteps and noise for `batch_size` copies of every image from `generator`.
    Only y is differentiated (`torch.autograd.grad`): nothing reaches the model's gradients,
    whether its weights require them or not. `observe(step, y)` is called before each step and
    after the last. Returns the triggers (detached) and the last step's loss per image (n,)
    (zeros when `steps` is 0)."""
    states = start.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([states], lr=learning_rate)
    last = torch.zeros(len(x0))
    num_timesteps = scheduler.config.num_train_timesteps
    with torch.enable_grad():
        for step in range(steps + 1):
            if observe is not None:
                observe(step, states)
            if step == steps:
                break
            losses = denoising_losses(
                unet, scheduler, x0, states, draw(x0, batch_size, num_timesteps, generator)
            )
            (states.grad,) = torch.autograd.grad(losses.sum(), [states])
            optimizer.step()
            last = losses.detach().float().cpu()
    return states.detach(), last


class TriggerAttack:
    """DoRI's optimization of the conditioning against a frozen model, judged by `judge`."""

    def __init__(self, model: DiffusionModel, judge: RecoveryJudge, config: TriggerConfig):
        self.model, self.judge, self.config = model, judge, config
        self.scheduler = DDPMScheduler.from_config(model.scheduler_config)

    def _check(
        self, index: int, step: int, x0: torch.Tensor, states: torch.Tensor, probe: Draw
    ) -> tuple[Check, torch.Tensor]:
        config = self.config
        with torch.no_grad():
            loss = float(denoising_losses(self.model.unet, self.scheduler, x0, states, probe)[0])
        image = generate(
            self.model, states.detach(), 1, config.seed, config.scheduler,
            config.num_inference_steps, config.guidance_scale,
        )  # fmt: skip
        return Check(step, loss, self.judge(image, [index])[0]), image[0]

    def run(self, targets: Targets, index: int) -> TriggerRun:
        """Attack target `index`."""
        config, model = self.config, self.model
        generator = torch.Generator().manual_seed(config.seed + index)
        start = initial_states(
            model, config.init, targets.prompts[index], config.unrelated_prompt, generator
        )
        pixels = targets.model_pixels()[index : index + 1].to(model.device)
        x0 = to_latents(model.vae, pixels) if model.vae is not None else pixels
        probe = draw(x0, config.batch_size, self.scheduler.config.num_train_timesteps, generator)
        checks: list[Check] = []
        generations: list[torch.Tensor] = []

        def observe(step: int, states: torch.Tensor) -> None:
            if step % config.check_every == 0 or step == config.steps:
                check, generation = self._check(index, step, x0, states, probe)
                checks.append(check)
                generations.append(generation)

        trigger, _ = optimize_conditioning(
            model.unet, self.scheduler, x0, start.to(model.device)[None], config.steps,
            config.learning_rate, config.batch_size, generator, observe,
        )  # fmt: skip
        return TriggerRun(trigger[0].cpu(), checks, generations[-1])


def _target_row(
    targets: Targets, index: int, run: TriggerRun, judge: RecoveryJudge, init: str
) -> dict:
    first, last = run.checks[0], run.checks[-1]
    return {
        "name": targets.names[index],
        "prompt": targets.prompts[index],
        "target_in_train": judge.target_in_train(index),
        "init": init,
        "initial_loss": first.loss,
        "final_loss": last.loss,
        **asdict(last.verdict),
        "steps_to_replicate": run.steps_to_replicate,
        "checks": [{"step": c.step, "loss": c.loss, **asdict(c.verdict)} for c in run.checks],
        "trigger": targets.names[index],
        "generation": f"{GENERATIONS_DIR}/{index:04d}_00.png",
    }


def attack_targets(
    model: DiffusionModel, targets: Targets, judge: RecoveryJudge, config: TriggerConfig
) -> list[TriggerRun]:
    """Attack every target of `targets` in turn (target i's draws from `config.seed` + i)."""
    attack = TriggerAttack(model, judge, config)
    return [attack.run(targets, index) for index in range(len(targets))]


def locality_runs(
    model: DiffusionModel,
    targets: Targets,
    judge: RecoveryJudge,
    config: TriggerConfig,
    runs: list[TriggerRun],
) -> list[list[TriggerRun]]:
    """Each target's `config.locality_starts` attacks from Gaussian starts, target-major:
    start k is `attack_targets` with init gaussian and seed + k x N (N targets); start 0 is
    `runs` itself when they started from Gaussian noise (the same draws)."""
    starts = []
    for k in range(config.locality_starts):
        if k == 0 and config.init == "gaussian":
            starts.append(runs)
            continue
        start = replace(config, init="gaussian", seed=config.seed + k * len(targets))
        starts.append(attack_targets(model, targets, judge, start))
    return [list(per_target) for per_target in zip(*starts, strict=True)]


def locality_of(
    model: DiffusionModel,
    targets: Targets,
    per_target: list[list[TriggerRun]],
    config: TriggerConfig,
) -> dict:
    """triggers.json's `locality` for `locality_runs`' triggers (`memguard.attacks.locality`)."""
    return analyse_locality(
        model, targets.names, targets.prompts,
        [torch.stack([run.trigger for run in runs]) for runs in per_target],
        [sum(run.checks[-1].verdict.replicated for run in runs) for runs in per_target],
        config.locality_z_threshold, config.locality_sparsity,
    )  # fmt: skip


def _save_triggers(path: Path, triggers: dict[str, torch.Tensor]) -> None:
    with atomic_path(path) as partial:
        save_file({name: t.contiguous() for name, t in triggers.items()}, str(partial))


def write_attack(
    targets: Targets,
    runs: list[TriggerRun],
    judge: RecoveryJudge,
    config: TriggerConfig,
    locality: tuple[list[list[TriggerRun]], dict] | None = None,
) -> dict:
    """Write the triggers, the generations and triggers.json under `config.output_dir` (see
    the module docstring), and with `locality` (`locality_runs` and `locality_of`'s block) the
    locality triggers and the block; return what triggers.json holds."""
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    named = zip(targets.names, runs, strict=True)
    _save_triggers(output / TRIGGERS_FILE, {name: run.trigger for name, run in named})
    if locality is not None:
        per_target = zip(targets.names, locality[0], strict=True)
        _save_triggers(
            output / LOCALITY_TRIGGERS_FILE,
            {f"{name}/{k}": run.trigger for name, starts in per_target
             for k, run in enumerate(starts)},
        )  # fmt: skip
    captions = [prompt or "" for prompt in targets.prompts]
    save_samples(torch.stack([r.generation for r in runs]), captions, 1, config.seed,
                 output / GENERATIONS_DIR)  # fmt: skip
    rows = [_target_row(targets, i, run, judge, config.init) for i, run in enumerate(runs)]
    results = {
        "attack": ATTACK,
        "model": config.model,
        "images": config.images,
        "settings": to_dict(config),
        "criterion": judge.criterion(),
        "replicated": rate_of(row["replicated"] for row in rows),
        "targets": rows,
    }
    if locality is not None:
        results["locality"] = locality[1]
    write_json(output / RESULTS_FILE, results)
    return results


def run_trigger_attack(config: TriggerConfig) -> dict:
    """`memguard attack trigger`: attack every target of `config.images` (and with
    `config.locality`, from several starts, measuring their locality); write the triggers,
    the generations and triggers.json (see the module docstring); return what triggers.json
    holds."""
    model = load_model(config.model, config.device)
    model.require_text("the embedding-trigger attack (DoRI's triggers are text states)")
    targets = read_targets(config.images, model.image_size)
    if config.locality:
        require_prompts(targets.names, targets.prompts)  # before any attack runs
    train = None
    if config.train_data_dir is not None:
        train = ImageFolderDataset(config.train_data_dir, model.image_size)
    judge = RecoveryJudge(
        targets, train, config.replication_threshold, config.distance_threshold, model.device
    )
    runs = attack_targets(model, targets, judge, config)
    locality = None
    if config.locality:
        per_target = locality_runs(model, targets, judge, config, runs)
        locality = (per_target, locality_of(model, targets, per_target, config))
    return write_attack(targets, runs, judge, config, locality)
