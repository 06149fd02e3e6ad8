import io

import pytest
import torch
from torch import nn

from disttrain.train.ema import WARMUP_GAMMA, WARMUP_POWER, WeightEma

EPS32 = torch.finfo(torch.float32).eps


def _warm(decay, step):
    """ModelEmaV3's warmed-up decay at optimizer step `step` (1-based), written from its formula."""
    return max(0.0, min(decay, 1 - (1 + (step - 1) / WARMUP_GAMMA) ** -WARMUP_POWER))


def _set(module, fn):
    """Set every floating parameter of `module` in place to fn(name, tensor) (what an optimizer
    step does: same tensors, new values)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(fn(name, p))


def _equal_states(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_decay_at_follows_timm_warmup_formula_and_step_convention():
    ema = WeightEma(nn.Linear(2, 2), decay=0.9999, warmup=True)
    for step in (1, 2, 3, 10, 100, 1000, 31622, 31623, 10**6, 10**8):
        assert ema.decay_at(step) == _warm(0.9999, step)
    assert ema.decay_at(1) == 0.0, "the update after the first optimizer step copies the weights"
    assert ema.decay_at(2) == pytest.approx(1 - 2 ** (-2 / 3))
    # crowsonkb's note in ModelEmaV3: gamma 1, power 2/3 reaches 0.999 at about 31.6K steps;
    # (1 + t)^(2/3) = 1000 at 1 + t = 31622.78, i.e. t = 31622 = step 31623 under timm's step - 1
    assert ema.decay_at(31622) < 0.999 <= ema.decay_at(31623)
    steps = range(1, 5000, 7)
    assert all(ema.decay_at(a) <= ema.decay_at(b) for a, b in zip(steps, steps[1:]))

    capped = WeightEma(nn.Linear(2, 2), decay=0.99, warmup=True)
    assert capped.decay_at(10**4) == 0.99 and capped.decay_at(10**9) == 0.99
    assert capped.decay_at(5) == _warm(0.99, 5) < 0.99

    plain = WeightEma(nn.Linear(2, 2), decay=0.99)
    assert [plain.decay_at(s) for s in (1, 2, 50, 10**6)] == [0.99] * 4
    with pytest.raises(ValueError, match="from 1"):
        plain.decay_at(0)


def test_bad_arguments_are_refused():
    for decay in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="decay"):
            WeightEma(nn.Linear(2, 2), decay=decay)
    for every in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="every"):
            WeightEma(nn.Linear(2, 2), decay=0.9, every=every)
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="from 1"):
        WeightEma(model, decay=0.9).update(model, 0)


def test_copy_is_eval_without_grad_on_same_tensors_layout():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    ema = WeightEma(model, decay=0.9)
    assert not ema.module.training and all(not m.training for m in ema.module.modules())
    assert all(not p.requires_grad and p.grad is None for p in ema.module.parameters())
    assert model.training and model[0].weight.requires_grad, "the trained model is left as it was"
    assert _equal_states(ema.module, model)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(ema.module.parameters(), model.parameters()))


def test_update_every_three_steps_only():
    model = nn.Linear(1, 1, bias=False)
    _set(model, lambda n, p: torch.zeros_like(p))
    ema = WeightEma(model, decay=0.5, every=3)
    done, seen = [], []
    for step in range(1, 8):
        _set(model, lambda n, p: torch.full_like(p, float(step)))
        done.append(ema.update(model, step))
        seen.append(ema.module.weight.item())
    assert done == [False, False, True, False, False, True, False]
    assert ema.updates == 2
    # 0 -> lerp(0, 3, 0.5) = 1.5 at step 3 -> lerp(1.5, 6, 0.5) = 3.75 at step 6 (exact in float32)
    assert seen == [0.0, 0.0, 1.5, 1.5, 1.5, 3.75, 3.75]


def test_fixed_decay_matches_closed_form_within_float32_rounding():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    _set(model, lambda n, p: torch.randn_like(p))
    start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    decay, n_updates = 0.9, 60
    ema = WeightEma(model, decay=decay)
    expected = {n: decay ** n_updates * t for n, t in start.items()}
    biggest = max(t.abs().max().item() for t in start.values())
    for i in range(1, n_updates + 1):
        _set(model, lambda n, p: torch.randn_like(p) * 2)
        biggest = max(biggest, max(p.abs().max().item() for p in model.parameters()))
        for n, p in model.named_parameters():  # e_N = d^N e_0 + sum_i (1 - d) d^(N - i) w_i
            expected[n] += (1 - decay) * decay ** (n_updates - i) * p.detach().double()
        assert ema.update(model, i)
    # Each float32 lerp e + w (x - e) rounds four times (x - e, the weight 1 - d, the product, the sum),
    # each by at most eps/2 relative to a value of at most 2 * max|.|: under 4 eps max|.| per update;
    # earlier errors are multiplied by d < 1 at each later update, so they add up to at most N times that.
    # This is the worst case, not what one machine's rounding happens to give.
    tol = 4 * n_updates * EPS32 * biggest
    for n, p in ema.module.named_parameters():
        err = (p.double() - expected[n]).abs().max().item()
        assert err <= tol, f"{n}: {err} > {tol}"
    # the bound is tight enough to catch a wrong decay (the weight of the new value swapped)
    swapped = {n: (1 - decay) ** n_updates * t for n, t in start.items()}
    assert max((swapped[n] - expected[n]).abs().max().item() for n in start) > 1000 * tol


def test_warmup_first_update_copies_the_weights_bitwise():
    torch.manual_seed(1)
    model = nn.Linear(4, 3)
    ema = WeightEma(model, decay=0.999, warmup=True)
    _set(model, lambda n, p: torch.randn_like(p))
    assert ema.update(model, 1)
    assert _equal_states(ema.module, model)
    before = ema.module.weight.clone()
    _set(model, lambda n, p: p + 1)
    ema.update(model, 2)
    w = 1 - ema.decay_at(2)
    x = model.weight.detach().double()
    ref = before.double() + w * (x - before.double())
    scale = max(before.abs().max().item(), x.abs().max().item())  # one lerp: 4 roundings, see above
    assert (ema.module.weight.double() - ref).abs().max().item() <= 4 * EPS32 * scale


def test_buffers_are_taken_at_the_sync_not_at_each_update():
    """Under DDP each rank's BatchNorm statistics follow its own batches between two syncs: the
    updates leave the EMA's buffers alone, `take_buffers` (after the epoch-end sync) copies them."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    ema = WeightEma(model, decay=0.99)
    initial = {k: v.clone() for k, v in ema.module[1].named_buffers()}
    for step in range(1, 4):
        model(torch.randn(8, 3) * step)
        ema.update(model, step)
    bn, ema_bn = model[1], ema.module[1]
    assert int(bn.num_batches_tracked) == 3
    for name, value in initial.items():
        assert torch.equal(getattr(ema_bn, name), value), name
    ema.take_buffers(model)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ema_bn, name), getattr(bn, name)), name
    assert ema_bn.num_batches_tracked.dtype == torch.long


