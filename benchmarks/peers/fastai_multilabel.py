"""fastai peer of configs/multilabel.yaml: the multi-label digits sample (two to four MNIST digits on
a 64x64 canvas, the tags are the digits present) on a ResNet-18 trained from scratch, the way a
fastai user would write it, timed phase by phase. Run it with the peer venv's python (fastai is not
a dependency of disttrain); benchmarks/multilabel.py runs it beside disttrain on the same split:

    bash benchmarks/peers/fastai_venv.sh                      # once: ~/.cache/disttrain/peer-fastai
    .venv/bin/disttrain demo-data /tmp/ml-demo --multi-label  # 2,000 canvases, labels.csv id,tags
    ~/.cache/disttrain/peer-fastai/bin/python benchmarks/peers/fastai_multilabel.py /tmp/ml-demo \
        --valid runs/multilabel/split.json --json /tmp/fastai-multilabel.json

What it does, in fastai's own calls:

    df    = pd.read_csv(path/'labels.csv')
    dls   = DataBlock(blocks=(ImageBlock, MultiCategoryBlock),
                      get_x=ColReader(0, pref=path/'train', suff='.png'),
                      get_y=ColReader(1, label_delim=' '),
                      splitter=IndexSplitter(<the rows of split.json's validation files>),
                      batch_tfms=Normalize.from_stats(mnist)).dataloaders(df, bs=64)
    learn = Learner(dls, torchvision.models.resnet18(weights=None, num_classes=10),
                    metrics=[partial(accuracy_multi, thresh=0.5), FBetaMulti(2, average='samples')])
    lr    = learn.lr_find().valley
    learn.fit_one_cycle(10, lr)                              # --epochs: configs/multilabel.yaml's 10
    probs, targs = learn.get_preds()

The split. `--valid` takes the split.json a disttrain run writes (its `valid` list: the validation
files, relative to the images folder) or a text file of those names, one a line: IndexSplitter gets
the labels.csv rows of exactly those files, so both tools validate on the same images. Without
`--valid`, fastai's own RandomSplitter(valid_pct=0.2, seed=42): another split (fastai draws with
torch's generator, disttrain with numpy's), printed as such.

Model and loss: as fastai_mnist.py, `Learner` + torchvision's `resnet18(weights=None, num_classes=10)`,
the architecture disttrain builds for `model.name=resnet18` (`--model vision_learner` for fastai's
cut body + its own head). MultiCategoryBlock makes fastai pick BCEWithLogitsLossFlat (sigmoid
outputs). Everything else is fastai's defaults: Adam (decoupled wd 0.01), images opened as RGB, no
augmentation (digits: the same as the disttrain recipe), the MNIST normalisation of configs/multilabel.yaml.

Figures. fastai's metrics at its default threshold 0.5 (its FBetaMulti predicts `p >= 0.5`) are
what its epoch table prints. After training, the validation probabilities (`get_preds`, sigmoid
applied) are scored the way disttrain scores them (disttrain/multilabel.py: a tag is predicted when
`p > t`, F2 sample-averaged with 0 for an empty row): F2 and accuracy_multi at 0.5, and at the best
threshold of the same grid disttrain's `train.threshold: auto` searches (0.05 to 0.95, step 0.01,
the lowest of equal ones). The last line printed is the JSON of the figures.

Times: `dls`, `learner`, `lr_find`, `fit`, `preds` (get_preds on the validation set) and `total`
from the start of `dls` to the end of `preds`; the caller times the process (imports included).
Threads: one process, torch uses all cores unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated.*")

from _fastai_common import (  # noqa: E402
    EpochRows, find_lr, Phases, add_common_args, loader_workers, print_table, quiet_bars, setup_threads, versions,
    write_json,
)

MNIST_MEAN, MNIST_STD = [0.1307] * 3, [0.3081] * 3
GRID = tuple(k / 100 for k in range(5, 96))
"""disttrain's `train.threshold: auto` grid (disttrain/multilabel.py THRESHOLDS), built the same way."""


