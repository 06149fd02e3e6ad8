"""`disttrain train | find-lr | evaluate | predict | prepare | demo-data | launch`.

    disttrain launch --multi_gpu --num_processes 2 launch/train.py --config configs/demo.yaml
    accelerate launch launch/train.py --config configs/demo.yaml [section.key=value ...]
    accelerate launch launch/train.py --config configs/demo.yaml --find-lr
    disttrain find-lr --config configs/demo.yaml
    accelerate launch -m disttrain.cli evaluate --weights runs/demo/model.pt data.root=... [--tta]
    accelerate launch -m disttrain.cli predict --weights runs/demo/model.pt --out predictions.csv new_images/ [--tta]
    disttrain predict --weights runs/demo/model.pt photo.jpg
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


def evaluate(cfg, weights: str, out: str | None, tta_n: int = 0, tta_beta: float = 0.25, tta_max: bool = False) -> dict:
    """Exact validation of a model.pt on `data.root`'s validation folder, on however many processes
    run it: the architecture, classes, sizes and normalization come from model.pt (from the config
    only for an older model.pt without them). With `tta_n`, also with test-time augmentation."""
    from disttrain.build import build_loaders, load_data
    from disttrain.config import ModelConfig
    from disttrain.inference import eval_view, read_model_file
    from disttrain.models import build_model, normalization
    from disttrain.runtime import build_accelerator
    from disttrain.tracking import ConsoleReporter
    from disttrain.trainer import evaluate as run_eval

    state = read_model_file(weights, need_inference_keys=False)
    data_cfg = dataclasses.replace(cfg.data, image_size=state.get("image_size", cfg.data.image_size),
                                   load_size=state.get("load_size", cfg.data.load_size))
    cfg = dataclasses.replace(cfg, data=data_cfg)
    accelerator = build_accelerator(cfg)
    reporter = ConsoleReporter(accelerator.is_main_process, progress=False)
    data = load_data(cfg, accelerator, reporter)
    if state["classes"] != data.classes:
        raise WeightsError(f"{weights}: trained on classes {state['classes']}, but {cfg.data.root} has {data.classes}")
    model = build_model(ModelConfig(name=state["arch"]), num_classes=len(data.classes))
    model.load_state_dict(state["model"])
    model = accelerator.prepare_model(model, evaluation_mode=True)
    _, valid_loader = build_loaders(cfg, data, accelerator)
    saved = state.get("normalize")  # what the weights were trained with, else what the config resolves to
    mean, std, _ = (saved["mean"], saved["std"], "") if saved else normalization(cfg.model, cfg.augment)
    view = eval_view(cfg.data.image_size, mean, std, cfg.model.channels_last)
    result = run_eval(accelerator, model, valid_loader, view, tta_n=tta_n, tta_beta=tta_beta, tta_max=tta_max)
    summary = {key: value for key, value in vars(result).items() if key != "confusion"}
    summary["world_size"] = accelerator.num_processes
    reporter.line(f"valid_loss {result.loss:.6f}  accuracy {result.accuracy:.6f}  ({result.correct}/{result.count})")
    if tta_n:
        how = "max" if tta_max else f"beta {tta_beta}"
        reporter.line(f"with TTA ({tta_n} views, {how}): valid_loss {result.tta_loss:.6f}  accuracy {result.tta_accuracy:.6f}  "
                      f"({result.tta_correct}/{result.count})")
    if out and accelerator.is_main_process:
        Path(out).write_text(json.dumps(summary, indent=1))
    accelerator.end_training()
    return summary


def predict(args: argparse.Namespace):
    from disttrain.predict import run

    return run(args.weights, args.inputs, args.out, args.topk, args.tta_n if args.tta else 0, args.tta_beta, args.tta_max,
               args.batch_size, args.workers, args.precision)


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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _tta_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tta", action="store_true", help="also with test-time augmentation (flips and corner crops)")
    parser.add_argument("--tta-n", type=_positive_int, default=4, help="TTA views besides the plain pass (default 4)")
    parser.add_argument("--tta-beta", type=float, default=0.25, help="the plain pass's weight in the TTA blend (default 0.25)")
    parser.add_argument("--tta-max", action="store_true", help="combine the passes by their maximum instead of the blend")


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
    _tta_args(ev)
    pred = sub.add_parser("predict", help="class probabilities for new images (files and folders) from a model.pt")
    pred.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders (searched recursively)")
    pred.add_argument("--weights", required=True, help="model.pt written by a training run")
    pred.add_argument("--out", help="CSV: path, label, score, one probability column per class (default: stdout)")
    pred.add_argument("--topk", type=_positive_int, default=5, help="classes printed for a single image without --out (default 5)")
    pred.add_argument("--batch-size", type=_positive_int, default=32, help="images per batch and process (default 32)")
    pred.add_argument("--workers", type=int, default=1, help="decoding workers per process (default 1)")
    pred.add_argument("--precision", default="auto", help="as train.precision (default auto)")
    _tta_args(pred)
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
    if args.command == "predict":
        if args.overrides:
            parser.error(f"unrecognized arguments: {' '.join(args.overrides)}")
        return run_user_errors(lambda: predict(args))
    if args.overrides and args.command not in ("train", "find-lr", "evaluate"):
        parser.error(f"unrecognized arguments: {' '.join(args.overrides)}")

    if args.command in ("train", "find-lr"):
        return run_user_errors(lambda: train(load_config(args.config, args.overrides), args.command == "find-lr"))
    if args.command == "evaluate":
        tta = args.tta_n if args.tta else 0
        return run_user_errors(lambda: evaluate(load_config(args.config, args.overrides), args.weights, args.out, tta, args.tta_beta,
                                                args.tta_max))
    if args.command == "prepare":
        return run_user_errors(lambda: prepare(args))
    from disttrain.demo_data import write_demo_data

    def demo_data() -> None:
        print(write_demo_data(args.path, args.train_per_class, args.valid_per_class))

    return run_user_errors(demo_data)


if __name__ == "__main__":
    sys.exit(main())
