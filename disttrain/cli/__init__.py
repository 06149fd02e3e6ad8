"""`disttrain train | find-lr | evaluate | predict | export | prepare | demo-data | launch`.

    disttrain launch --multi_gpu --num_processes 2 launch/train.py --config configs/demo.yaml
    accelerate launch launch/train.py --config configs/demo.yaml [section.key=value ...]
    accelerate launch launch/train.py --config configs/demo.yaml --find-lr
    disttrain find-lr --config configs/demo.yaml
    accelerate launch -m disttrain.cli evaluate --weights runs/demo/model.pt --data test_images/ [--tta] [--out result.json]
    accelerate launch -m disttrain.cli evaluate --weights runs/demo/model.pt --data test_images/ --interpret look/   # top losses, grids
    accelerate launch -m disttrain.cli evaluate --weights runs/demo/model.pt data.root=...   # its valid/ or val/
    accelerate launch -m disttrain.cli predict --weights runs/demo/model.pt --out predictions.csv new_images/ [--tta]
    disttrain predict --weights runs/demo/model.pt --topk 3 photo.jpg
    disttrain export --weights runs/demo/model.pt --format onnx --out model.onnx   # or --format torchscript --out model.ts
    disttrain predict --weights model.onnx --out predictions.csv new_images/        # the exported file, under onnxruntime
    disttrain prepare ~/data/pets ~/data/pets-shards --presize 256 --workers 8
    disttrain demo-data ~/.cache/disttrain/mnist
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from disttrain.train.checkpoint import PREEMPTED_EXIT, CheckpointError, Preempted
from disttrain.config import ConfigError, load_config
from disttrain.data.folder import DataError
from disttrain.data.loader import LoaderStalled
from disttrain.train.lr_sweep import SweepError
from disttrain.models.build import WeightsError

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
    from disttrain.use.inference import check_tta

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
    from disttrain.cli.launch import report_to_front

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


def _inference_args(parser: argparse.ArgumentParser) -> None:
    """Options predict and evaluate share: TTA, batches, file suffixes."""
    parser.add_argument("--tta", action="store_true", help="also with test-time augmentation (flips and corner crops)")
    parser.add_argument("--tta-n", type=int, default=5,
                        help="TTA views, 1 to 10 (default 5: the whole image flipped, then the four corners; see the README)")
    parser.add_argument("--tta-beta", type=float, default=0.25, help="the plain pass's weight in the TTA blend, in [0, 1] (default 0.25)")
    parser.add_argument("--tta-max", action="store_true", help="combine the passes by their maximum instead of the blend")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per batch, each batch on one process (default 32); the results do not depend on the number of processes")
    parser.add_argument("--ext", help="comma-separated suffixes of the files taken from folders (default: the image suffixes "
                                      "training takes; '*': every file)")


def command_parser() -> argparse.ArgumentParser:
    """`disttrain <command>`'s parser (`launch` is handled before it: its options are Accelerate's)."""
    parser = argparse.ArgumentParser(prog="disttrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _config_args(sub.add_parser("train", help="train (same as launch/train.py)"))
    _config_args(sub.add_parser("find-lr", help="only the LR sweep (same as launch/train.py --find-lr)"))
    ev = sub.add_parser("evaluate", help="exact evaluation of a model.pt on a labelled folder (<class>/*, or valid/, val/ or test/ in it)")
    _config_args(ev)
    ev.add_argument("--weights", required=True, help="model.pt written by a training run")
    ev.add_argument("--data", metavar="DIR", help="labelled folder: DIR/<class>/<images>, or DIR holding valid/, val/ or test/ "
                                                  "(default: data.root's validation folder)")
    ev.add_argument("--split", help="the sub-folder of DIR to evaluate (default: valid, else val, else test)")
    ev.add_argument("--out", help="write the result as JSON here (nothing is written without it)")
    ev.add_argument("--out-dir", help="write confusion_matrix.png and .csv here (beyond 50 classes: confusion_cells.csv "
                                         "and confusion_summary.png)")
    ev.add_argument("--interpret", metavar="OUT_DIR", help="write the lesson's look at the results here: top_losses.png/.csv, "
                                                           "most_confused.csv, per_class.csv, the confusion matrix and image grids")
    ev.add_argument("--interpret-k", type=int, default=9, metavar="K", help="images per --interpret grid (default 9)")
    _inference_args(ev)
    pred = sub.add_parser("predict", help="class probabilities for new images (files and folders) from a model.pt")
    pred.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders (searched recursively)")
    pred.add_argument("--weights", required=True, help="model.pt written by a training run, or a .onnx file written by "
                                                       "disttrain export (run with onnxruntime on the CPU; no --tta)")
    pred.add_argument("--out", help="output file (default: stdout): the CSV path, label, score, one probability column per class")
    pred.add_argument("--topk", type=int, help="instead of the CSV: the K most probable classes of each image, tab-separated "
                                               "path, rank, class, probability")
    pred.add_argument("--workers", type=int, default=1,
                      help="decoding workers per process (default 1; 0, or a share under 1,000 images, decodes in the process)")
    pred.add_argument("--precision", default="auto", help="as train.precision (default auto)")
    _inference_args(pred)
    exp = sub.add_parser("export", help="a model.pt as one ONNX or TorchScript file: uint8 NHWC images in, class probabilities out")
    exp.add_argument("--weights", required=True, help="model.pt written by a training run")
    exp.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="onnx (default) or torchscript")
    exp.add_argument("--out", required=True, help="the file to write (e.g. model.onnx, model.ts); written only once verified")
    exp.add_argument("--dynamic-batch", action=argparse.BooleanOptionalAction, default=True,
                     help="any batch size (default); --no-dynamic-batch: exactly --batch-size images (ONNX only)")
    exp.add_argument("--batch-size", type=int, default=1, help="the fixed batch size with --no-dynamic-batch (default 1)")
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
        from disttrain.cli.launch import main as launch

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

