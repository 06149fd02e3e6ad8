"""Weights files and training checkpoints, written atomically (temp file or directory, fsync, rename,
fsync of the folder): a crash of the process or of the node never leaves a half-written file under a
final name."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from disttrain import durable
from disttrain.models.build import WeightsError
from disttrain.dist.jobgroup import JobGroup
from disttrain.dist.runtime import rng_state
from disttrain.errors import UserError
from disttrain.train.monitor import direction


def atomic_save(obj: object, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    durable.replace(tmp, path)
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
#   meta.json         step, epoch, position in the epoch, world size, classes, samples per split, model, peak LR, W&B id
#
# Written into `step-N.tmp/` by every rank, synced, then renamed by the main process once all ranks
# are done; `latest` (a one-line file) is replaced last. The ranks wait for each other on the job's
# own group (disttrain/dist/jobgroup.py), without train.collective_timeout: a large model's save on a slow
# filesystem takes as long as it takes. A kill at any moment leaves the previous checkpoint and
# `latest` valid; `.tmp` leftovers are ignored, and cleared when the next run starts
# (`clear_leftovers`).
#
# checkpoint.keep_best: checkpoints/best/<name>/ holds the N best epoch-end checkpoints by
# checkpoint.monitor (hard links to the files of the checkpoint, or copies), and best/index.json
# lists them best first. Pruning, `latest` and find_latest see only checkpoints/step-*: best/ is
# outside their reach.

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
BEST_INDEX = "index.json"


class CheckpointError(UserError):
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
    with the new run's. The same for the best checkpoints (checkpoints/best/) past `from_step`: they
    go to `superseded-<UTC>/best/` with an index.json of their own, and the run's best list goes on
    with the others. Nothing is deleted. Returns the folder they went to, if any."""
    root = checkpoint_root(run_dir)
    complete = [p for p in root.glob("step-*") if _is_complete(p)] if root.is_dir() else []
    later = [p for p in complete if from_step is None or _step_of(p) > from_step]
    best = read_best_index(run_dir)
    best_later = [e for e in best if from_step is None or _step_of(Path(e["name"])) > from_step]
    if not later and not best_later:
        return None
    aside = durable.superseded_folder(root)
    pointer = root / LATEST
    if pointer.is_file() and pointer.read_text().strip() in {p.name for p in later}:
        os.replace(pointer, aside / LATEST)
    for path in later:
        os.replace(path, aside / path.name)
    if best_later:
        (aside / BEST).mkdir()
        for entry in best_later:
            if (root / BEST / entry["name"]).exists():
                os.replace(root / BEST / entry["name"], aside / BEST / entry["name"])
        durable.write_text(aside / BEST / BEST_INDEX, json.dumps(best_later, indent=1))
        durable.write_text(root / BEST / BEST_INDEX, json.dumps([e for e in best if e not in best_later], indent=1))
    return aside


def read_best_index(run_dir: str | Path) -> list[dict]:
    """checkpoints/best/index.json: the kept best checkpoints, best first, as
    [{name, epoch, monitor, value}]; [] when there is none."""
    path = checkpoint_root(run_dir) / BEST / BEST_INDEX
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())
        return [{"name": str(e["name"]), "epoch": int(e["epoch"]), "monitor": str(e["monitor"]), "value": float(e["value"])}
                for e in entries]
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(
            f"{path}: not a list of best checkpoints ({err}); move the folder {path.parent} out of the way "
            "(the run then starts a new best list)"
        ) from err


