"""What freezing saves: the training step of a pretrained-body classifier frozen (head only, with
and without its norm layers training) against unfrozen, and the precomputed head stage.

    python benchmarks/finetune.py [--model mobilenet_v2] [--batch 16] [--size 224] [--steps N]
                                  [--precision fp32|bf16] [--images 245]

One process, the available device, random inputs (the step's cost does not depend on the pixels).
Each step is forward + backward + AdamW step in train mode, channels_last. Variants:
  unfrozen                  every layer trains (a stage with freeze_to: 0);
  frozen, train_bn: true    freeze_to: -1; the frozen groups' norm layers still train (fastai's
                            default), so backward still runs through the whole body;
  frozen, train_bn: false   freeze_to: -1, norms frozen too: backward stops at the head;
  precomputed head          the head alone on the body's pooled output (a stage with precompute:
                            true), after the body ran once per image (`--images`, the
                            ants/bees train set by default; its cost is printed separately).
Ratios are against the unfrozen step measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torchvision

from augment import seconds_per_call as timed  # benchmarks/augment.py: the same timing loop
from disttrain.config import frozen_groups
from disttrain.models.groups import freeze, split_layer_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 30 on CUDA, 4 on CPU)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--images", type=int, default=245, help="images the precomputation runs the body on")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    steps = args.steps or (30 if device.type == "cuda" else 4)
    print(f"device: {name}, {args.model}, batch {args.batch} at {args.size} px, {args.precision}, {steps} timed steps")

    def autocast():
        if args.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, num_classes=2).to(device, memory_format=torch.channels_last)
    groups = split_layer_groups(model, 3)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (args.batch,), device=device)

    def step_of(net: torch.nn.Module, inputs: torch.Tensor):
        optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)

        def step() -> None:
            with autocast():
                loss = torch.nn.functional.cross_entropy(net(inputs), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    results = {}
    for label, frozen, train_bn in (("unfrozen", 0, True), ("frozen, train_bn: true", -1, True), ("frozen, train_bn: false", -1, False)):
        model.train()
        fixed = freeze(model, groups, frozen_groups(frozen, len(groups)), train_bn)
        for module in fixed:
            module.eval()
        results[label] = timed(step_of(model, x), device, steps)

    head_name = groups[-1].blocks[0]
    head = model.get_submodule(head_name)
    features = {}
    hook = head.register_forward_pre_hook(lambda module, inp: features.__setitem__("x", inp[0].detach()))
    model.eval()
    with torch.no_grad(), autocast():
        body_s = timed(lambda: model(x), device, steps)
    hook.remove()
    head.train()
    results["precomputed head"] = timed(step_of(head, features["x"].float()), device, max(steps, 50))

    base = results["unfrozen"]
    for label, seconds in results.items():
        print(f"{label:<24} {seconds * 1000:9.2f} ms/step  {args.batch / seconds:9.0f} images/s  {seconds / base:6.3f} x unfrozen")
    per_image = body_s / args.batch
    print(f"precomputing the body's output: {1 / per_image:.1f} images/s, {args.images * per_image:.1f} s for {args.images} images "
          f"(once per stage, split across ranks); then a head epoch of {args.images} images takes "
          f"{results['precomputed head'] * args.images / args.batch:.3f} s against "
          f"{results['frozen, train_bn: false'] * args.images / args.batch:.1f} s frozen on images")


if __name__ == "__main__":
    main()
