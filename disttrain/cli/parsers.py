"""The command line's parsers (shared by the `disttrain launch` front, which checks a run's config
before any process starts): `disttrain train | find-lr | evaluate | predict | export | average | prepare | demo-data | inspect | launch`.

    disttrain launch --multi_gpu --num_processes 2 launch/train.py --config configs/demo.yaml
    accelerate launch launch/train.py --config configs/demo.yaml [section.key=value ...]
    accelerate launch launch/train.py --config configs/demo.yaml --find-lr
    disttrain find-lr --config configs/demo.yaml
    accelerate launch -m disttrain.cli evaluate --weights runs/demo/model.pt --data test_images/ [--tta] [--out result.json]
    accelerate launch -m disttrain.cli evaluate --weights runs/demo/model.pt --data test_images/ --interpret look/   # top losses, grids
    accelerate launch -m disttrain.cli evaluate --weights runs/demo/model.pt data.root=...   # its valid/ or val/
    accelerate launch -m disttrain.cli evaluate --run runs/planet [--threshold auto]   # a run's model.pt on its own validation split
    accelerate launch -m disttrain.cli predict --weights runs/demo/model.pt --out predictions.csv new_images/ [--tta]
    disttrain predict --weights runs/demo/model.pt --topk 3 photo.jpg
    disttrain export --weights runs/demo/model.pt --format onnx --out model.onnx   # or --format torchscript --out model.ts
    disttrain predict --weights model.onnx --out predictions.csv new_images/        # the exported file, under onnxruntime
    disttrain predict --weights runs/dogs/model.pt --tta --format submission --out submission.csv.gz test/
    disttrain predict --weights runs/sgdr/snapshots/cycle-1.pt runs/sgdr/snapshots/cycle-2.pt --out p.csv test/   # an ensemble
    disttrain average --out runs/demo/averaged.pt runs/demo/checkpoints/step-00000120 runs/demo/checkpoints/step-00000180
    disttrain prepare ~/data/pets ~/data/pets-shards --presize 256 --workers 8
    disttrain prepare ~/data/planet ~/data/planet-shards data.labels=labels.csv data.suffix=.jpg data.label_delim=" " data.valid_pct=0.2
    disttrain demo-data ~/.cache/disttrain/mnist
    disttrain demo-data ~/data/digits-csv --layout csv      # or --layout names; --multi-label [--count 2000]
    disttrain inspect ~/data/dogs --labels labels.csv data.suffix=.jpg data.valid_pct=0.2 [--out look/] [--json look.json]
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

WEIGHTS_SUFFIXES = (".pt", ".pth", ".onnx")
"""Words after `predict --weights` with these suffixes are model files (named so, or a torch zip archive)."""


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


def split_weights(words: list[str]) -> tuple[list[str], list[str]]:
    """`predict --weights A [B ...]` takes every word up to the next option: (the model files, the
    inputs that followed them). The first word is a model file; so is each next one named with a
    suffix of WEIGHTS_SUFFIXES or that is a torch file (a zip archive); from the first other word
    on, the words are inputs (`--weights model.pt photos/` stays one model and one input)."""
    count = 1
    while count < len(words) and _is_weights(words[count]):
        count += 1
    return words[:count], words[count:]


def _is_weights(word: str) -> bool:
    path = Path(word).expanduser()
    return path.suffix.lower() in WEIGHTS_SUFFIXES or (path.is_file() and zipfile.is_zipfile(path))


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description="Train an image classifier on one or many processes.")
    _config_args(parser)
    parser.add_argument("--find-lr", action="store_true", help="run only the synchronized LR sweep, then exit")
    return parser


def _inference_args(parser: argparse.ArgumentParser) -> None:
    """Options predict and evaluate share: TTA, batches, file suffixes."""
    parser.add_argument("--tta", action="store_true", help="also with test-time augmentation (flips and corner crops)")
    parser.add_argument("--tta-n", type=int, default=5,
                        help="TTA views, 1 to 10 (default 5: the whole image flipped, then the four corners; see docs/using-models.md)")
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
    ev.add_argument("--weights", help="model.pt written by a training run (default with --run: RUN_DIR/model.pt)")
    ev.add_argument("--run", metavar="RUN_DIR", help="a training run's dir: its model.pt on its own validation images (its "
                                                     "config.yaml; a drawn split as its split.json lists it)")
    ev.add_argument("--threshold", help="multi-label: a tag is predicted above this probability (default: model.pt's); "
                                        "auto: the best F-beta's on the evaluated images")
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
    pred.add_argument("inputs", nargs="*", metavar="INPUT", help="image files and/or folders (searched recursively)")
    pred.add_argument("--weights", required=True, nargs="+", metavar="WEIGHTS",
                      help="model.pt written by a training run, or a .onnx file written by disttrain export (run with onnxruntime "
                           "on the CPU; no --tta); several model.pt files: an ensemble, the mean of their probabilities")
    pred.add_argument("--out", help="output file (default: stdout): the CSV path, label, score, one probability column per class "
                                    "(multi-label: path, labels, one per tag); gzipped when it ends in .gz")
    pred.add_argument("--format", choices=("csv", "submission", "tags"), default="csv",
                      help="csv (default); submission: a Kaggle submission, id (the file stem) then one probability column per "
                           "class; tags: planet's image_name,tags (the predicted tags, space-separated)")
    pred.add_argument("--threshold", type=float, help="a multi-label model's tags are those above this probability "
                                                      "(default: the threshold in model.pt)")
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
    avg = sub.add_parser("average", help="one model.pt holding the mean of the weights of several checkpoints or model.pt files "
                         "(disttrain/use/average.py)")
    avg.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint folders (<run dir>/checkpoints/step-N) and/or "
                                                                   "model.pt files of one model, at least 2")
    avg.add_argument("--out", required=True, help="the model.pt to write (the format of a run's model.pt)")
    avg.add_argument("--bn", choices=("mean", "recompute"), default="mean",
                     help="BatchNorm running statistics: mean (default): the mean of the inputs'; recompute: reset, then recomputed "
                          "on training batches of --config's data (eval view, no augmentation)")
    avg.add_argument("--config", help="the run's config (its config.yaml): the training images for --bn recompute")
    avg.add_argument("--bn-batches", type=int, default=None, metavar="N",
                     help="--bn recompute: training batches of data.batch_size images (default 100)")
    prep = sub.add_parser("prepare", help="image folder -> webdataset tar shards + manifest.json (data.format=shards)")
    prep.usage = f"{prep.prog} SRC DST [options] [data.key=value ...]"
    prep.epilog = ("The source's data.* keys go anywhere on the line, as in training: data.labels, data.images, data.fname_col, "
                   "data.label_col, data.suffix, data.label_delim, data.label_regex, data.valid_pct, data.split_seed, "
                   "data.valid_col, data.stratify (SRC is data.root).")
    prep.add_argument("src", help="image folder with train/<class>/* and valid/ or val/<class>/*, or a flat folder labelled by "
                                  "data.labels or data.label_regex")
    prep.add_argument("dst", help="output folder for the shards and manifest.json")
    prep.add_argument("--samples-per-shard", type=int, default=1000, help="target samples per shard (default 1000)")
    prep.add_argument("--presize", type=int, default=256, help="shorter side of the stored JPEGs (default 256)")
    prep.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    prep.add_argument("--workers", type=int, default=None, help="writer processes (default: all cores)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the shuffle that fills the shards")
    prep.add_argument("--train-dir", default=None, help="training folder (data.train_dir; default train)")
    prep.add_argument("--valid-dir", default=None, help="validation folder (data.valid_dir); auto (default): valid/ or else val/")
    prep.add_argument("--force", action="store_true", help="rewrite a finished or different output")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo = sub.add_parser("demo-data", help="write the bundled MNIST sample as PNG folders, a flat folder + labels.csv, "
                          "labels in file names, or a multi-label sample (disttrain/data/demo.py)")
    demo.add_argument("path")
    demo.add_argument("--layout", choices=("folder", "csv", "names"), default=None,
                      help="folder (default): train/<digit>/, valid/<digit>/; csv: train/<id>.png + labels.csv (id,label); "
                           "names: train/<name>_<row>.png")
    demo.add_argument("--multi-label", action="store_true",
                      help="2 to 4 digits per 64x64 image, labels.csv (id,tags); the csv layout")
    demo.add_argument("--train-per-class", type=int, default=None, help="train images per digit (default 400)")
    demo.add_argument("--valid-per-class", type=int, default=None, help="valid images per digit (default 100)")
    demo.add_argument("--count", type=int, default=None, help="images of the --multi-label sample (default 2000)")
    ins = sub.add_parser("inspect", help="a look at the data before training: class counts, image sizes (headers only), bad files, "
                         "the split, a suggested data.load_size (disttrain/data/inspect.py)")
    _config_args(ins)
    ins.add_argument("data", metavar="DATA", help="the data root (data.root): class folders, or a flat folder with --labels or data.label_regex")
    ins.add_argument("--labels", metavar="FILE", help="the CSV table of labels (data.labels), relative to DATA or absolute")
    ins.add_argument("--sample", type=int, default=2000, metavar="N",
                     help="read the headers of a seeded sample of at most N files (default 2000; 0: every file)")
    ins.add_argument("--json", metavar="FILE", help="also write every figure as JSON here")
    ins.add_argument("--out", metavar="DIR", help="write shorter_sides.png (a histogram) and class_counts.png here")
    sub.add_parser("launch", help="accelerate launch, with the config checked first and one line per failure (disttrain launch --help)")
    return parser
