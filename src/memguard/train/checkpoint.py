"""Checkpoints that survive a kill and hold every process's own state.

A checkpoint is a folder `checkpoints/checkpoint-N` of state files, one per *unit* (a training
step's model, optimizer, lr schedule, EMA and defenses, or a strategy's bookkeeping), each
written by the process that owns it: under plain data parallelism the one model is owned by
the main process (every process holds the same state), while IET's proxies, which train apart,
are each written by the process that trains them. Files go to `checkpoint-N.partial/` under
temporary names; when every process is done the main process writes `checkpoint.json` (the step
and the units) and renames the folder, so `--resume_from_checkpoint latest` never picks a
half-written checkpoint. Every process then loads the units it holds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from memguard.distributed import Group
from memguard.io import atomic_path, write_json

CHECKPOINTS = "checkpoints"
INDEX_FILE = "checkpoint.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `output_dir`, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return [path for _, path in sorted(found) if (path / INDEX_FILE).is_file()]


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint folder that `--resume_from_checkpoint` names, or None to start afresh."""
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        path = Path(output_dir) / CHECKPOINTS / resume
    if not (path / INDEX_FILE).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint: no complete checkpoint {resume!r}")
    return path


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    owned: dict[str, dict[str, Any]],
    keep: int,
    world: Group,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write the units this process owns (`owned`: unit name -> state) into the checkpoint of
    `step`, atomically; every process of `world` calls it. The main process records `info`
    (the strategy's own settings, say) and prunes to the newest `keep` checkpoints."""
    final = Path(output_dir) / CHECKPOINTS / f"checkpoint-{step}"
    partial = final.with_name(final.name + ".partial")
    if world.rank == 0 and partial.exists():
        shutil.rmtree(partial)
    world.barrier()
    partial.mkdir(parents=True, exist_ok=True)
    for unit, state in owned.items():
        with atomic_path(partial / f"{unit}.pt") as path:
            torch.save(state, path)
    world.barrier()
    if world.rank == 0:
        units = sorted(p.stem for p in partial.glob("*.pt"))
        write_json(partial / INDEX_FILE, {"step": step, "units": units, **(info or {})})
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    world.barrier()
    return final


def checkpoint_info(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's index: its step, its units and what the main process recorded."""
    return json.loads((checkpoint / INDEX_FILE).read_text())


def load_unit(checkpoint: Path, unit: str) -> dict[str, Any]:
    """The saved state of one unit (on the CPU)."""
    path = checkpoint / f"{unit}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint}: no state for '{unit}' (units: "
                                f"{checkpoint_info(checkpoint)['units']})")  # fmt: skip
    return torch.load(path, map_location="cpu", weights_only=False)
