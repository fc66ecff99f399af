"""Training a diffusion UNet (DDPM), text-conditional, class-conditional or unconditional
(`memguard.conditioning`): `Trainer` builds the run and hands it to its strategy's loop.

Plain training (`--strategy plain`, this module) is one `TrainingStep` on every process,
gradients averaged over all of them: draw the step's randomness (`memguard.train.draws`), cut
this process's micro-batches, run the step, log, checkpoint. Iterative ensemble training
(`--strategy iet`, `memguard.train.iet`) drives one step per proxy model instead. Adversarial
fine-tuning (`--strategy adversarial`, `memguard.defenses.adversarial`) is the plain loop with
the adversarial defense attached: its inner trigger attack feeds the step's `extra_loss`. Loops
share the run's parts (`memguard.train.run`) and the session's log, checkpoints and model folder
(`memguard.train.session`). At the end the EMA weights go into the model, the defenses report
on it, and the model folder is written (`memguard.io`).
"""

from __future__ import annotations

from collections.abc import Sequence

from memguard.config import ConfigError, TrainConfig
from memguard.defenses.adversarial import AdversarialFineTuning
from memguard.defenses.base import Defense
from memguard.defenses.registry import record
from memguard.train.checkpoint import load_unit
from memguard.train.draws import GlobalBatchSampler
from memguard.train.iet import IterativeEnsemble
from memguard.train.run import Run, batches, build_run, make_step, step_inputs
from memguard.train.session import Session, TrainResult

MODEL_UNIT = "model"  # the checkpoint unit of the one model plain training trains


def train_plain(session: Session, run: Run, defenses: Sequence[Defense]) -> TrainResult:
    """One model, one `TrainingStep` on every process, gradients averaged over the world."""
    cfg, world = session.config, session.world
    step = make_step(cfg, run, run.unet, defenses, world, cfg.max_train_steps)
    step.setup_defenses()
    if session.resume is not None:
        step.load_state_dict(load_unit(session.resume, MODEL_UNIT))
    accum = cfg.gradient_accumulation_steps
    sampler = GlobalBatchSampler(
        len(run.dataset), cfg.train_batch_size, world.rank, world.size, cfg.seed,
        start=step.ctx.step * accum,
    )  # fmt: skip
    loader = batches(cfg, run.dataset, sampler)
    session.start(step.ctx.step)
    run.unet.train()
    while step.ctx.step < cfg.max_train_steps:
        inputs = step_inputs(cfg, run, loader, cfg.seed, step.ctx.step, world, session.device)
        loss = session.run_step(step, inputs)
        samples = cfg.train_batch_size * world.size * accum
        session.tick(loss, 1, samples, defenses, lr=step.lr_schedule.get_last_lr()[0])
        if session.passed(cfg.checkpointing_steps):
            session.checkpoint({MODEL_UNIT: step.state_dict()} if session.main else {})
    session.close()
    step.finish()  # EMA weights into the model: what is saved is what is certified
    records = [record(defense) for defense in defenses]
    step.detach()
    return session.save(run, run.unet, records)


class Trainer:
    """Trains a diffusion UNet (conditioned as `config.conditioning` says) with a list of
    defenses attached.

    >>> Trainer(TrainConfig(train_data_dir="data/train", output_dir="out")).train()

    With `strategy: iet` the defenses are templates: each proxy trains with its own copy.
    `progress=False` hides the progress bar (a caller showing its own, as `memguard bench`).
    """

    def __init__(
        self, config: TrainConfig, defenses: Sequence[Defense] = (), progress: bool = True
    ) -> None:
        self.config = config
        self.defenses = list(defenses)
        self.progress = progress

    def train(self) -> TrainResult:
        if self.config.strategy == "adversarial" and not any(
            isinstance(defense, AdversarialFineTuning) for defense in self.defenses
        ):
            raise ConfigError(
                "strategy: adversarial trains with the adversarial defense attached; build the "
                "run with memguard.defenses.registry.build_training (or attach it by hand)"
            )
        session = Session(self.config, self.progress)
        run = build_run(self.config, session.device)
        if self.config.strategy == "iet":
            return IterativeEnsemble(session, run, self.defenses).train()
        return train_plain(session, run, self.defenses)
