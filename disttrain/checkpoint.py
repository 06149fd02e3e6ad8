"""Weights files and training checkpoints, written atomically (temp file or directory + rename): a
crash never leaves a half-written file under a final name."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from disttrain.models import WeightsError
from disttrain.runtime import rng_state


def atomic_save(obj: object, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def save_weights(path: str | Path, model_state: dict, classes: list[str], arch: str, **info) -> Path:
    """`model.pt`: the state dict plus what is needed to use it (class names, architecture, and the
    `info` given: normalization, image size, ...)."""
    return atomic_save({"model": model_state, "classes": list(classes), "arch": arch, **info}, path)


def load_weights(path: str | Path) -> dict:
    """Read a file written by `save_weights` (tensors, strings and lists only: weights_only=True)."""
    try:
        state = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{path}: not a loadable weights file ({err})") from err
    if not isinstance(state, dict) or "model" not in state or "classes" not in state:
        raise WeightsError(f"{path}: not a disttrain weights file (expected keys 'model' and 'classes')")
    return state


# ------------------------------------------------------------------------------------------------
# Training checkpoints: <run dir>/checkpoints/step-00000120/ (+ a `latest` pointer).
#
#   shared.pt         model, optimizer, schedule, grad scaler (rank 0's; identical on every rank)
#   rank<R>.pt        that rank's RNG states, augmentation generator and partial epoch sums
#   meta.json         step, epoch, position in the epoch, world size, classes, model, peak LR, W&B id
#
# Written into `step-N.tmp/` by every rank, then renamed by the main process once all ranks are
# done; `latest` (a one-line file) is replaced last. A kill at any moment leaves the previous
# checkpoint and `latest` valid; `.tmp` leftovers are ignored and cleared by the next save.

CHECKPOINTS = "checkpoints"
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run; the message says why and what to do."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_name(global_step: int, tag: str | None = None) -> str:
    """`step-00000120`, or `step-00000120-stage1` for a checkpoint taken at a stage's start (after its
    LR sweep) at the step where the previous stage's last one was: names sort in the order taken."""
    return f"step-{global_step:08d}" + (f"-{tag}" if tag else "")


def _is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.endswith(".tmp") and (path / "meta.json").is_file()


def find_latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint: the one `latest` names, else the highest complete step."""
    root = checkpoint_root(run_dir)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if _is_complete(named):
            return named
    complete = sorted(p for p in root.glob("step-*") if _is_complete(p)) if root.is_dir() else []
    return complete[-1] if complete else None


def set_aside_later(run_dir: str | Path, from_step: int | None) -> Path | None:
    """Before a run writes checkpoints: move this run dir's complete checkpoints past `from_step` (all
    of them when the run starts fresh or resumes from elsewhere) into `checkpoints/superseded-<UTC>/`.
    They belong to another timeline: left in place, pruning and the `latest` fallback would mix them
    with the new run's. Nothing is deleted. Returns the folder they went to, if any."""
    root = checkpoint_root(run_dir)
    complete = [p for p in root.glob("step-*") if _is_complete(p)] if root.is_dir() else []
    later = [p for p in complete if from_step is None or _step_of(p) > from_step]
    if not later:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = root / f"superseded-{stamp}"
    for n in range(1, 1000):  # a new folder each time, even within one second
        if not aside.exists():
            break
        aside = root / f"superseded-{stamp}-{n}"
    aside.mkdir()
    pointer = root / LATEST
    if pointer.is_file() and pointer.read_text().strip() in {p.name for p in later}:
        os.replace(pointer, aside / LATEST)
    for path in later:
        os.replace(path, aside / path.name)
    return aside


def _step_of(path: Path) -> int:
    try:
        return int(path.name.removeprefix("step-").split("-")[0])
    except ValueError:
        return 2**63  # not a name we write: set aside with the rest


