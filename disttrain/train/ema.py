"""The exponential moving average of the weights (train.ema, train.ema_warmup, train.ema_every).

The average lives in a copy of the bare model, on the model's device and in its memory format, and
is updated in place after the optimizer step by one `torch._foreach_lerp_` over all floating-point
parameters: no host synchronization, no communication. Every rank holds the same weights after each
step (DDP all-reduces the gradients), so every rank computes the same average on its own. The
buffers (BatchNorm statistics) are not the same on every rank between two syncs (each rank updates
them from its own batch), so they are copied where the ranks agree: after the epoch-end sync
(`take_buffers`), as timm's train.py distributes the EMA's BatchNorm statistics at each epoch end.

Every parameter is tracked from the start, frozen ones included: a frozen weight equals its average
and lerp(a, a, w) == a exactly, so it stays bitwise the same until a later stage unfreezes it, from
when on it is averaged like the rest. Nothing has to be added to the EMA when a stage unfreezes.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

WARMUP_GAMMA = 1.0
"""timm ModelEmaV3's warmup_gamma (crowsonkb's inv_gamma): the step scale of the warmup."""

WARMUP_POWER = 2 / 3
"""timm ModelEmaV3's warmup_power: with gamma 1, the warmed-up decay reaches 0.999 at about 31.6K
steps and 0.9999 at about 1M, so it only limits the decay early in a run."""


def _tensors(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The module's parameters and buffers by state_dict name (tied tensors once, as
    named_parameters lists them, so that no tensor is averaged twice per update)."""
    return dict(module.named_parameters()), dict(module.named_buffers())


def _check_names(kind: str, ema: dict[str, torch.Tensor], model: dict[str, torch.Tensor]) -> None:
    """The EMA and the model must hold the same tensors: same names, shapes, dtypes and devices."""
    if ema.keys() != model.keys():
        missing = sorted(ema.keys() - model.keys())[:3]
        extra = sorted(model.keys() - ema.keys())[:3]
        raise ValueError(
            f"weight EMA: the model's {kind} are not those the EMA was made from (missing {missing}, "
            f"unexpected {extra}); pass the bare model (not the DDP or torch.compile wrapper, whose names "
            f"start with 'module.' or '_orig_mod.'), the same one the EMA was made from")
    for name, ema_t in ema.items():
        model_t = model[name]
        if (ema_t.shape, ema_t.dtype, ema_t.device) != (model_t.shape, model_t.dtype, model_t.device):
            raise ValueError(
                f"weight EMA: {kind[:-1]} {name!r} is {tuple(model_t.shape)} {model_t.dtype} on {model_t.device} "
                f"in the model but {tuple(ema_t.shape)} {ema_t.dtype} on {ema_t.device} in the EMA; make "
                f"the EMA after the model is on its device, in its dtype and with its final layers")