def test_frozen_parameter_stays_bitwise_then_moves_once_unfrozen():
    a = torch.randn(1000) * torch.logspace(-30, 30, 1000)
    for w in (0.0, 1e-7, 1e-4, 0.3, 0.5, 0.5000001, 0.7, 1 - 1e-7, 1.0):
        x = a.clone()
        torch._foreach_lerp_([x], [a], w)
        assert torch.equal(x, a), w

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    ema = WeightEma(model, decay=0.9, warmup=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    step = 0

    def train(n):
        nonlocal step
        for _ in range(n):
            opt.zero_grad()
            model(torch.randn(5, 4)).square().mean().backward()
            opt.step()
            step += 1
            ema.update(model, step)

    train(5)
    assert torch.equal(ema.module[0].weight, frozen) and torch.equal(model[0].weight, frozen)
    assert not torch.equal(ema.module[2].weight, model[2].weight), "the trained layer is averaged"
    model[0].requires_grad_(True)  # a later stage unfreezes: the EMA needs nothing new
    opt.add_param_group({"params": list(model[0].parameters())})
    train(3)
    assert not torch.equal(model[0].weight, frozen)
    assert not torch.equal(ema.module[0].weight, frozen), "an unfrozen parameter is averaged from then on"


def _random_walk(model, step):
    g = torch.Generator().manual_seed(1000 + step)
    _set(model, lambda n, p: p + 0.1 * torch.randn(p.shape, generator=g))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(0.01 * step)
                m.num_batches_tracked.add_(1)


def _conv_model():
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_state_dict_round_trip_continues_bitwise():
    kw = dict(decay=0.95, warmup=True, every=2)
    model = _conv_model()
    whole = WeightEma(model, **kw)
    for step in range(1, 11):
        _random_walk(model, step)
        whole.update(model, step)

    model = _conv_model()
    first = WeightEma(model, **kw)
    for step in range(1, 6):
        _random_walk(model, step)
        first.update(model, step)
    state = first.state_dict()
    assert state["updates"] == 2
    assert all(t.device.type == "cpu" for t in state["weights"].values())
    saved = {k: v.clone() for k, v in state["weights"].items()}
    first.update(model, 6)
    assert all(torch.equal(saved[k], v) for k, v in state["weights"].items()), "the state is a copy"
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    resumed = WeightEma(model, **kw)  # made from the step-5 model, then given the checkpoint
    assert not _equal_states(resumed.module, first.module)
    resumed.load_state_dict(state)
    assert resumed.updates == 2
    for step in range(6, 11):
        _random_walk(model, step)
        resumed.update(model, step)
    assert resumed.updates == whole.updates == 5
    assert _equal_states(resumed.module, whole.module)

    with pytest.raises(ValueError, match="unexpected"):
        WeightEma(nn.Linear(2, 2), decay=0.9).load_state_dict(state)


def test_channels_last_conv_model():
    model = _conv_model().to(memory_format=torch.channels_last)
    ema = WeightEma(model, decay=0.75)
    weight = ema.module[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    before = {n: p.detach().clone() for n, p in ema.module.named_parameters()}
    _random_walk(model, 1)
    assert ema.update(model, 1)
    assert ema.module[0].weight is weight and weight.is_contiguous(memory_format=torch.channels_last)
    for n, p in ema.module.named_parameters():
        x = dict(model.named_parameters())[n].detach()
        scale = max(before[n].abs().max().item(), x.abs().max().item())
        ref = before[n].double() + 0.25 * (x.double() - before[n].double())
        assert (p.double() - ref).abs().max().item() <= 4 * EPS32 * scale, n
    ema.take_buffers(model)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)
    ema.load_state_dict(ema.state_dict())
    assert ema.module[0].weight.is_contiguous(memory_format=torch.channels_last)


class _Wrapper(nn.Module):
    """Holds the model as `.module`, as DDP does: its names start with 'module.'."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_wrapped_model_is_refused_and_replaced_tensors_are_re_paired():
    model = _conv_model()
    ema = WeightEma(model, decay=0.5)
    with pytest.raises(ValueError, match="bare model"):
        ema.update(_Wrapper(model), 1)
    # load_state_dict(assign=True) gives the model new tensors, and a model object of its own is re-paired
    other = _conv_model()
    other.load_state_dict({k: v.clone() + 1 for k, v in model.state_dict().items()}, assign=True)
    before = ema.module[0].weight.clone()
    ema.update(other, 1)
    assert torch.equal(ema.module[0].weight, torch.lerp(before, other[0].weight.detach(), 0.5))
    with torch.no_grad():
        other[1].running_mean.fill_(3.0)
    ema.take_buffers(other)
    assert torch.equal(ema.module[1].running_mean, other[1].running_mean)
    with pytest.raises(ValueError, match="float64"):
        ema.update(_conv_model().double(), 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_update_on_cuda_never_synchronizes_with_the_host():
    model = _conv_model().cuda().to(memory_format=torch.channels_last)
    ema = WeightEma(model, decay=0.99, warmup=True)
    assert all(p.is_cuda for p in ema.module.parameters())
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.01)
            ema.update(model, step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ema.updates == 3


def test_take_buffers_follows_buffers_replaced_after_the_ema_was_made():
    """A DDP wrapper built after the EMA gives the bare model new buffer tensors (seen with torch's
    gloo DDP: every buffer of the model): the buffers are looked up when they are taken."""
    model = _conv_model()
    ema = WeightEma(model, decay=0.5)
    model[1].register_buffer("running_mean", torch.full_like(model[1].running_mean, 7.0))
    ema.take_buffers(model)
    assert torch.equal(ema.module[1].running_mean, torch.full_like(model[1].running_mean, 7.0))