def save_checkpoint(
    accelerator, run_dir: Path, global_step: int, shared: dict, rank_state: dict, meta: dict, keep_last: int, tag: str | None = None
) -> Path:
    """Collective: every rank calls it at the same step. Returns the final directory."""
    root = checkpoint_root(run_dir)
    final = root / step_name(global_step, tag)
    tmp = root / (final.name + ".tmp")
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed save
        tmp.mkdir()
    accelerator.wait_for_everyone()
    torch.save({**rank_state, "rng": rng_state()}, tmp / f"rank{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        torch.save(shared, tmp / "shared.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_dir_files(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)
        for old in sorted(p for p in root.glob("step-*") if _is_complete(p))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_dir_files(path: Path) -> None:
    for child in path.iterdir():
        with open(child, "rb") as fh:
            os.fsync(fh.fileno())


def load_checkpoint(path: Path, rank: int, world_size: int) -> tuple[dict, dict, dict]:
    """(meta, shared state, this rank's state) of a complete checkpoint, read with weights_only=True.
    Another world size is refused from meta.json alone, so every rank raises the same error."""
    if not _is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (no meta.json); use another one or checkpoint.resume=never")
    meta = json.loads((path / "meta.json").read_text())
    if meta["world_size"] != world_size:
        raise CheckpointError(
            f"{path}: saved by {meta['world_size']} processes, this run has {world_size}; resume with the same "
            "number (the data order depends on it) or start fresh with checkpoint.resume=never"
        )
    rank_file = path / f"rank{rank}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"{path}: has no state for rank {rank} (damaged?); use another checkpoint or checkpoint.resume=never")
    try:
        shared = torch.load(path / "shared.pt", map_location="cpu", weights_only=True)
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: could not be read ({err}); use another checkpoint or checkpoint.resume=never") from err
    return meta, shared, rank_state


@dataclass
class Resume:
    """A checkpoint a run continues from, as read on this rank."""

    path: Path
    meta: dict
    shared: dict
    rank_state: dict

    @classmethod
    def read(cls, path: Path, rank: int, world_size: int) -> "Resume":
        return cls(path, *load_checkpoint(path, rank, world_size))

    def check(self, model: str, classes: list[str]) -> None:
        """Refuse a checkpoint of another model or class list (every rank alike)."""
        if self.meta["classes"] != list(classes) or self.meta["model"] != model:
            raise CheckpointError(
                f"{self.path}: saved for model {self.meta['model']} with classes {self.meta['classes']}, but this run has "
                f"{model} with {list(classes)}; use another run.name or checkpoint.resume=never"
            )


# ------------------------------------------------------------------------------------------------
# Preemption: SIGUSR1 / SIGTERM only set a flag; the trainer reduces it across ranks at its next log
# point or epoch end, saves a checkpoint on every rank, and the process exits with PREEMPTED_EXIT.

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later"; the SLURM script requeues on it


class Preempted(Exception):
    """Raised on every rank after the checkpoint taken because of a preemption signal."""

    def __init__(self, checkpoint: Path):
        super().__init__(f"preempted: checkpoint saved in {checkpoint}")
        self.checkpoint = checkpoint


class PreemptionFlag:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None

    def install(self) -> "PreemptionFlag":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGUSR1, signal.SIGTERM):
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        import signal

        self.requested = True
        self.signal_name = signal.Signals(signum).name


class Checkpointer:
    """When and where the trainer saves, and what goes with it (the run's identity)."""

    def __init__(self, run_dir: Path, every_n_steps: int | None, keep_last: int, meta: dict, flag: PreemptionFlag | None = None):
        self.run_dir = Path(run_dir)
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.meta = meta
        self.flag = flag or PreemptionFlag()

    def due(self, global_step: int) -> bool:
        return self.every_n_steps is not None and global_step % self.every_n_steps == 0

    def save(self, trainer, epoch: int, steps_done: int, partial: dict | None, tag: str | None = None) -> Path:
        """Collective. `epoch`/`steps_done`: where training continues (steps_done optimizer steps of
        `epoch` are done); `partial`: this rank's sums of the unfinished epoch; `tag`: see step_name."""
        meta = {
            **self.meta,
            **({"stage": trainer.stage} if trainer.stage is not None else {}),
            "global_step": trainer.global_step,
            "epoch": epoch,
            "steps_done_in_epoch": steps_done,
            "world_size": trainer.accelerator.num_processes,
            "wandb_run_id": trainer.tracker.run_id if trainer.tracker is not None else None,
        }
        return save_checkpoint(
            trainer.accelerator, self.run_dir, trainer.global_step, trainer.shared_state(), trainer.rank_state(partial), meta,
            self.keep_last, tag,
        )
