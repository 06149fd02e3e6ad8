"""The `disttrain` command: each command's checks of its options, then the part of disttrain that does
it; a user error becomes one line and exit code 2 (see disttrain/cli/parsers.py for the commands)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from disttrain.cli.launch import main as launch
from disttrain.cli.launch import report_to_front
from disttrain.cli.parsers import command_parser, parse_with_overrides
from disttrain.train.checkpoint import PREEMPTED_EXIT, Preempted
from disttrain.config import ConfigError
from disttrain.models.checks import load_config
from disttrain.data.loader import LoaderStalled
from disttrain.train.lr_sweep import SweepError
from disttrain.errors import UserError

USER_ERRORS = (UserError, SweepError, FileExistsError)
"""What a user fixes: ConfigError, DataError, WeightsError, CheckpointError (all UserErrors), a sweep that
found no rate, an output that exists."""


def train(cfg, find_lr_only: bool = False) -> list:
    """The run (disttrain/train/run.py): resume or start, the stages, save."""
    from disttrain.train.run import train as run

    return run(cfg, find_lr_only)


def _check_out_file(path: str | None, example: str, option: str = "--out") -> None:
    """An output file in a folder that exists and can be written (checked before any work)."""
    if path is None:
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; give a file name, e.g. {Path(path) / example}")
    folder = target.parent
    if not folder.is_dir():
        raise ConfigError(f"{option} {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: the folder {folder} is not writable")


def _check_out_dir(path: str | None, option: str = "--out-dir") -> None:
    """An output folder that is one or can be made (its nearest existing parent writable)."""
    if path is None:
        return
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{option} {path}: is a file, not a folder")
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: {existing} is not a folder this process can write")


def _check_inference_args(args: argparse.Namespace, example: str) -> None:
    """The options predict and evaluate share, before any model or data is loaded: one line each."""
    from disttrain.models.forward import check_tta

    check_tta(args.tta_n, args.tta_beta)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be at least 1, got {args.batch_size}")
    _check_out_file(args.out, example)


def evaluate(args: argparse.Namespace) -> dict:
    """Exact evaluation of a model.pt on a labelled folder (disttrain/use/evaluate.py), on however many
    processes run it."""
    from disttrain.use.evaluate import EvaluateOptions, run
    from disttrain.use.inputs import parse_extensions

    _check_inference_args(args, "result.json")
    _check_out_dir(args.out_dir)
    _check_out_dir(args.interpret, "--interpret")
    if args.interpret_k < 1:
        raise ConfigError(f"--interpret-k: must be at least 1 (images per grid), got {args.interpret_k}")
    extensions = parse_extensions(args.ext)
    cfg = load_config(args.config, args.overrides)
    options = EvaluateOptions(args.weights, args.data, args.split, args.out, args.out_dir, args.tta_n if args.tta else 0, args.tta_beta,
                              args.tta_max, args.batch_size, extensions, interpret=args.interpret, interpret_k=args.interpret_k)
    return run(cfg, options)


def predict(args: argparse.Namespace):
    """Class probabilities for files and folders (disttrain/use/predict.py)."""
    from disttrain.use.inputs import parse_extensions
    from disttrain.use.predict import PredictOptions, run

    _check_inference_args(args, "predictions.csv")
    if args.topk is not None and args.topk < 1:
        raise ConfigError(f"--topk: must be at least 1 (classes listed per image), got {args.topk}")
    if args.workers < 0:
        raise ConfigError(f"--workers: must be 0 (decode in each process) or more, got {args.workers}")
    options = PredictOptions(args.weights, args.inputs, args.out, args.topk, args.tta_n if args.tta else 0, args.tta_beta, args.tta_max,
                             args.batch_size, args.workers, args.precision, parse_extensions(args.ext))
    return run(options)


def export(args: argparse.Namespace):
    """A model.pt as a verified ONNX or TorchScript file (disttrain/use/export.py)."""
    from disttrain.use.export import export as write

    _check_out_file(args.out, "model.onnx" if args.format == "onnx" else "model.ts")
    return write(args.weights, args.format, args.out, args.dynamic_batch, args.batch_size)


def prepare(args: argparse.Namespace) -> dict:
    from disttrain.data.prepare import PrepareSettings
    from disttrain.data.prepare import prepare as write_shards

    settings = PrepareSettings(args.samples_per_shard, args.presize, args.quality, args.seed, args.train_dir, args.valid_dir)
    return write_shards(args.src, args.dst, settings, workers=args.workers, force=args.force, progress=not args.no_progress)


def run_user_errors(fn) -> int:
    """Run `fn()`; a mistake the user can fix prints one clear line and exits 2 (no traceback); a
    stalled data loader one line and exits 1. Under `disttrain launch` the line goes to the front,
    which prints it once for all ranks."""
    try:
        fn()
    except USER_ERRORS as err:
        if not report_to_front("user", str(err)):
            print(f"disttrain: error: {err}", file=sys.stderr, flush=True)
        _leave_process_group()
        return 2
    except LoaderStalled as err:  # not the user's mistake, but one line says all there is to say
        if not report_to_front("failure", str(err)):
            print(f"disttrain: error: {err}", file=sys.stderr, flush=True)
        _leave_process_group()
        return 1
    except Preempted as stop:
        then = "start again" if stop.checkpoint is None else "resumed"
        line = f"{stop}; exiting with {PREEMPTED_EXIT} so the job can be requeued and {then}"
        if not report_to_front("preempted", line):
            print(f"disttrain: {line}", file=sys.stderr, flush=True)
        _ignore_stop_signals()
        _leave_process_group()
        return PREEMPTED_EXIT
    return 0


def _ignore_stop_signals() -> None:
    """The checkpoint is saved: the SIGTERM the launcher sends the other ranks once one has exited
    must not turn this rank's exit 75 into death by SIGTERM (Python restores the default handler
    during shutdown; an "ignore" survives it). The launcher's SIGKILL still ends a rank that hangs."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _leave_process_group() -> None:
    """Close this rank's process group before exiting with a code: left to interpreter teardown,
    gloo's threads can abort the process ("terminate called without an active exception",
    SIGABRT) when a peer that also stopped has closed its connections first."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:
        return launch(argv[1:])
    parser = command_parser()
    args = parse_with_overrides(parser, argv)
    if args.command == "predict":
        if args.overrides:
            parser.error(f"unrecognized arguments: {' '.join(args.overrides)}")
        return run_user_errors(lambda: predict(args))
    if args.overrides and args.command not in ("train", "find-lr", "evaluate"):
        parser.error(f"unrecognized arguments: {' '.join(args.overrides)}")

    if args.command in ("train", "find-lr"):
        return run_user_errors(lambda: train(load_config(args.config, args.overrides), args.command == "find-lr"))
    if args.command == "evaluate":
        return run_user_errors(lambda: evaluate(args))
    if args.command == "prepare":
        return run_user_errors(lambda: prepare(args))
    if args.command == "export":
        return run_user_errors(lambda: export(args))
    from disttrain.data.demo import write_demo_data

    def demo_data() -> None:
        print(write_demo_data(args.path, args.train_per_class, args.valid_per_class))

    return run_user_errors(demo_data)

