"""The `disttrain` command: each command's checks of its options, then the part of disttrain that does
it; a user error becomes one line and exit code 2 (see disttrain/cli/parsers.py for the commands)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from disttrain.cli.launch import main as launch
from disttrain.cli.launch import report_to_front
from disttrain.cli.parsers import command_parser, parse_with_overrides, split_weights
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
    from disttrain.use.evaluate import EvaluateOptions, parse_threshold, run
    from disttrain.use.inputs import parse_extensions

    _check_inference_args(args, "result.json")
    _check_out_dir(args.out_dir)
    _check_out_dir(args.interpret, "--interpret")
    if args.interpret_k < 1:
        raise ConfigError(f"--interpret-k: must be at least 1 (images per grid), got {args.interpret_k}")
    extensions = parse_extensions(args.ext)
    threshold = parse_threshold(args.threshold)
    weights, config = _run_files(args) if args.run is not None else (args.weights, args.config)
    if weights is None:
        raise ConfigError("--weights: give the model.pt to evaluate (or --run RUN_DIR: a run's model.pt on its own validation images)")
    cfg = load_config(config, args.overrides)
    options = EvaluateOptions(weights, args.data, args.split, args.out, args.out_dir, args.tta_n if args.tta else 0, args.tta_beta,
                              args.tta_max, args.batch_size, extensions, interpret=args.interpret, interpret_k=args.interpret_k,
                              run=args.run, threshold=threshold)
    return run(cfg, options)


def _run_files(args: argparse.Namespace) -> tuple[str, str]:
    """`evaluate --run RUN_DIR`: (the weights: --weights or RUN_DIR/model.pt, RUN_DIR/config.yaml)."""
    run_dir = Path(args.run).expanduser()
    for option, value in (("--config", args.config), ("--data", args.data), ("--split", args.split)):
        if value is not None:
            raise ConfigError(f"--run {args.run} and {option} {value}: --run evaluates on the run's own validation images with its "
                              f"config.yaml; give one or the other")
    if not run_dir.is_dir():
        raise ConfigError(f"--run {args.run}: no such folder; give the run dir a training run wrote (run.output_dir/run.name)")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--run {args.run}: no config.yaml in it, so not a run dir a training run wrote (run.output_dir/run.name)")
    if args.weights is not None:
        return args.weights, str(run_dir / "config.yaml")
    if not (run_dir / "model.pt").is_file():
        raise ConfigError(f"--run {args.run}: no model.pt in it (a run writes it when it finishes); finish or resume the run, "
                          "or give --weights")
    return str(run_dir / "model.pt"), str(run_dir / "config.yaml")


def predict(args: argparse.Namespace):
    """Class probabilities for files and folders (disttrain/use/predict.py)."""
    from disttrain.use.inputs import parse_extensions
    from disttrain.use.predict import PredictOptions, run

    _check_inference_args(args, "predictions.csv")
    if args.topk is not None and args.topk < 1:
        raise ConfigError(f"--topk: must be at least 1 (classes listed per image), got {args.topk}")
    if args.topk is not None and args.format != "csv":
        raise ConfigError(f"--topk: writes its own rows (path, rank, class, probability); not with --format {args.format}")
    if args.threshold is not None and not 0 < args.threshold < 1:
        raise ConfigError(f"--threshold: must be between 0 and 1 (a tag's probability is compared with it), got {args.threshold}")
    if args.workers < 0:
        raise ConfigError(f"--workers: must be 0 (decode in each process) or more, got {args.workers}")
    weights = args.weights[0] if len(args.weights) == 1 else args.weights
    options = PredictOptions(weights, args.inputs, args.out, args.topk, args.tta_n if args.tta else 0, args.tta_beta, args.tta_max,
                             args.batch_size, args.workers, args.precision, parse_extensions(args.ext), format=args.format,
                             threshold=args.threshold)
    return run(options)


def export(args: argparse.Namespace):
    """A model.pt as a verified ONNX or TorchScript file (disttrain/use/export.py)."""
    from disttrain.use.export import export as write

    _check_out_file(args.out, "model.onnx" if args.format == "onnx" else "model.ts")
    return write(args.weights, args.format, args.out, args.dynamic_batch, args.batch_size)


def average(args: argparse.Namespace) -> None:
    """The mean of several checkpoints' or model files' weights as one model.pt (disttrain/use/average.py)."""
    from disttrain.train.checkpoint import save_weights
    from disttrain.use.average import DEFAULT_BN_BATCHES, average_models

    _check_out_file(args.out, "model.pt")
    if args.bn_batches is not None and args.bn != "recompute":
        raise ConfigError(f"--bn-batches {args.bn_batches}: only with --bn recompute (--bn {args.bn} computes no batch)")
    if args.bn_batches is not None and args.bn_batches < 1:
        raise ConfigError(f"--bn-batches: must be at least 1 (training batches to recompute the statistics on), got {args.bn_batches}")
    if args.bn == "recompute" and args.config is None:
        raise ConfigError("--bn recompute: needs --config (the run's config.yaml: its training images)")
    cfg = load_config(args.config) if args.config is not None else None
    done = average_models(args.checkpoints, args.bn, cfg, args.bn_batches or DEFAULT_BN_BATCHES)
    save_weights(args.out, done.weights, done.classes, done.arch, **done.info)
    named = ", ".join(str(path) for path in done.inputs)
    print(f"averaged {len(done.inputs)} checkpoints ({named}) -> {args.out}; BatchNorm statistics: {done.batchnorm}", flush=True)


def prepare(args: argparse.Namespace) -> dict:
    """Shards from any source (disttrain/data/prepare.py): the source's data.* keys come as overrides."""
    from disttrain.config import parse_overrides
    from disttrain.config.parse import build_config_unchecked
    from disttrain.data.prepare import SOURCE_KEYS, PrepareSettings
    from disttrain.data.prepare import prepare as write_shards

    if any(path.startswith("data.") and "=" in path for path in (args.src, args.dst)):
        raise ConfigError(f"prepare {args.src} {args.dst}: SRC and DST come first, then the data.key=value settings")
    given = dict(parse_overrides(args.overrides))
    taken = [f"data.{key}" for key in (*SOURCE_KEYS, "train_dir", "valid_dir")]
    for key in given:
        if key not in taken:
            where = "SRC is the data root" if key == "data.root" else "the shard settings are its options (--presize, --quality, ...)"
            raise ConfigError(f"{key}: disttrain prepare takes only the source's data.* keys ({', '.join(taken)}); {where}")
    data = build_config_unchecked(None, args.overrides).data
    dirs = {}
    for option, key, value in (("--train-dir", "data.train_dir", args.train_dir), ("--valid-dir", "data.valid_dir", args.valid_dir)):
        if value is not None and key in given and given[key] != value:
            raise ConfigError(f"{option} {value} and {key}={given[key]}: both set; give one")
        dirs[key] = value if value is not None else getattr(data, key.split(".")[1])
    settings = PrepareSettings(args.samples_per_shard, args.presize, args.quality, args.seed,
                               dirs["data.train_dir"], dirs["data.valid_dir"])
    return write_shards(args.src, args.dst, settings, workers=args.workers, force=args.force, progress=not args.no_progress, source=data)


