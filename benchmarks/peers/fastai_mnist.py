"""fastai peer of disttrain's MNIST demo: a ResNet-18 trained from scratch, the way a fastai user
would write it, timed phase by phase. Run it with the peer venv's python (fastai is not a
dependency of disttrain):

    bash benchmarks/peers/fastai_venv.sh                      # once: ~/.cache/disttrain/peer-fastai
    .venv/bin/disttrain demo-data /tmp/mnist-demo             # 4000 train + 1000 valid PNGs, 28 px
    ~/.cache/disttrain/peer-fastai/bin/python benchmarks/peers/fastai_mnist.py /tmp/mnist-demo \
        --json /tmp/fastai-mnist.json

What it does, in fastai's own calls:

    dls   = ImageDataLoaders.from_folder(path, train='train', valid='valid', bs=64,
                                         item_tfms=None, batch_tfms=Normalize.from_stats(mnist))
    learn = Learner(dls, torchvision.models.resnet18(weights=None, num_classes=10), metrics=accuracy)
    lr    = learn.lr_find().valley
    learn.fit_one_cycle(3, lr)

Model choice. `Learner` + torchvision's `resnet18(weights=None, num_classes=10)` is "a ResNet-18
trained from scratch" in the literal sense: the exact torchvision architecture (the one disttrain
builds for `model.name=resnet18`), its own init, 11.2 M parameters. fastai's
`vision_learner(dls, resnet18, pretrained=False)` would instead cut the body before the pooling
layer and add fastai's head (concat pooling, two BatchNorm/Dropout/Linear blocks, 1024 -> 512 -> 10)
with fastai's init: a different network. `--model vision_learner` runs that variant for comparison.

Everything else is fastai's defaults: Adam (fastai's, wd=0.01 decoupled, moms 0.95/0.85/0.95),
CrossEntropyLossFlat, DataLoader workers = fastai's default (min(16, cores)), images opened as
3-channel RGB (fastai's PILImage), no augmentation (digits). Normalisation: the same MNIST stats as
disttrain's demo config (`--normalize none` for none). The LR is fastai's default suggestion,
`valley` (all four suggestions are printed; `--suggest` picks another).

Threads: one process; torch uses all cores (torch.set_num_threads(os.cpu_count())) unless
--threads says otherwise; the count is printed.

Times printed and written with --json: `dls` (ImageDataLoaders creation), `learner`, `lr_find`,
`fit` (fit_one_cycle), and `total` from before the DataLoaders to the end of fit. lr_find's
temporary weights go to a scratch folder (--workdir, default a temp dir), never the data folder.
"""

from __future__ import annotations

import argparse
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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="?", default="/tmp/mnist-demo", help="folder with train/<class>/ and valid/<class>/")
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--resize", type=int, default=0, help="item_tfms=Resize(N); 0 (default): no item transform")
    p.add_argument("--normalize", choices=["mnist", "none"], default="mnist")
    p.add_argument("--model", choices=["learner", "vision_learner"], default="learner",
                   help="learner: Learner + torchvision resnet18(weights=None) (default); "
                        "vision_learner: vision_learner(dls, resnet18, pretrained=False)")
    p.add_argument("--suggest", choices=["valley", "minimum", "steep", "slide"], default="valley")
    p.add_argument("--lr", type=float, default=None, help="skip lr_find and train at this LR")
    add_common_args(p)
    args = p.parse_args(argv)
    quiet_bars(args.bars)

    threads = setup_threads(args.threads)

    from fastai.vision.all import (
        ImageDataLoaders, Learner, Normalize, Resize, accuracy, set_seed, vision_learner,
    )
    from torchvision.models import resnet18

    info = versions()
    print(f"fastai {info['fastai']}, torch {info['torch']}, torchvision {info['torchvision']}, "
          f"cuda available: {info['cuda_available']}", flush=True)
    set_seed(args.seed)
    path = Path(args.path).expanduser()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fastai-mnist-"))
    phases = Phases()

    with phases("dls"):
        kwargs = {}
        if args.num_workers is not None:
            kwargs["num_workers"] = args.num_workers
        dls = ImageDataLoaders.from_folder(
            path, train="train", valid="valid", bs=args.bs,
            item_tfms=Resize(args.resize) if args.resize else None,
            batch_tfms=Normalize.from_stats(MNIST_MEAN, MNIST_STD) if args.normalize == "mnist" else None,
            seed=args.seed, **kwargs)
    n_train, n_valid = len(dls.train_ds), len(dls.valid_ds)
    print(f"data: {n_train} train / {n_valid} valid, classes {list(dls.vocab)}, bs {args.bs}, "
          f"{len(dls.train)} train batches/epoch, DataLoader workers {loader_workers(dls)}", flush=True)

    rows_cb = EpochRows()
    with phases("learner"):
        if args.model == "learner":
            model = resnet18(weights=None, num_classes=len(dls.vocab))
            learn = Learner(dls, model, metrics=accuracy, path=workdir, cbs=rows_cb)
        else:
            learn = vision_learner(dls, resnet18, pretrained=False, metrics=accuracy, path=workdir, cbs=rows_cb)
    n_params = sum(p.numel() for p in learn.model.parameters())
    print(f"model: {args.model}, {n_params / 1e6:.2f} M parameters", flush=True)

    lrs, lr = find_lr(learn, args, rows_cb, phases)
    print(f"fit_one_cycle({args.epochs}, {lr:.3e})  [{args.suggest if args.lr is None else '--lr'}]", flush=True)

    rows_cb.phase = "fit"
    with phases("fit"):
        learn.fit_one_cycle(args.epochs, lr)
    total = phases.total()

    rows = [r for r in rows_cb.rows if r["phase"] == "fit"]
    final_acc = rows[-1]["accuracy"] if rows else None
    print("\nepoch table (fastai's Recorder values):")
    print_table(rows)
    print(f"\nfinal valid accuracy: {final_acc:.4f}")
    print("wall times: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.seconds.items()))
    print(f"train throughput (fit, incl. validation): "
          f"{n_train * args.epochs / phases.seconds['fit']:.1f} train images/s", flush=True)

    result = {
        "benchmark": "fastai_mnist",
        "versions": info,
        "config": {"path": str(path), "bs": args.bs, "epochs": args.epochs, "resize": args.resize,
                   "normalize": args.normalize, "model": args.model, "suggest": args.suggest,
                   "seed": args.seed, "threads": threads, "num_workers": loader_workers(dls),
                   "n_train": n_train, "n_valid": n_valid, "classes": list(dls.vocab),
                   "n_params": n_params},
        "lr_find": lrs,
        "lr": lr,
        "seconds": phases.seconds,
        "epochs": rows,
        "final_valid_accuracy": final_acc,
        "final_valid_loss": rows[-1]["valid_loss"] if rows else None,
    }
    write_json(args.json, result)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
