"""Checkpoints that survive a kill, and the final model folder that diffusers can load.

A checkpoint is accelerate's `save_state` (model, optimizer, lr schedule, registered objects such
as EMA weights, defenses and the step counter) written to `checkpoint-N.partial` and renamed to
`checkpoint-N` only when complete, so a killed run never leaves a half-written checkpoint that
`--resume_from_checkpoint latest` would pick. The final model is written the same way: files go
to a temporary folder first and are moved into place one by one, `memguard.json` last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
METADATA_FILE = "memguard.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `output_dir`, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return [path for _, path in sorted(found)]


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
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint: no checkpoint folder {resume!r}")
    return path


def save_checkpoint(accelerator: Any, output_dir: str | Path, step: int, keep: int) -> Path:
    """Save resumable state for `step` atomically and prune to the newest `keep` checkpoints."""
    final = Path(output_dir) / CHECKPOINTS / f"checkpoint-{step}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def write_json(path: str | Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(partial, path)


def publish(staging: Path, output_dir: Path) -> None:
    """Move every file of `staging` into `output_dir` (replacing), then remove `staging`."""
    for source in sorted(p for p in staging.rglob("*") if p.is_file()):
        target = output_dir / source.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
    shutil.rmtree(staging)