def inspect_source(args: argparse.Namespace) -> None:
    """A look at the data before training (disttrain/data/inspect.py): the source listed as training
    lists it, image headers only, on this one process."""
    from disttrain.data.inspect import describe, inspect_data, plot_inspection, write_json

    if args.sample < 0:
        raise ConfigError(f"--sample: must be 0 (every file) or more, got {args.sample}")
    _check_out_file(args.json, "inspect.json", "--json")
    _check_out_dir(args.out, "--out")
    words = [args.data, *args.overrides]  # DATA may come after an override: argparse takes the first word
    roots = [w for w in words if "=" not in w or Path(w).expanduser().exists()]
    if len(roots) != 1:
        given = " ".join(roots) or "none"
        raise ConfigError(f"disttrain inspect takes one DATA folder and section.key=value overrides; DATA given: {given}")
    overrides = [w for w in words if w not in roots] + [f"data.root={roots[0]}"]
    if args.labels is not None:
        overrides.append(f"data.labels={args.labels}")
    found = inspect_data(load_config(args.config, overrides).data, args.sample)
    print("\n".join(describe(found)), flush=True)
    if args.json is not None:
        print(f"wrote {write_json(found, Path(args.json).expanduser())}")
    if args.out is not None:
        print("wrote " + ", ".join(str(p) for p in plot_inspection(found, Path(args.out).expanduser())))


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
        args.weights, given_after = split_weights(args.weights)
        args.inputs = [*args.inputs, *given_after]
        if not args.inputs:
            parser.error("the following arguments are required: INPUT")
        return run_user_errors(lambda: predict(args))
    if args.overrides and args.command not in ("train", "find-lr", "evaluate", "inspect", "prepare"):
        parser.error(f"unrecognized arguments: {' '.join(args.overrides)}")

    if args.command in ("train", "find-lr"):
        return run_user_errors(lambda: train(load_config(args.config, args.overrides), args.command == "find-lr"))
    if args.command == "evaluate":
        return run_user_errors(lambda: evaluate(args))
    if args.command == "prepare":
        return run_user_errors(lambda: prepare(args))
    if args.command == "export":
        return run_user_errors(lambda: export(args))
    if args.command == "average":
        return run_user_errors(lambda: average(args))
    if args.command == "inspect":
        return run_user_errors(lambda: inspect_source(args))
    from disttrain.data.demo import write_demo_data

    def demo_data() -> None:
        print(write_demo_data(args.path, args.train_per_class, args.valid_per_class,
                              layout=args.layout, multi_label=args.multi_label, count=args.count))

    return run_user_errors(demo_data)

