"""fastai peer for fine-tuning: the ants/bees photos on an ImageNet MobileNetV2, the way a fastai
user would write it, timed phase by phase. Run it with the peer venv's python (fastai is not a
dependency of disttrain):

    bash benchmarks/peers/fastai_venv.sh                      # once: ~/.cache/disttrain/peer-fastai
    ~/.cache/disttrain/peer-fastai/bin/python benchmarks/peers/fastai_hymenoptera.py \
        --json /tmp/fastai-hymenoptera.json                   # the real run: 224 px, fine_tune(4)
    ~/.cache/disttrain/peer-fastai/bin/python benchmarks/peers/fastai_hymenoptera.py \
        --size 64 --epochs 1                                  # a short smoke run

What it does, in fastai's own calls:

    files  = get_image_files(path, folders=['train', 'val'])
    failed = verify_images(files); files = files - failed     # fastai's way to drop broken files
    dls    = DataBlock((ImageBlock, CategoryBlock), get_items=lambda _: files,
                       splitter=GrandparentSplitter('train', 'val'), get_y=parent_label,
                       item_tfms=Resize(224),
                       batch_tfms=[*aug_transforms(), Normalize.from_stats(*imagenet_stats)]
                      ).dataloaders(path, bs=64)
    model_meta[mobilenet_v2] = {'cut': -1, 'split': default_split, 'stats': imagenet_stats, 'weights': 'DEFAULT'}
    learn  = vision_learner(dls, torchvision.models.mobilenet_v2, pretrained=False, metrics=accuracy)
    learn.model[0].load_state_dict(<features.* of mobilenet_v2_imagenet.pt>); learn.freeze()
    lr     = learn.lr_find().valley
    learn.fine_tune(4, lr)
    preds, targs = learn.tta()

(`ImageDataLoaders.from_folder(path, train='train', valid='val', ...)` builds the same DataBlock
from all the image files; the explicit file list is only there to drop what verify_images flags.)

Pretrained weights. No model hub is reachable, so `pretrained=True` (torchvision's download) cannot
be used. Instead the model is built as fastai builds it -- torchvision's `mobilenet_v2`, cut to its
body, plus fastai's head (concat pooling, BN/Dropout/Linear 2560 -> 512 -> 2, kaiming init) -- and
the `features.*` tensors of /work/shared/weights/mobilenet_v2_imagenet.pt (a torchvision state dict,
see its README) are loaded into the body with strict=True (the 1000-class classifier is dropped, as
fastai drops it). Then it does the two things `pretrained=True` would have done: ImageNet
normalisation in the batch transforms, and `learn.freeze()` (body frozen except its BatchNorm
layers, fastai's train_bn default) before lr_find. The loaded body is checked against torchvision's
own model with the same state dict on one input.

The model_meta entry. fastai knows no cut for torchvision's MobileNetV2: its default cut looks for
the last child that contains a pooling layer, and MobileNetV2 pools functionally (no pooling
module), so vision_learner raises StopIteration. `vision_learner(..., cut=-1)` would be the obvious
fix, but fastai 2.8.12's vision_learner does not pass its `cut` argument on to
create_vision_model for torchvision archs (it is left out of `model_args`), so it still raises.
Registering the arch in fastai's `model_meta` (cut -1, default_split, ImageNet stats) is fastai's
own way to describe an arch and works.

The GIF. train/ants/imageNotFound.gif is Flickr's "image not found" placeholder, but it is a valid
300x300 GIF: verify_images does not flag it and fastai opens it (PIL, converted to RGB), so fastai
trains on it as an ant, as a fastai user's run would. `--drop-gif` leaves out every .gif file
instead. What verify_images flags (nothing, on these photos) is printed and dropped.

Times printed and written with --json: `files` (get_image_files + verify_images), `dls`,
`learner` (build + load weights), `lr_find`, `fine_tune`, `tta`, and `total` from the start of
`files` to the end of TTA. lr_find's temporary weights go to a scratch folder (--workdir, default a
temp dir): the data folder is read-only here.

Threads: one process; torch uses all cores (torch.set_num_threads(os.cpu_count())) unless
--threads says otherwise; the count is printed.
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

DEFAULT_DATA = "/work/shared/data/hymenoptera"
DEFAULT_WEIGHTS = "/work/shared/weights/mobilenet_v2_imagenet.pt"


def load_body(learn, weights: Path) -> int:
    """Load the torchvision state dict's `features.*` tensors into fastai's body (`model[0]`, the
    Sequential of mobilenet_v2's children before the classifier, so `features.X` -> `0.X`), strict.
    Checks the result against torchvision's own model on one input. Returns the tensor count."""
    import torch
    import torchvision

    state = torch.load(weights, map_location="cpu", weights_only=True)
    body_state = {"0." + k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    learn.model[0].load_state_dict(body_state, strict=True)

    ref = torchvision.models.mobilenet_v2(weights=None)
    ref.load_state_dict(state, strict=True)
    ref.eval()
    body = learn.model[0]
    was_training = body.training
    body.eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same = torch.allclose(body(x), ref.features(x), atol=1e-5)
    body.train(was_training)
    if not same:
        raise RuntimeError("fastai body with the loaded weights differs from torchvision's mobilenet_v2")
    return len(body_state)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="?", default=DEFAULT_DATA, help="folder with train/<class>/ and val/<class>/")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="torchvision mobilenet_v2 state dict (ImageNet)")
    p.add_argument("--size", type=int, default=224, help="item_tfms=Resize(SIZE) (default 224)")
    p.add_argument("--epochs", type=int, default=4, help="fine_tune(EPOCHS, lr) (default 4; plus 1 frozen epoch)")
    p.add_argument("--freeze-epochs", type=int, default=1, help="fine_tune's freeze_epochs (fastai default 1)")
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--suggest", choices=["valley", "minimum", "steep", "slide"], default="valley")
    p.add_argument("--lr", type=float, default=None, help="skip lr_find and fine-tune at this LR")
    p.add_argument("--no-tta", action="store_true", help="skip learn.tta()")
    p.add_argument("--drop-gif", action="store_true", help="leave out .gif files (the placeholder) too")
    add_common_args(p)
    args = p.parse_args(argv)
    quiet_bars(args.bars)

    threads = setup_threads(args.threads)

    from fastai.vision.all import (
        CategoryBlock, DataBlock, GrandparentSplitter, ImageBlock, Normalize, Resize, accuracy,
        aug_transforms, default_split, get_image_files, imagenet_stats, model_meta, parent_label, set_seed,
        verify_images, vision_learner,
    )
    from torchvision.models import mobilenet_v2

    info = versions()
    print(f"fastai {info['fastai']}, torch {info['torch']}, torchvision {info['torchvision']}, "
          f"cuda available: {info['cuda_available']}", flush=True)
    set_seed(args.seed)
    path = Path(args.path).expanduser()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fastai-hymenoptera-"))
    phases = Phases()

    with phases("files"):
        files = get_image_files(path, folders=["train", "val"])
        n_found = len(files)
        failed = set(verify_images(files))
        dropped = sorted(str(f) for f in failed)
        files = files.filter(lambda f: f not in failed)
        gifs = [str(f) for f in files if f.suffix.lower() == ".gif"]
        if args.drop_gif:
            files = files.filter(lambda f: f.suffix.lower() != ".gif")
    print(f"files: {n_found} image files, {len(files)} used; "
          f"verify_images flagged {len(dropped)}{': ' + ', '.join(dropped) if dropped else ''}; "
          f"gif files {gifs} {'dropped (--drop-gif)' if args.drop_gif else 'kept (they pass verify_images)'}",
          flush=True)

    with phases("dls"):
        dblock = DataBlock(
            blocks=(ImageBlock, CategoryBlock),
            get_items=lambda _: files,
            splitter=GrandparentSplitter(train_name="train", valid_name="val"),
            get_y=parent_label,
            item_tfms=Resize(args.size),
            batch_tfms=[*aug_transforms(), Normalize.from_stats(*imagenet_stats)],
        )
        kwargs = {"num_workers": args.num_workers} if args.num_workers is not None else {}
        dls = dblock.dataloaders(path, bs=args.bs, seed=args.seed, **kwargs)
    n_train, n_valid = len(dls.train_ds), len(dls.valid_ds)
    print(f"data: {n_train} train / {n_valid} valid, classes {list(dls.vocab)}, {args.size} px, bs {args.bs}, "
          f"{len(dls.train)} train batches/epoch (fastai drops the last partial one), "
          f"DataLoader workers {loader_workers(dls)}", flush=True)

    rows_cb = EpochRows()
    with phases("learner"):
        # fastai has no model_meta entry for torchvision's mobilenet_v2; register one (cut before the
        # classifier, fastai's default body/head split, ImageNet stats; 'weights' makes fastai call
        # mobilenet_v2(weights=None) rather than the deprecated pretrained=False).
        model_meta[mobilenet_v2] = {"cut": -1, "split": default_split, "stats": imagenet_stats, "weights": "DEFAULT"}
        learn = vision_learner(dls, mobilenet_v2, pretrained=False, metrics=accuracy, path=workdir, cbs=rows_cb)
        n_loaded = load_body(learn, Path(args.weights))
        learn.freeze()
    n_params = sum(p.numel() for p in learn.model.parameters())
    n_trainable = sum(p.numel() for p in learn.model.parameters() if p.requires_grad)
    print(f"model: fastai body of torchvision mobilenet_v2 ({n_loaded} ImageNet tensors loaded, strict) + fastai head; "
          f"{n_params / 1e6:.2f} M parameters, {n_trainable / 1e6:.3f} M trainable while frozen", flush=True)

    lrs, lr = find_lr(learn, args, rows_cb, phases)
    print(f"fine_tune({args.epochs}, {lr:.3e}, freeze_epochs={args.freeze_epochs})  "
          f"[{args.suggest if args.lr is None else '--lr'}]", flush=True)

    # fine_tune = freeze; fit_one_cycle(freeze_epochs, lr); unfreeze; fit_one_cycle(epochs, slice(lr/200, lr/2)).
    # Tag the rows: the first `freeze_epochs` fit rows are the frozen ones.
    rows_cb.phase = "fine_tune"
    with phases("fine_tune"):
        learn.fine_tune(args.epochs, lr, freeze_epochs=args.freeze_epochs)
    rows = [r for r in rows_cb.rows if r["phase"] == "fine_tune"]
    for i, row in enumerate(rows):
        row["stage"] = "frozen" if i < args.freeze_epochs else "unfrozen"
    final_acc = rows[-1]["accuracy"] if rows else None

    tta_acc = None
    if not args.no_tta:
        with phases("tta"):
            preds, targs = learn.tta()
            tta_acc = float(accuracy(preds, targs))
    total = phases.total()

    print("\nepoch table (fastai's Recorder values; fine_tune prints it as two tables: frozen, then unfrozen):")
    print_table(rows)
    print(f"\nfinal valid accuracy: {final_acc:.4f}")
    if tta_acc is not None:
        print(f"TTA valid accuracy (learn.tta(), n=4, beta=0.25): {tta_acc:.4f}")
    print("wall times: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.seconds.items()), flush=True)

    result = {
        "benchmark": "fastai_hymenoptera",
        "versions": info,
        "config": {"path": str(path), "weights": str(args.weights), "size": args.size, "epochs": args.epochs,
                   "freeze_epochs": args.freeze_epochs, "bs": args.bs, "suggest": args.suggest, "seed": args.seed,
                   "threads": threads, "num_workers": loader_workers(dls), "n_train": n_train, "n_valid": n_valid,
                   "classes": list(dls.vocab), "n_params": n_params, "n_trainable_frozen": n_trainable,
                   "verify_images_dropped": dropped, "gif_files": gifs, "drop_gif": args.drop_gif},
        "lr_find": lrs,
        "lr": lr,
        "seconds": phases.seconds,
        "epochs": rows,
        "final_valid_accuracy": final_acc,
        "final_valid_loss": rows[-1]["valid_loss"] if rows else None,
        "tta_valid_accuracy": tta_acc,
    }
    write_json(args.json, result)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
