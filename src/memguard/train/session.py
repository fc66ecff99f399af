"""What every training strategy's loop shares: the processes, the output folder and the
checkpoint a run resumes from, the run log and progress bar, checkpoints, and the model folder
written at the end.

A loop (plain training, IET) counts the run's optimizer steps, over all processes and models,
in `Session.done`; each `tick` adds the steps that every process just ran together. A log line
(`train_log.jsonl`) is written whenever the count passes a multiple of `logging_steps` (and at
the end), with the mean loss of the steps since the last line over every process, and a loop
checkpoints when `passed(checkpointing_steps)`. `accelerate launch` starts the processes and
accelerate's `PartialState` joins them (gloo on CPUs).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from memguard import __version__
from memguard.config import TrainConfig, to_dict
from memguard.data.folder import fingerprint
from memguard.defenses.base import Defense
from memguard.distributed import Group
from memguard.io import save_model
from memguard.train.checkpoint import checkpoint_info, resolve_resume, save_checkpoint
from memguard.train.run import Run
from memguard.train.step import TrainingError, TrainingStep

LOG_FILE = "train_log.jsonl"


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    final_loss: float
    loop_seconds: float  # wall time of the optimizer steps run by this call
    steps_run: int


def _cpu_data_parallel() -> bool:
    """Several processes and no GPU: data parallelism on CPUs (gloo).

    `accelerate launch --multi_gpu --num_processes N` (torchrun underneath) starts the processes;
    accelerate then needs `cpu=True` to use gloo instead of looking for GPUs.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import transformers

    return {
        "memguard": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "accelerate": accelerate.__version__,
        "transformers": transformers.__version__,
    }


def peak_memory(device: torch.device) -> dict[str, int]:
    """This process's peak memory so far: resident (Linux reports kilobytes) and, on a GPU,
    what torch allocated there."""
    peak = {"resident_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        peak["cuda_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return peak


class Session:
    """One call of a run on this process: see the module docstring.

    `resume` is the checkpoint folder to resume from (None: a fresh start) and `resumed` its
    index (`checkpoint.json`: the step, the units, what the loop recorded).
    """

    def __init__(self, config: TrainConfig, progress: bool = True) -> None:
        self.config = config
        state = PartialState(cpu=_cpu_data_parallel())
        self.world = Group.world()
        self.main = state.is_main_process
        self.device = state.device
        self.output_dir = Path(config.output_dir)
        if self.main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.resume = resolve_resume(self.output_dir, config.resume_from_checkpoint)
        self.resumed: dict[str, Any] = checkpoint_info(self.resume) if self.resume else {}
        self._show = progress and state.is_local_main_process
        self.done = self.first = self._before = 0
        self.last_loss = float("nan")

    def start(self, done: int) -> None:
        """The loop begins with `done` of the run's optimizer steps behind it."""
        self.done = self.first = self._before = done
        self._bar = tqdm(
            total=self.config.max_train_steps, initial=done, desc="train", disable=not self._show
        )
        self._window = [0.0, 0, 0]  # loss sum, losses, samples since the last log line
        self._start = self._log_start = time.perf_counter()

    def run_step(self, step: TrainingStep, micro_batches: Sequence[dict]) -> float:
        """`step` on `micro_batches`; a TrainingError says the checkpoints are intact."""
        try:
            return step(micro_batches)
        except TrainingError as error:
            raise TrainingError(
                f"{error}. Checkpoints in {self.output_dir} are intact; lower --learning_rate or "
                "check the data."
            ) from None

    def tick(
        self,
        loss: float,
        steps: int,
        samples: int,
        defenses: Sequence[Defense] = (),
        **fields: Any,
    ) -> None:
        """Every process just ran `steps` optimizer steps together on `samples` images in all;
        `loss` is this process's. Logs when due, with `fields` (the lr, say) and the defenses'
        `log_values` (as "name/figure") in the line."""
        self._before, self.done = self.done, self.done + steps
        self._bar.update(steps)
        self._window = [self._window[0] + loss, self._window[1] + 1, self._window[2] + samples]
        if self.passed(self.config.logging_steps) or self.done == self.config.max_train_steps:
            window = torch.tensor(self._window[:2], dtype=torch.float64, device=self.device)
            total, count = self.world.sum(window).tolist()
            self.last_loss = float(total / count)
            now = time.perf_counter()
            if self.main:
                line = {
                    "step": self.done,
                    "loss": self.last_loss,
                    **fields,
                    **{
                        f"{defense.name}/{key}": value
                        for defense in defenses
                        for key, value in defense.log_values().items()
                    },
                    "images_per_second": self._window[2] / max(now - self._log_start, 1e-9),
                }
                with open(self.output_dir / LOG_FILE, "a") as log:
                    log.write(json.dumps(line) + "\n")
            self._bar.set_postfix(loss=f"{self.last_loss:.4f}")
            self._window, self._log_start = [0.0, 0, 0], now

    def passed(self, every: int) -> bool:
        """Whether the last tick passed a multiple of `every` steps."""
        return self.done // every > self._before // every

    @property
    def seconds(self) -> float:
        """Training wall time, summed over the runs this one resumes."""
        return self.resumed.get("train_seconds", 0.0) + time.perf_counter() - self._start

    def checkpoint(self, owned: dict[str, dict], info: dict[str, Any] | None = None) -> None:
        """Checkpoint `done` with the units this process owns; every process calls it."""
        save_checkpoint(
            self.output_dir, self.done, owned, self.config.checkpoints_total_limit, self.world,
            info={"train_seconds": self.seconds, **(info or {})},
        )  # fmt: skip

    def close(self) -> None:
        """The loop is over."""
        self._loop_seconds = time.perf_counter() - self._start
        self._bar.close()

    def save(
        self,
        run: Run,
        unet: torch.nn.Module,
        records: list[dict],
        extra: dict[str, Any] | None = None,
    ) -> TrainResult:
        """Write the model folder (on the main process): `unet`, its scheduler, memguard.json
        with the defenses' `records` and the strategy's `extra` keys."""
        cfg = self.config
        if self.main:
            metadata = {
                "memguard_version": __version__,
                "config": to_dict(cfg),
                "conditioning": run.conditioning.spec(),
                **({"text_encoder": run.encoder.spec()} if run.encoder is not None else {}),
                "resolution": cfg.resolution,
                "data": {
                    "train_data_dir": str(Path(cfg.train_data_dir).resolve()),
                    "sha256": fingerprint(run.dataset.records),
                    "num_images": len(run.dataset),
                    "num_conditions": len(set(run.condition_values)),
                },
                "seed": cfg.seed,
                "global_step": self.done,
                "train_seconds": self.resumed.get("train_seconds", 0.0) + self._loop_seconds,
                "final_loss": self.last_loss,
                "peak_memory": peak_memory(self.device),
                "num_processes": self.world.size,
                "defenses": records,
                **(extra or {}),
                "versions": versions(),
            }
            save_model(self.output_dir, unet, run.scheduler, metadata, run.pipeline)
        self.world.barrier()
        return TrainResult(
            self.output_dir, self.done, self.last_loss, self._loop_seconds, self.done - self.first
        )
