"""A resumed run's DDP gradient buckets laid out as the uninterrupted run's were, before its first step.

DDP all-reduces its first step's gradients as one bucket, then rebuilds its buckets in the order the
gradients became ready. An all-reduce adds the ranks' values of an element in an order that depends
on where the element sits in its bucket (the ring's chunk): on 3 or more ranks (with 2, a + b =
b + a) the one-bucket step rounds otherwise than a step with the rebuilt buckets. The run that never
stopped spent its wrapper's first step at the stage's start (or in its LR sweep); a run resumed in
the middle of a stage would spend it on the step it resumes at, and part from the uninterrupted run
in the last bits from there on.

So before that step the resumed run rehearses one: a forward and backward of its first batch with
the loss times zero, all-reduced like any step (DDP records the order the gradients become ready,
and rebuilds its buckets at the next forward), then the gradients dropped, and the BatchNorm
statistics and random generators the rehearsal moved set back. Its cost is one step's compute and
all-reduce, once per resume; the buckets themselves stay torch's own (overlapping the backward).
"""

from __future__ import annotations

from typing import Callable

import torch
from accelerate import Accelerator
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def settle_buckets(acc: Accelerator, model: nn.Module, forward: Callable, x: torch.Tensor, labels: torch.Tensor,
                   loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
    """Rehearse one step of `model` (the DDP wrapper; `forward`, it or its compiled form) on `x`;
    False (nothing done) when `model` is not wrapped (one process)."""
    if not isinstance(model, DistributedDataParallel):
        return False
    buffers = [buffer.detach().clone() for buffer in model.module.buffers()]
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
    with acc.autocast():
        logits = forward(x)
    acc.backward(loss(logits.float(), labels) * 0.0)
    for param in model.parameters():
        param.grad = None
    with torch.no_grad():
        for saved, buffer in zip(buffers, model.module.buffers()):
            buffer.copy_(saved)
    torch.random.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, x.device)
    return True
