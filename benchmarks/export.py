"""The ants/bees model exported to ONNX: onnxruntime against PyTorch, images/s on the 153 val photos.

    python benchmarks/export.py [--weights runs/finetune/model.pt] [--batch 32] [--repeats 3]

Without `--weights`, the model is built here in a second, not trained: MobileNetV2 with the ImageNet
weights of ../shared/weights/mobilenet_v2_imagenet.pt and a 2-class head made of that classifier's
own rows for ImageNet's "ant" (310) and "bee" (309), saved by `save_weights` with the keys a run
writes (ImageNet normalization, image size 224, presize 256 as configs/finetune.yaml). The output
says which model it timed.

One process, this machine's threads (torch's; onnxruntime gets as many). The photos are decoded and
presized once (`load_presized`, the path predict's loader takes), timed on their own; then, per batch,
PyTorch runs predict's forward (`batch_outputs`: the eval view, the network, softmax; fp32) and
onnxruntime runs the exported file on the same squares, which it resamples inside as the eval view
does (`OnnxModel.probabilities`, what `predict --weights model.onnx` runs). Best of `--repeats`
interleaved runs; the table gives each engine alone and with the decoding added. Also printed: the
largest difference between the two engines' probabilities on these photos, the labels they
disagree on, and each one's accuracy.

Skips (exit 0, one line) when ../shared is absent.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
VAL = SHARED / "data" / "hymenoptera" / "val"
IMAGENET_WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet.pt"
ANT, BEE = 310, 309  # ImageNet class indices


def build_ants_bees(path: Path) -> Path:
    """model.pt of MobileNetV2 (ImageNet weights) whose head is ImageNet's ant and bee rows."""
    import torchvision

    from disttrain.train.checkpoint import save_weights
    from disttrain.data.augment import IMAGENET_MEAN, IMAGENET_STD

    state = torch.load(IMAGENET_WEIGHTS, map_location="cpu", weights_only=True)
    model = torchvision.models.mobilenet_v2(num_classes=1000)
    model.load_state_dict(state)
    head = torch.nn.Linear(model.classifier[1].in_features, 2)
    with torch.no_grad():
        head.weight.copy_(model.classifier[1].weight[[ANT, BEE]])
        head.bias.copy_(model.classifier[1].bias[[ANT, BEE]])
    model.classifier[1] = head
    normalize = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    return save_weights(path, model.state_dict(), ["ants", "bees"], "mobilenet_v2", normalize=normalize, image_size=224, load_size=256,
                        precision="no")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="a model.pt of the ants/bees classes (default: built here, see above)")
    parser.add_argument("--data", default=str(VAL), help="the photos: <class>/<images> (default: the 153 ants/bees val photos)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not Path(args.data).is_dir() or (args.weights is None and not IMAGENET_WEIGHTS.is_file()):
        missing = args.data if not Path(args.data).is_dir() else IMAGENET_WEIGHTS
        print(f"skipped: {missing} is not here (the ants/bees photos and the ImageNet weights come with ../shared)")
        return 0

    from disttrain.data.decode import load_presized
    from disttrain.use.export import export
    from disttrain.use.exported import OnnxModel
    from disttrain.use.inference import load_saved_model
    from disttrain.models.forward import batch_outputs, eval_view
    from disttrain.use.inputs import list_labelled

    scratch = Path(tempfile.mkdtemp(prefix="disttrain-export-bench-"))
    if args.weights:
        weights, which = Path(args.weights), f"{args.weights}"
    else:
        weights = build_ants_bees(scratch / "model.pt")
        which = "MobileNetV2, ImageNet weights, head = ImageNet's ant/bee rows (built here, not fine-tuned)"
    result = export(weights, "onnx", scratch / "model.onnx")
    saved = load_saved_model(weights, torch.device("cpu"))
    served = OnnxModel(result.path)
    inputs = list_labelled(Path(args.data), saved.classes, str(weights))
    paths, labels = inputs.paths, torch.tensor(inputs.labels)
    view = eval_view(saved.image_size, saved.mean, saved.std, interpolation=saved.interpolation)
    starts = range(0, len(paths), args.batch)

    def decode() -> list[torch.Tensor]:
        return [torch.stack([torch.from_numpy(load_presized(p, saved.load_size)) for p in paths[s:s + args.batch]]) for s in starts]

    def pytorch(batches):
        with torch.no_grad():
            return torch.cat([batch_outputs(saved.model, view, b, torch.no_grad)[1] for b in batches])

    def onnxruntime(batches):
        return torch.cat([served.probabilities(b) for b in batches])

    times = {"decode": [], "pytorch": [], "onnxruntime": []}
    batches = decode()
    pytorch(batches[:1]), onnxruntime(batches[:1])  # warm up both
    for _ in range(args.repeats):
        start = time.perf_counter()
        batches = decode()
        times["decode"].append(time.perf_counter() - start)
        for name, run in (("pytorch", pytorch), ("onnxruntime", onnxruntime)):
            start = time.perf_counter()
            probs = run(batches)
            times[name].append(time.perf_counter() - start)
            if name == "pytorch":
                p_torch = probs
            else:
                p_onnx = probs
    best = {name: min(values) for name, values in times.items()}
    n = len(paths)
    print(f"\n{n} photos of {args.data}, batch {args.batch}, 1 process, {torch.get_num_threads()} threads, fp32, best of {args.repeats}")
    print(f"model: {which}")
    print(f"exported: {result.size_bytes / 1e6:.1f} MB ONNX in {result.seconds:.1f} s, "
          f"verified max abs difference {result.max_difference:.3g}\n")
    print("| engine | model only: s, images/s | with decoding: s, images/s |")
    print("|---|---|---|")
    print(f"| decoding + presize alone | - | {best['decode']:.2f} s, {n / best['decode']:.1f} |")
    for name in ("pytorch", "onnxruntime"):
        total = best["decode"] + best[name]
        print(f"| {name} | {best[name]:.2f} s, {n / best[name]:.1f} | {total:.2f} s, {n / total:.1f} |")
    ratio = best["pytorch"] / best["onnxruntime"]
    total_ratio = (best["decode"] + best["pytorch"]) / (best["decode"] + best["onnxruntime"])
    print(f"\nonnxruntime / PyTorch images/s: {ratio:.2f}x model only, {total_ratio:.2f}x with decoding")
    differ = (p_torch.argmax(1) != p_onnx.argmax(1)).sum().item()
    print(f"probabilities: max abs difference {(p_torch - p_onnx).abs().max().item():.3g}, labels differing {differ}/{n}")
    for name, probs in (("pytorch", p_torch), ("onnxruntime", p_onnx)):
        correct = (probs.argmax(1) == labels).sum().item()
        print(f"accuracy {name}: {correct / n:.3f} ({correct}/{n})")
    for leftover in scratch.iterdir():
        leftover.unlink()
    scratch.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