def sample_fbeta(probs, true, threshold: float, beta: float) -> float:
    """Mean over rows of F-beta of the tags with `p > threshold` against the true tags (0 for a row
    with no true and no predicted tag: sklearn's zero_division default)."""
    import numpy as np

    predicted = probs > threshold
    tp = (predicted & true).sum(axis=1).astype(np.float64)
    fp, fn = predicted.sum(axis=1) - tp, true.sum(axis=1) - tp
    b2 = beta * beta
    bottom = (1 + b2) * tp + b2 * fn + fp
    scores = np.divide((1 + b2) * tp, bottom, out=np.zeros_like(tp), where=bottom > 0)
    return math.fsum(scores.tolist()) / len(scores)


def accuracy_cells(probs, true, threshold: float) -> float:
    """fastai's accuracy_multi on the probabilities: the fraction of (row, tag) cells right at `p > threshold`."""
    return float(((probs > threshold) == true).mean())


def best_threshold(probs, true, beta: float) -> tuple[float, float]:
    """(threshold, F-beta) of the grid value with the highest F-beta, the lowest of equal ones."""
    best = (0.5, -math.inf)
    for threshold in GRID:
        score = sample_fbeta(probs, true, threshold, beta)
        if score > best[1]:
            best = (threshold, score)
    return best