class WeightEma:
    """An exponential moving average of a model's weights, kept in `self.module` (a copy of the model
    in eval mode, no gradients) for evaluation and saving.

    `update(model, step)` after each optimizer step; `state_dict()` / `load_state_dict()` for
    checkpoints (bitwise); `take_buffers(model)` where the ranks' buffers agree."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = False, every: int = 1):
        """`module`: the bare model being trained (under DDP its `.module`), already on its device and
        in its memory format. `decay`: the weight of the old average per update, in (0, 1).
        `warmup`: lower the decay early in the run as timm's ModelEmaV3 (see `decay_at`). `every`:
        update every this many optimizer steps."""
        if not 0 < decay < 1:
            raise ValueError(f"weight EMA: decay must be in (0, 1) (e.g. 0.999), got {decay!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"weight EMA: every must be a whole number of optimizer steps >= 1, got {every!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.every = every
        self.updates = 0
        """Updates applied so far (checkpointed with the weights)."""
        self.started = 0
        """Optimizer steps done when the average (re)started (`restart`): the warmup counts from there."""
        self.module = copy.deepcopy(module)
        self.module.eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
            param.grad = None
        self._pair(module)

    def _pair(self, module: nn.Module) -> None:
        """Cache the (EMA tensor, model tensor) lists that `update` hands to the foreach kernels:
        floating-point parameters are averaged, any non-float parameter copied (the buffers are
        looked up by `take_buffers` each time); the names must match, buffers' too."""
        ema_params, ema_buffers = _tensors(self.module)
        model_params, model_buffers = _tensors(module)
        _check_names("parameters", ema_params, model_params)
        _check_names("buffers", ema_buffers, model_buffers)
        self._source = module
        lerp = [name for name, t in ema_params.items() if t.is_floating_point()]
        copied = [name for name, t in ema_params.items() if not t.is_floating_point()]
        self._lerp_ema = [ema_params[name] for name in lerp]
        self._lerp_model = [model_params[name] for name in lerp]
        self._copy_ema = [ema_params[name] for name in copied]
        self._copy_model = [model_params[name] for name in copied]

    def decay_at(self, step: int) -> float:
        """The decay of the update made after optimizer step `step`, counted from 1 (the optimizer
        steps done, the one just taken included: timm train.py's `num_updates`, which it passes to
        ModelEmaV3.update as `step`).

        Without warmup: `decay`. With warmup, as ModelEmaV3.get_decay (which subtracts one from the
        step it is given): max(0, min(decay, 1 - (1 + (step - 1) / WARMUP_GAMMA) ** -WARMUP_POWER)),
        so the update after the first optimizer step has decay 0 and copies the weights. After a
        `restart(module, step)` the warmup counts the steps from that one."""
        if step < 1:
            raise ValueError(f"weight EMA: step counts the optimizer steps done (from 1), got {step}")
        if not self.warmup:
            return self.decay
        warmed = 1.0 - (1.0 + (step - self.started - 1) / WARMUP_GAMMA) ** -WARMUP_POWER
        return max(0.0, min(self.decay, warmed))

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> bool:
        """Average the weights of `module` (the bare model the EMA was made from) into the EMA if
        `step` (optimizer steps done, this one included) is a multiple of `every`. Returns whether it
        updated. The buffers (BatchNorm statistics) are not touched here: under DDP each rank's
        statistics follow its own batches between two syncs, so they are taken at the sync
        (`take_buffers`), where every rank holds the same."""
        if step < 1:
            raise ValueError(f"weight EMA: step counts the optimizer steps done (from 1), got {step}")
        if step % self.every:
            return False
        if module is not self._source:
            self._pair(module)
        weight = 1.0 - self.decay_at(step)
        if self._lerp_ema:
            torch._foreach_lerp_(self._lerp_ema, self._lerp_model, weight)
        if self._copy_ema:
            torch._foreach_copy_(self._copy_ema, self._copy_model)
        self.updates += 1
        return True

    @torch.no_grad()
    def take_buffers(self, module: nn.Module) -> None:
        """Copy `module`'s buffers (BatchNorm running statistics, num_batches_tracked) into the EMA:
        call it where the ranks' buffers agree (after the epoch-end sync of the validation), so the
        EMA stays the same on every rank."""
        own, theirs = dict(self.module.named_buffers()), dict(module.named_buffers())  # looked up now: a DDP
        # wrapper may have given the model new buffer tensors since the pairs were made
        _check_names("buffers", own, theirs)
        if own:
            torch._foreach_copy_(list(own.values()), [theirs[name] for name in own])

    def state_dict(self) -> dict:
        """{"weights": {state_dict name: CPU copy}, "updates": int}, for the checkpoint."""
        weights = {name: t.detach().to("cpu", copy=True) for name, t in self.module.state_dict().items()}
        return {"weights": weights, "updates": self.updates, "started": self.started}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` gave, bitwise, into the EMA's own tensors (in place: the cached
        pairs and the memory format stay)."""
        weights = state["weights"]
        own = self.module.state_dict()
        if own.keys() != weights.keys():
            missing = sorted(own.keys() - weights.keys())[:3]
            extra = sorted(weights.keys() - own.keys())[:3]
            raise ValueError(
                f"weight EMA: the checkpoint's EMA weights are not this model's (missing {missing}, "
                f"unexpected {extra}); resume with the model the checkpoint was written by")
        for name, t in own.items():
            if t.shape != weights[name].shape:
                raise ValueError(
                    f"weight EMA: the checkpoint's {name!r} is {tuple(weights[name].shape)}, the model's "
                    f"{tuple(t.shape)}; resume with the model the checkpoint was written by")
            t.copy_(weights[name])
        self.updates = int(state["updates"])
        self.started = int(state.get("started", 0))

    @torch.no_grad()
    def restart(self, module: nn.Module, step: int) -> None:
        """Start the average again from `module`'s weights as they are after `step` optimizer steps
        (a stage that updates the EMA after one that did not: the weights moved without it)."""
        if module is not self._source:
            self._pair(module)
        torch._foreach_copy_(self._lerp_ema + self._copy_ema, self._lerp_model + self._copy_model)
        self.take_buffers(module)
        self.started = step
