"""Checkpoints of a training run, so that a long run can stop and go on.

One file, `<out>.checkpoint/state.pt` beside the run's output folder, replaced whole at each save (written to
a temporary name, then renamed): the stage ("head" on cached embeddings, or "finetune"), the steps done,
head (and, when fine-tuning, backbone) weights, optimiser and scheduler states, torch's RNG state and the loss
history. The batches need no state: they come from a seeded generator that a resumed run replays. The run's
config and backbone are stored too, and a checkpoint written with other settings is refused, never mixed in.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path


def checkpoint_dir(out: Path) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.checkpoint"


def _identity(config, backbone: Path) -> dict:
    return {"config": asdict(config), "backbone": str(Path(backbone).resolve())}


def find(out: Path, config, backbone: Path, resume: bool) -> dict | None:
    """The saved state to go on from (None: start afresh). Without `resume` an existing checkpoint is an error,
    so a run never silently throws away or reuses one."""
    import torch

    path = checkpoint_dir(out) / "state.pt"
    if not path.is_file():
        return None
    if not resume:
        raise ValueError(f"{path} holds an unfinished run of {out}; pass --resume to go on from it, "
                         f"or delete {path.parent} to start over")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which and what to do
        raise ValueError(f"{path} is not a readable checkpoint ({err}); delete {path.parent} to start over") from None
    wanted = _identity(config, backbone)
    differ = sorted(key for key in wanted["config"] if state["config"].get(key) != wanted["config"][key])
    if state["backbone"] != wanted["backbone"]:
        differ.append("backbone")
    if differ:
        raise ValueError(f"{path} was written by a run with other settings ({', '.join(differ)} differ); "
                         f"use the same settings to resume, or delete {path.parent} to start over")
    return state


def save(out: Path, config, backbone: Path, state: dict) -> None:
    import torch

    folder = checkpoint_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / "state.pt.partial"
    torch.save({**state, **_identity(config, backbone)}, partial)
    os.replace(partial, folder / "state.pt")


def paused(out: Path, stage: str, step: int, total: int) -> dict:
    """What a run that stopped at its time limit returns."""
    return {"paused": True, "stage": stage, "step": step, "total_steps": total, "checkpoint": str(checkpoint_dir(out))}


def remove(out: Path) -> None:
    shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