def validation_rows(ids: list[str], suffix: str, valid: Path) -> list[int]:
    """The labels.csv rows whose file (`id + suffix`) a split.json's `valid` list (or a text file, one
    name a line) names; an error when a named file has no row."""
    text = valid.read_text()
    names = json.loads(text)["valid"] if valid.suffix == ".json" else [line.strip() for line in text.splitlines() if line.strip()]
    row_of = {f"{name}{suffix}": i for i, name in enumerate(ids)}
    unknown = [n for n in names if n not in row_of]
    if unknown:
        sys.exit(f"{valid}: {len(unknown)} validation file(s) have no row in the labels table, e.g. {unknown[:3]}")
    return sorted(row_of[n] for n in names)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="?", default=str(Path("~/.cache/disttrain/mnist-multilabel").expanduser()),
                   help="folder with labels.csv (id,tags) and the images folder")
    p.add_argument("--labels", default="labels.csv", help="the labels table, relative to path")
    p.add_argument("--images", default="train", help="the images folder, relative to path")
    p.add_argument("--suffix", default=".png", help="appended to each id")
    p.add_argument("--valid", default=None, help="disttrain's split.json (or a list of file names): the validation files")
    p.add_argument("--valid-pct", type=float, default=0.2, help="without --valid: RandomSplitter(valid_pct, seed=42)")
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--epochs", type=int, default=10, help="fit_one_cycle epochs (default 10, as configs/multilabel.yaml)")
    p.add_argument("--beta", type=float, default=2.0)
    p.add_argument("--model", choices=["learner", "vision_learner"], default="learner",
                   help="learner: Learner + torchvision resnet18(weights=None) (default); "
                        "vision_learner: vision_learner(dls, resnet18, pretrained=False)")
    p.add_argument("--suggest", choices=["valley", "minimum", "steep", "slide"], default="valley")
    p.add_argument("--lr", type=float, default=None, help="skip lr_find and train at this LR")
    add_common_args(p)
    args = p.parse_args(argv)
    quiet_bars(args.bars)

    threads = setup_threads(args.threads)

    from functools import partial

    import pandas as pd
    from fastai.vision.all import (
        ColReader, DataBlock, FBetaMulti, ImageBlock, IndexSplitter, Learner, MultiCategoryBlock, Normalize,
        RandomSplitter, accuracy_multi, set_seed, vision_learner,
    )
    from torchvision.models import resnet18

    info = versions()
    print(f"fastai {info['fastai']}, torch {info['torch']}, torchvision {info['torchvision']}, "
          f"cuda available: {info['cuda_available']}", flush=True)
    set_seed(args.seed)
    path = Path(args.path).expanduser()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fastai-multilabel-"))
    df = pd.read_csv(path / args.labels, dtype=str, keep_default_na=False)
    if args.valid:
        valid_idx = validation_rows(df.iloc[:, 0].tolist(), args.suffix, Path(args.valid))
        splitter, split = IndexSplitter(valid_idx), f"IndexSplitter({len(valid_idx)} rows of {args.valid})"
    else:
        splitter, split = RandomSplitter(args.valid_pct, seed=42), f"RandomSplitter({args.valid_pct}, seed=42): fastai's own split"
    phases = Phases()

    with phases("dls"):
        dblock = DataBlock(
            blocks=(ImageBlock, MultiCategoryBlock),
            get_x=ColReader(0, pref=path / args.images, suff=args.suffix),
            get_y=ColReader(1, label_delim=" "),
            splitter=splitter,
            batch_tfms=Normalize.from_stats(MNIST_MEAN, MNIST_STD),
        )
        kwargs = {"num_workers": args.num_workers} if args.num_workers is not None else {}
        dls = dblock.dataloaders(df, bs=args.bs, seed=args.seed, **kwargs)
    n_train, n_valid = len(dls.train_ds), len(dls.valid_ds)
    print(f"data: {n_train} train / {n_valid} valid ({split}), tags {list(dls.vocab)}, bs {args.bs}, "
          f"{len(dls.train)} train batches/epoch, DataLoader workers {loader_workers(dls)}", flush=True)

    rows_cb = EpochRows()
    metrics = [partial(accuracy_multi, thresh=0.5), FBetaMulti(args.beta, average="samples")]
    with phases("learner"):
        if args.model == "learner":
            model = resnet18(weights=None, num_classes=len(dls.vocab))
            learn = Learner(dls, model, metrics=metrics, path=workdir, cbs=rows_cb)
        else:
            learn = vision_learner(dls, resnet18, pretrained=False, metrics=metrics, path=workdir, cbs=rows_cb)
    n_params = sum(q.numel() for q in learn.model.parameters())
    print(f"model: {args.model}, {n_params / 1e6:.2f} M parameters, loss {type(learn.loss_func).__name__}", flush=True)

    lrs, lr = find_lr(learn, args, rows_cb, phases)
    print(f"fit_one_cycle({args.epochs}, {lr:.3e})  [{args.suggest if args.lr is None else '--lr'}]", flush=True)

    rows_cb.phase = "fit"
    with phases("fit"):
        learn.fit_one_cycle(args.epochs, lr)
    rows_cb.phase = "preds"  # get_preds runs the callbacks' before_epoch/after_epoch too
    with phases("preds"):
        probs, targs = learn.get_preds()  # BCEWithLogitsLossFlat's activation: sigmoid
    total = phases.total()

    probs, true = probs.double().numpy(), targs.numpy() != 0
    f_half, acc_half = sample_fbeta(probs, true, 0.5, args.beta), accuracy_cells(probs, true, 0.5)
    th, f_best = best_threshold(probs, true, args.beta)
    acc_best = accuracy_cells(probs, true, th)

    rows = [r for r in rows_cb.rows if r["phase"] == "fit"]
    print("\nepoch table (fastai's Recorder values, threshold 0.5):")
    print_table(rows)
    print(f"\nF{args.beta:g} (samples) at 0.5: {f_half:.4f}, accuracy_multi {acc_half:.4f}; "
          f"at the best threshold {th:.2f}: F{args.beta:g} {f_best:.4f}, accuracy_multi {acc_best:.4f}")
    print("wall times: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.seconds.items()), flush=True)

    result = {
        "benchmark": "fastai_multilabel",
        "versions": info,
        "config": {"path": str(path), "split": split, "bs": args.bs, "epochs": args.epochs, "model": args.model,
                   "suggest": args.suggest, "seed": args.seed, "threads": threads, "num_workers": loader_workers(dls),
                   "n_train": n_train, "n_valid": n_valid, "tags": [str(v) for v in dls.vocab], "n_params": n_params,
                   "beta": args.beta},
        "lr_find": lrs,
        "lr": lr,
        "seconds": phases.seconds,
        "epochs": rows,
        "fbeta_at_0.5": f_half,
        "accuracy_multi_at_0.5": acc_half,
        "best_threshold": th,
        "fbeta_at_best": f_best,
        "accuracy_multi_at_best": acc_best,
        "valid_loss": rows[-1]["valid_loss"] if rows else None,
        "total_s": total,
    }
    write_json(args.json, result)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({k: result[k] for k in ("fbeta_at_0.5", "accuracy_multi_at_0.5", "best_threshold", "fbeta_at_best",
                                             "accuracy_multi_at_best", "lr", "total_s")} | {"seconds": phases.seconds}))
    return result


if __name__ == "__main__":
    main()
