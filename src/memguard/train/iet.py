"""Iterative ensemble training (IET; Liu et al., "Iterative Ensemble Training with Anti-Gradient
Control for Mitigating Memorization in Diffusion Models", ECCV 2024, arXiv 2407.15328), with
IET-AGC+'s memory-sample redistribution ("Redistribute Ensemble Training for Mitigating
Memorization in Diffusion Models", arXiv 2502.09434): `memguard train --strategy iet`.

K proxy models start from the same weights (the run's seeded initialisation, or the pretrained
UNet). Each trains on its own shard of the training set (`memguard.train.shards`) with its own
`TrainingStep`: optimizer, lr schedule, EMA, defenses (copies of the run's: an AGC memory bank
and skip counts per proxy) and random streams, all kept across rounds. A proxy's draws are plain
training's with the seed derived from (seed, proxy) and its data order in round r a chain of
permutations of its shard seeded by (seed, proxy, r). After each of the R rounds the proxies'
trainable weights (and EMA weights) are averaged with weights n_k / N (shard sizes) and loaded
into every proxy. With `--redistribute P`, after rounds 1, 3, ... (but never the last, so the
final model is an average) each proxy instead hands the fraction P of its shard that its AGC
skipped most since the last redistribution to proxy (k + 1) mod K, and the skip counts restart.

The budget. A *step* is one optimizer step of one proxy, on train_batch_size x
gradient_accumulation_steps samples (a proxy trains on one process, so this is also its batch
under several processes). `max_train_steps` counts the steps of all proxies together, so the
samples trained on, max_train_steps x train_batch_size x gradient_accumulation_steps, are plain
training's on the same global batch; each proxy trains L = max_train_steps / (K x R) steps a
round, K x L a round in all, and its lr schedule (warm-up included) runs over its own R x L
steps. Threshold-aware augmentation's extra batches come on top, as they do in plain training.

Processes. Under `accelerate launch --num_processes N` each process trains K / N of the
proxies, one after the other, with a group of its own (no gradient synchronisation); averaging
is one all-reduce over the world. Proxies that are not training wait on the CPU: a proxy's
trainable weights, optimizer state and EMA weights move to the device only while it trains.
Copies share the frozen parameters and buffers of the run's UNet (a LoRA run holds its base
model once; only the adapters are trained, moved and averaged). The result does not depend on N.

Checkpoints hold each proxy's step state as its own unit (`proxy-k`, written by the process
that trains it) and a `strategy` unit (the shards, the rounds done, the samples each
redistribution moved and the skip counts it chose them by); `checkpoint.json` records the round
and the steps of it done, so a run killed in the middle of a round resumes to the weights of an
uninterrupted one. The step count of a checkpoint is the run's (all proxies); one that falls on
a round's end is taken after the round's averaging. The final model is the averaged one (EMA
weights when EMA is on), and memguard.json records the strategy, the shard sizes and each
proxy's defense reports.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Subset

from memguard.config import ConfigError
from memguard.defenses.agc import AntiGradientControl
from memguard.defenses.base import Defense
from memguard.defenses.registry import record
from memguard.distributed import Group
from memguard.train.checkpoint import load_unit
from memguard.train.draws import GlobalBatchSampler, derive_seed
from memguard.train.run import Run, batches, make_step, step_inputs
from memguard.train.session import Session, TrainResult
from memguard.train.shards import most_skipped, redistribute, split
from memguard.train.step import TrainingStep

STRATEGY_UNIT = "strategy"
TIES = 1  # stream key: the random order of a shard's samples tied on skip counts


def proxy_unit(proxy: int) -> str:
    return f"proxy-{proxy}"


def proxies_of(rank: int, world_size: int, num_proxies: int) -> range:
    """The proxies process `rank` of `world_size` trains."""
    if num_proxies % world_size:
        raise ConfigError(
            f"num_proxies: {num_proxies} proxies cannot be shared evenly by {world_size} "
            f"processes; launch a number of processes that divides {num_proxies}"
        )
    per = num_proxies // world_size
    return range(rank * per, (rank + 1) * per)


def proxy_models(unet: torch.nn.Module, count: int) -> Iterator[torch.nn.Module]:
    """`count` models that start from `unet`'s weights, one at a time: copies of `unet` sharing
    its frozen parameters and buffers, then `unet` itself (offload each copy before taking the
    next, and the device holds `unet` and one copy at a time)."""
    shared = [p for p in unet.parameters() if not p.requires_grad] + list(unet.buffers())
    for _ in range(count - 1):
        yield copy.deepcopy(unet, memo={id(tensor): tensor for tensor in shared})
    yield unet


def average_proxies(
    steps: Sequence[TrainingStep], weights: Sequence[float], group: Group, device
) -> None:
    """In place, the trainable weights (and EMA weights) of every step become sum_k w_k theta_k
    over the proxies of every process of `group`: this process's `steps`, `weights`, summed
    here in float64 on `device` (where `group` communicates), then one all-reduce."""

    def tensors(step: TrainingStep) -> list[torch.Tensor]:
        return [*step.params, *(step.ema.shadow_params if step.ema is not None else [])]

    share = sum(weights)
    sums = [torch.zeros(t.shape, dtype=torch.float64, device=device) for t in tensors(steps[0])]
    with torch.no_grad():
        for step, weight in zip(steps, weights, strict=True):
            for total, tensor in zip(sums, tensors(step), strict=True):
                total.add_(tensor.to(device, torch.float64), alpha=weight / share)
        group.average_(sums, weight=share)
        for step in steps:
            for total, tensor in zip(sums, tensors(step), strict=True):
                tensor.copy_(total)


class IterativeEnsemble:
    """IET on this process's proxies; see the module docstring. `defenses` are templates:
    each proxy trains with its own copy."""

    def __init__(self, session: Session, run: Run, defenses: Sequence[Defense]) -> None:
        cfg = self.config = session.config
        self.session, self.run = session, run
        if len(run.dataset) < cfg.num_proxies:
            raise ConfigError(
                f"num_proxies: {cfg.num_proxies} shards of {len(run.dataset)} images would "
                "leave some empty"
            )
        world = session.world
        self.mine = proxies_of(world.rank, world.size, cfg.num_proxies)
        self.steps: dict[int, TrainingStep] = {}
        models = proxy_models(run.unet, len(self.mine))
        for proxy, model in zip(self.mine, models, strict=True):
            step = make_step(
                cfg, run, model, copy.deepcopy(list(defenses)), Group.local(),
                cfg.max_train_steps // cfg.num_proxies,
            )  # fmt: skip
            step.setup_defenses()
            step.to("cpu")
            self.steps[proxy] = step
        if cfg.redistribute and not all(self._agc(k) for k in self.mine):
            raise ConfigError("redistribute: moves the samples AGC skipped most; attach AGC")
        strata = None if cfg.shard_by is None else run.dataset.column(cfg.shard_by)
        if strata is not None and all(value is None for value in strata):
            raise ConfigError(f"shard_by: no row of the metadata has a '{cfg.shard_by}' column")
        self.shards = split(len(run.dataset), cfg.num_proxies, cfg.seed, strata)
        self.initial_sizes = [len(shard) for shard in self.shards]
        self.round = 0  # rounds done
        # each redistribution: {"after_round": r, "moved": [proxy k's indices],
        # "skip_counts": [proxy k's counts, index -> skips]}
        self.moves: list[dict] = []
        if session.resume is not None:
            self._resume()

    def _agc(self, proxy: int) -> AntiGradientControl | None:
        found = [d for d in self.steps[proxy].defenses if isinstance(d, AntiGradientControl)]
        return found[0] if found else None

    # ----------------------------------------------------------------------------- the loop

    def train(self) -> TrainResult:
        s, cfg = self.session, self.config
        num, per_round = s.world.size, cfg.num_proxies * cfg.steps_per_round
        s.start(self.round * per_round + num * self._position())
        samples = num * cfg.train_batch_size * cfg.gradient_accumulation_steps
        for r in range(self.round, cfg.rounds):
            after_round = False  # a checkpoint falls on the round's last step
            for proxy in self.mine:
                step, end = self.steps[proxy], (r + 1) * cfg.steps_per_round
                if step.ctx.step == end:
                    continue
                step.to(s.device)
                step.model.train()
                loader = self._loader(proxy, r, step.ctx.step - r * cfg.steps_per_round)
                seed = derive_seed(cfg.seed, proxy)
                while step.ctx.step < end:
                    inputs = step_inputs(
                        cfg, self.run, loader, seed, step.ctx.step, Group.local(), s.device
                    )
                    loss = s.run_step(step, inputs)
                    s.tick(loss, num, samples, round=r + 1, lr=step.lr_schedule.get_last_lr()[0])
                    if s.passed(cfg.checkpointing_steps):
                        after_round = s.done == (r + 1) * per_round
                        if not after_round:
                            self._checkpoint()
                step.to("cpu")
            self._end_round(r + 1)
            if after_round:
                self._checkpoint()
        s.close()
        return self._save()

    def _position(self) -> int:
        """Steps this process has run in the current round."""
        start = self.round * self.config.steps_per_round
        return sum(self.steps[proxy].ctx.step - start for proxy in self.mine)

    def _loader(self, proxy: int, round_: int, position: int) -> Iterator[dict]:
        """The proxy's batches in round `round_` from step `position` of it."""
        cfg, shard = self.config, self.shards[proxy]
        sampler = GlobalBatchSampler(
            len(shard), cfg.train_batch_size, 0, 1, derive_seed(cfg.seed, proxy, round_),
            start=position * cfg.gradient_accumulation_steps,
        )  # fmt: skip
        return batches(cfg, Subset(self.run.dataset, shard), sampler)

    def _end_round(self, done: int) -> None:
        """After round `done` (1-based): redistribute (odd rounds but the last, with MSR) or
        average."""
        cfg = self.config
        if cfg.redistribute and done % 2 == 1 and done < cfg.rounds:
            self._redistribute(done)
        else:
            total = sum(len(shard) for shard in self.shards)
            average_proxies(
                [self.steps[k] for k in self.mine],
                [len(self.shards[k]) / total for k in self.mine],
                self.session.world,
                self.session.device,
            )
        self.round = done

    def _redistribute(self, done: int) -> None:
        """Each proxy's most skipped samples to the next proxy; the skip counts restart."""
        cfg, local = self.config, {}
        for proxy in self.mine:
            agc, shard = self._agc(proxy), self.shards[proxy]
            counts = {i: agc.skip_counts[i] for i in shard if i in agc.skip_counts}
            ties = np.random.default_rng(derive_seed(cfg.seed, proxy, done, TIES))
            local[proxy] = (most_skipped(shard, counts, cfg.redistribute, ties), counts)
            agc.skip_counts.clear()
        gathered = {
            k: v for part in self.session.world.gather_objects(local) for k, v in part.items()
        }
        moved = [gathered[k][0] for k in range(cfg.num_proxies)]
        self.shards = redistribute(self.shards, moved)
        counts = [gathered[k][1] for k in range(cfg.num_proxies)]
        self.moves.append({"after_round": done, "moved": moved, "skip_counts": counts})

    # ---------------------------------------------------------------------- checkpoints

    def _checkpoint(self) -> None:
        s = self.session
        owned = {proxy_unit(k): self.steps[k].state_dict() for k in self.mine}
        if s.main:
            owned[STRATEGY_UNIT] = {"round": self.round, "shards": self.shards, "moves": self.moves}
        round_steps = s.done - self.round * self.config.num_proxies * self.config.steps_per_round
        s.checkpoint(
            owned,
            info={
                "strategy": "iet",
                "round": self.round,
                "round_steps": round_steps,
                "num_processes": s.world.size,
            },
        )

    def _resume(self) -> None:
        s, cfg = self.session, self.config
        info = s.resumed
        if info.get("strategy") != "iet":
            raise ConfigError(f"{s.resume}: not a checkpoint of --strategy iet")
        if info["round_steps"] and info["num_processes"] != s.world.size:
            raise ConfigError(
                f"{s.resume}: written in the middle of a round by {info['num_processes']} "
                f"processes; resume it with as many (this run has {s.world.size})"
            )
        state = load_unit(s.resume, STRATEGY_UNIT)
        self.round, self.shards, self.moves = state["round"], state["shards"], state["moves"]
        position = info["round_steps"] // s.world.size
        for j, proxy in enumerate(self.mine):
            step = self.steps[proxy]
            step.load_state_dict(load_unit(s.resume, proxy_unit(proxy)))
            done = min(max(position - j * cfg.steps_per_round, 0), cfg.steps_per_round)
            if step.ctx.step != self.round * cfg.steps_per_round + done:
                raise ConfigError(
                    f"{s.resume}: proxy {proxy} has trained {step.ctx.step} steps, not the "
                    f"{self.round * cfg.steps_per_round + done} the checkpoint's position says"
                )

    # ---------------------------------------------------------------------------- the end

    def _save(self) -> TrainResult:
        """The averaged model (EMA weights when kept) to the model folder, with every proxy's
        defense reports."""
        s, cfg = self.session, self.config
        reports = {}
        for proxy in self.mine:
            step = self.steps[proxy]
            step.to(s.device)
            step.finish()
            reports[proxy] = [record(defense) for defense in step.defenses]
            step.detach()
            if proxy != self.mine[0]:
                step.to("cpu")
        reports = {k: v for part in s.world.gather_objects(reports) for k, v in part.items()}
        records = [
            {**first, "report": {"proxies": [reports[k][i]["report"] for k in sorted(reports)]}}
            for i, first in enumerate(reports[0])
        ]
        strategy = {
            "name": "iet",
            "num_proxies": cfg.num_proxies,
            "rounds": cfg.rounds,
            "steps_per_round": cfg.steps_per_round,
            "shard_by": cfg.shard_by,
            "initial_shard_sizes": self.initial_sizes,
            "shard_sizes": [len(shard) for shard in self.shards],
            "redistribute": cfg.redistribute,
            "redistributions": [
                {"after_round": m["after_round"], "moved": [len(part) for part in m["moved"]]}
                for m in self.moves
            ],
        }
        model = self.steps[self.mine[0]].model
        return s.save(self.run, model, records, {"strategy": strategy})
