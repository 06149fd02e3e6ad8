"""`disttrain train | find-lr | evaluate | prepare | demo-data | launch`.

    disttrain launch --multi_gpu --num_processes 2 launch/train.py --config configs/demo.yaml
    accelerate launch launch/train.py --config configs/demo.yaml [section.key=value ...]
    accelerate launch launch/train.py --config configs/demo.yaml --find-lr
    disttrain find-lr --config configs/demo.yaml
    accelerate launch -m disttrain.cli evaluate --config configs/demo.yaml --weights runs/demo/model.pt
    disttrain prepare ~/data/pets ~/data/pets-shards --presize 256 --workers 8
    disttrain demo-data ~/.cache/disttrain/mnist
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from disttrain.checkpoint import PREEMPTED_EXIT, CheckpointError, Preempted
from disttrain.config import ConfigError, load_config
from disttrain.data.folder import DataError
from disttrain.lr_sweep import SweepError
from disttrain.models import WeightsError

USER_ERRORS = (ConfigError, DataError, WeightsError, SweepError, CheckpointError, FileExistsError)


def _config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", help="YAML run config (configs/*.yaml); defaults apply without one")
    parser.usage = f"{parser.prog} [options] [section.key=value ...]"
    parser.epilog = "Config overrides go anywhere on the line as section.key=value, e.g. optim.lr=3e-3."
    return parser


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Options anywhere on the line; every other word is a `section.key=value` override."""
    args, rest = parser.parse_known_args(argv)
    unknown = [word for word in rest if word.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = rest
    return args


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description="Train an image classifier on one or many processes.")
    _config_args(parser)
    parser.add_argument("--find-lr", action="store_true", help="run only the synchronized LR sweep, then exit")
    return parser


def train(cfg, find_lr_only: bool = False) -> list:
    """The run (disttrain/run.py): resume or start, the stages, save."""
    from disttrain.run import train as run

    return run(cfg, find_lr_only)


def evaluate(cfg, weights: str, out: str | None) -> dict:
    """Exact validation of saved weights on `data.valid_dir`, on however many processes run it."""
    from disttrain.build import build_augment, build_loaders, load_data
    from disttrain.checkpoint import load_weights
    from disttrain.models import build_model, normalization
    from disttrain.runtime import build_accelerator
    from disttrain.tracking import ConsoleReporter
    from disttrain.trainer import evaluate as run_eval

    accelerator = build_accelerator(cfg)
    reporter = ConsoleReporter(accelerator.is_main_process, progress=False)
    data = load_data(cfg, accelerator, reporter)
    state = load_weights(weights)
    if state["classes"] != data.classes:
        raise WeightsError(f"{weights}: trained on classes {state['classes']}, but {cfg.data.root} has {data.classes}")
    model = build_model(dataclasses.replace(cfg.model, pretrained=None), num_classes=len(data.classes))
    model.load_state_dict(state["model"])
    model = accelerator.prepare_model(model, evaluation_mode=True)
    _, valid_loader = build_loaders(cfg, data, accelerator)
    saved = state.get("normalize")  # what the weights were trained with, else what the config resolves to
    mean, std, _ = (saved["mean"], saved["std"], "") if saved else normalization(cfg.model, cfg.augment)
    result = run_eval(accelerator, model, valid_loader, build_augment(cfg, accelerator, mean, std))
    summary = {**vars(result), "world_size": accelerator.num_processes}
    reporter.line(f"valid_loss {result.loss:.6f}  accuracy {result.accuracy:.6f}  ({result.correct}/{result.count})")
    if out and accelerator.is_main_process:
        Path(out).write_text(json.dumps(summary, indent=1))
    accelerator.end_training()
    return summary


def prepare(args: argparse.Namespace) -> dict:
    from disttrain.data.prepare import PrepareSettings
    from disttrain.data.prepare import prepare as write_shards

    settings = PrepareSettings(args.samples_per_shard, args.presize, args.quality, args.seed, args.train_dir, args.valid_dir)
    return write_shards(args.src, args.dst, settings, workers=args.workers, force=args.force, progress=not args.no_progress)


def run_user_errors(fn) -> int:
    """Run `fn()`; a mistake the user can fix prints one clear line and exits 2 (no traceback).
    Under `disttrain launch` the line goes to the front, which prints it once for all ranks."""
    from disttrain.launcher import report_to_front

    try:
        fn()
    except USER_ERRORS as err:
        if not report_to_front("user", str(err)):
            print(f"disttrain: error: {err}", file=sys.stderr, flush=True)
        _leave_process_group()
        return 2
    except Preempted as stop:
        line = f"{stop}; exiting with {PREEMPTED_EXIT} so the job can be requeued and resumed"
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


def command_parser() -> argparse.ArgumentParser:
    """`disttrain <command>`'s parser (`launch` is handled before it: its options are Accelerate's)."""
    parser = argparse.ArgumentParser(prog="disttrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _config_args(sub.add_parser("train", help="train (same as launch/train.py)"))
    _config_args(sub.add_parser("find-lr", help="only the LR sweep (same as launch/train.py --find-lr)"))
    ev = sub.add_parser("evaluate", help="exact validation of saved weights")
    _config_args(ev)
    ev.add_argument("--weights", required=True, help="model.pt written by a training run")
    ev.add_argument("--out", help="also write the result as JSON here")
    prep = sub.add_parser("prepare", help="image folder -> webdataset tar shards + manifest.json (data.format=shards)")
    prep.add_argument("src", help="image folder with train/<class>/* and valid/ or val/<class>/*")
    prep.add_argument("dst", help="output folder for the shards and manifest.json")
    prep.add_argument("--samples-per-shard", type=int, default=1000, help="target samples per shard (default 1000)")
    prep.add_argument("--presize", type=int, default=256, help="shorter side of the stored JPEGs (default 256)")
    prep.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    prep.add_argument("--workers", type=int, default=None, help="writer processes (default: all cores)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the shuffle that fills the shards")
    prep.add_argument("--train-dir", default="train")
    prep.add_argument("--valid-dir", default="auto", help="validation folder; auto: valid/ or else val/")
    prep.add_argument("--force", action="store_true", help="rewrite a finished or different output")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo = sub.add_parser("demo-data", help="write the bundled MNIST sample as PNG folders")
    demo.add_argument("path")
    demo.add_argument("--train-per-class", type=int, default=400)
    demo.add_argument("--valid-per-class", type=int, default=100)
    sub.add_parser("launch", help="accelerate launch, with the config checked first and one line per failure (disttrain launch --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:
        from disttrain.launcher import main as launch

        return launch(argv[1:])
    parser = command_parser()
    args = parse_with_overrides(parser, argv)
    if args.overrides and args.command not in ("train", "find-lr", "evaluate"):
        parser.error(f"unrecognized arguments: {' '.join(args.overrides)}")

    if args.command in ("train", "find-lr"):
        return run_user_errors(lambda: train(load_config(args.config, args.overrides), args.command == "find-lr"))
    if args.command == "evaluate":
        return run_user_errors(lambda: evaluate(load_config(args.config, args.overrides), args.weights, args.out))
    if args.command == "prepare":
        return run_user_errors(lambda: prepare(args))
    from disttrain.demo_data import write_demo_data

    def demo_data() -> None:
        print(write_demo_data(args.path, args.train_per_class, args.valid_per_class))

    return run_user_errors(demo_data)


if __name__ == "__main__":
    sys.exit(main())