def _keep_copy(src: Path, dst: Path) -> None:
    """The checkpoint `src` as `dst`, durably: its files hard-linked (no space taken, and the
    pruning of `src` leaves them), or copied where the filesystem has no hard links or `dst` is on
    another one; written as `dst.tmp`, synced, then renamed: the name is its complete marker."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed save_best
    tmp.mkdir(parents=True)
    for child in sorted(src.iterdir()):
        if child.is_file():
            try:
                os.link(child, tmp / child.name)
            except OSError:
                shutil.copyfile(child, tmp / child.name)
    _fsync_dir_files(tmp)
    if dst.exists():  # the same checkpoint ranked again
        shutil.rmtree(dst)
    durable.replace(tmp, dst)


_ATOMIC_TMP = re.compile(r"^\..+\.tmp\d+$")  # atomic_save's temporary names


def clear_leftovers(run_dir: str | Path) -> list[str]:
    """At start-up, on the main process, before the run writes anything: remove what killed saves
    left in the run dir: `*.tmp` directories and files in its checkpoints folder (a checkpoint being
    written, at any step or stage, and the `latest` pointer's temporary file) and atomic_save's
    temporary files (model.pt's) in the run dir and the checkpoints folder; in checkpoints/best/,
    the same `*.tmp` and the folders its index.json does not list (a save_best killed between its
    copy and its index, or before deleting the one that dropped out). Returns their names."""
    run_dir = Path(run_dir)
    root = checkpoint_root(run_dir)
    found = list(root.glob("*.tmp")) if root.is_dir() else []
    best = root / BEST
    if best.is_dir():
        listed = {entry["name"] for entry in read_best_index(run_dir)}
        found += [p for p in best.iterdir() if p.name.endswith(".tmp") or (p.is_dir() and p.name not in listed)]
    found += [p for folder in (run_dir, root) if folder.is_dir() for p in folder.iterdir() if _ATOMIC_TMP.match(p.name)]
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return sorted(str(p.relative_to(run_dir)) for p in found)


def _step_of(path: Path) -> int:
    try:
        return int(path.name.removeprefix("step-").split("-")[0])
    except ValueError:
        return 2**63  # not a name we write: set aside with the rest


def save_checkpoint(
    group: "JobGroup", run_dir: Path, global_step: int, shared: dict, rank_state: dict, meta: dict, keep_last: int,
    tag: str | None = None,
) -> Path:
    """Collective: every rank calls it at the same step. The ranks wait for each other on `group`
    (the job's own, without a collective timeout: the main process's share of a save can take
    longer than train.collective_timeout). Returns the final directory."""
    root = checkpoint_root(run_dir)
    final = root / step_name(global_step, tag)
    tmp = root / (final.name + ".tmp")
    if group.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed save
        tmp.mkdir()
    group.barrier()
    torch.save({**rank_state, "rng": rng_state()}, tmp / f"rank{group.rank}.pt")
    if group.is_main:
        torch.save(shared, tmp / "shared.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    group.barrier()
    if group.is_main:
        _fsync_dir_files(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(final.name + "\n")
        durable.replace(pointer, root / LATEST)  # syncs `root`: the checkpoint's rename too
        for old in sorted(p for p in root.glob("step-*") if _is_complete(p))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    group.barrier()
    return final


def _fsync_dir_files(path: Path) -> None:
    """Every file of the checkpoint directory `path` on disk, and the directory's entries."""
    for child in path.iterdir():
        durable.fsync(child)
    durable.fsync(path)


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

    def check(self, model: str, classes: list[str], samples: dict[str, int]) -> None:
        """Refuse a checkpoint of another model or class list, or one saved when the data held another
        number of samples in a split (`samples`: split -> count, build.data_identity): the sample
        order, each rank's share and the schedule's length follow from those counts. Decided from
        meta.json and the data every rank shares, so every rank raises alike, before training. A
        checkpoint written before the counts were recorded is not checked for them."""
        if self.meta["classes"] != list(classes) or self.meta["model"] != model:
            raise CheckpointError(
                f"{self.path}: saved for model {self.meta['model']} with classes {self.meta['classes']}, but this run has "
                f"{model} with {list(classes)}; use another run.name or checkpoint.resume=never"
            )
        for split, before in self.meta.get("samples", {}).items():
            if samples.get(split) != before:
                raise CheckpointError(
                    f"{self.path}: the data changed since this checkpoint: its {split} split had {before} samples then and has "
                    f"{samples.get(split)} now; resume on the data it was saved with, or start fresh with checkpoint.resume=never"
                )


# ------------------------------------------------------------------------------------------------
# Preemption: SIGUSR1 / SIGTERM only set a flag, from the run's first line on (run.train). The ranks
# reduce it at fixed points: before training (after the data scan, after entering a stage, i.e. its
# precompute, at every step of an LR sweep, before fit) and in training at each log point and epoch
# end. There every rank stops alike: in training after a checkpoint, before it with nothing to save;
# the process exits with PREEMPTED_EXIT.

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later"; the SLURM script requeues on it


class Preempted(Exception):
    """Raised on every rank at the same point once a preemption signal reached any rank: after the
    checkpoint it saved (`saved`), or where there is nothing to save: before the run's first
    checkpoint (`checkpoint` None: the requeued job starts again), or with nothing done since
    `checkpoint` (the requeued job resumes from it). `where`: the point, before training."""

    def __init__(self, checkpoint: Path | None, saved: bool = True, where: str = ""):
        if checkpoint is None:
            text = f"preempted {where}, before the first checkpoint: nothing to save yet"
        elif saved:
            text = f"preempted: checkpoint saved in {checkpoint}"
        else:
            text = f"preempted {where}: nothing to save since checkpoint {checkpoint}"
        super().__init__(" ".join(text.split()))
        self.checkpoint = checkpoint


class PreemptionFlag:
    """Set by SIGUSR1 (SLURM's warning before the time limit, forwarded to every process of the job
    step by launch/slurm/train.sbatch) or SIGTERM; read by the ranks together (`anywhere`)."""

    def __init__(self) -> None:
        self._set = threading.Event()
        self.signal_name: str | None = None
        self._installed = False

    @property
    def requested(self) -> bool:
        """This process got the signal (only `anywhere` tells every rank the same)."""
        return self._set.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the signal has come (or `timeout` seconds); whether it has."""
        return self._set.wait(timeout)

    def install(self) -> "PreemptionFlag":
        """From now on SIGUSR1 and SIGTERM set the flag instead of ending the process (also where
        the process inherited "ignore": the sbatch script's launcher ignores USR1). Called first thing
        by run.train, on the main thread; once is enough.

        SIGUSR1 is also blocked on this thread, so every thread and process started from here on
        inherits it blocked: the data loaders' fork server and workers, W&B's service. SLURM signals
        every process of the step: they would otherwise die of it (its default action). A thread of
        the flag's own takes it (sigwait), also one that came while it was blocked before (from
        launch/train.py's start, while the modules load), and sets the flag at once, also while the
        main thread waits inside a long collective. A thread that was started before USR1 was blocked
        may still take it: the handler then sets the flag when the main thread runs Python again."""
        if self._installed or threading.current_thread() is not threading.main_thread():
            return self
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # (launch/train.py blocks it before its imports)
        threading.Thread(target=self._take_usr1, name="disttrain-preemption", daemon=True).start()  # takes a pending one too
        for sig in (signal.SIGUSR1, signal.SIGTERM):  # USR1: for threads started before it was blocked
            signal.signal(sig, self._handle)
        self._installed = True
        return self

    def anywhere(self, group: "JobGroup") -> bool:
        """Collective (every rank at the same point): whether any rank got the signal."""
        return bool(group.sum(torch.tensor([float(self.requested)]))[0] > 0)

    def _take_usr1(self) -> None:
        while True:
            self._handle(signal.sigwait({signal.SIGUSR1}), None)

    def _handle(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name
        self._set.set()


def stop_if_preempted(flag: PreemptionFlag | None, group: "JobGroup", last: Path | None, where: str) -> None:
    """Collective, before training: every rank raises Preempted (nothing to save: `last`, the
    checkpoint that holds the run's state, if any) when any rank got the signal."""
    if flag is not None and flag.anywhere(group):
        raise Preempted(last, saved=False, where=where)


class Checkpointer:
    """When and where the trainer saves, and what goes with it (the run's identity); `last` is the
    checkpoint that holds the run's state (the one resumed from, then each one saved)."""

    def __init__(self, run_dir: Path, every_n_steps: int | None, keep_last: int, meta: dict, group: JobGroup,
                 flag: PreemptionFlag | None = None, keep_best: int = 0, monitor: str = "valid_loss"):
        self.run_dir = Path(run_dir)
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.meta = meta
        self.group = group  # the saves' barriers wait on it
        self.flag = flag or PreemptionFlag()
        self.last: Path | None = None
        self.keep_best = keep_best  # checkpoint.keep_best: 0 keeps none
        self.monitor = monitor  # checkpoint.monitor; a loss ranks lowest first, the rest highest first
        self._best: list[dict] | None = None  # best first; read from best/index.json when first needed
        self._best_aside = False  # that index ranks by another monitor: set aside at the first save_best
        self._best_saves = 0

    def resumed_from(self, path: Path) -> None:
        """The run continues from the checkpoint at `path`: it holds the run's state until the next save."""
        self.last = path

    def record(self, key: str, value) -> None:
        """`value` goes into the meta of every checkpoint saved from now on, as `key` (the last LR
        sweep's outcome: a resume does not sweep again)."""
        self.meta[key] = value

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
        self.last = save_checkpoint(
            self.group, self.run_dir, trainer.global_step, trainer.shared_state(), trainer.rank_state(partial), meta,
            self.keep_last, tag,
        )
        return self.last

    @property
    def best_dir(self) -> Path:
        return checkpoint_root(self.run_dir) / BEST

    def best(self) -> list[dict]:
        """The kept best checkpoints, best first: [{name, epoch, monitor, value}]. A resumed run
        continues the list of best/index.json, read at the first call (after run.train has set
        aside what it does not continue); a list ranked by another monitor is not continued."""
        if self._best is None:
            entries = read_best_index(self.run_dir) if self.keep_best else []
            self._best_aside = any(e["monitor"] != self.monitor for e in entries)
            self._best = [] if self._best_aside else [e for e in entries if _is_complete(self.best_dir / e["name"])]
        return list(self._best)

    def best_path(self) -> Path | None:
        """The best checkpoint kept (train.final=best takes its weights), or None."""
        best = self.best()
        return self.best_dir / best[0]["name"] if best else None

    def save_best(self, path: Path, epoch: int, value: float) -> Path | None:
        """Collective, right after an epoch-end save: `path` is that checkpoint, `value` its
        checkpoint.monitor figure (all-reduced: the same on every rank, so every rank ranks alike).
        When it is among the keep_best best so far (a tie ranks after the earlier one; NaN never
        ranks), the main process keeps it as best/<its name>, writes best/index.json and deletes the
        one that dropped out, in that order: a kill at any moment leaves the index naming complete
        folders (clear_leftovers removes the rest). Returns the kept copy, or None."""
        if not self.keep_best:
            return None
        path, value = Path(path), float(value)
        before = self.best()
        if self._best_saves == 0:
            self.group.barrier()  # every rank has read the index before the main process changes it
        self._best_saves += 1
        entry = {"name": path.name, "epoch": int(epoch), "monitor": self.monitor, "value": value}
        ranked = [e for e in before if e["name"] != path.name]
        if not math.isnan(value):
            sign = 1.0 if direction(self.monitor) == "min" else -1.0
            ranked = sorted(ranked + [entry], key=lambda e: sign * e["value"])  # stable: a tie keeps the earlier first
        kept = ranked[: self.keep_best]
        if self.group.is_main:
            if self._best_aside and self.best_dir.is_dir():
                durable.replace(self.best_dir, durable.superseded_folder(checkpoint_root(self.run_dir)) / BEST)
            if entry in kept:
                _keep_copy(path, self.best_dir / path.name)
            if kept != before or self._best_aside:
                self.best_dir.mkdir(parents=True, exist_ok=True)
                durable.write_text(self.best_dir / BEST_INDEX, json.dumps(kept, indent=1))
            out = ({e["name"] for e in before} | {path.name}) - {e["name"] for e in kept}  # (this one too, if kept before)
            for name in sorted(out):
                shutil.rmtree(self.best_dir / name, ignore_errors=True)
        self._best_aside = False
        self._best = kept
        self.group.barrier()
        return self.best_dir / path.name if entry in kept else None
