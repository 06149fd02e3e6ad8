"""fastai's own answers to LR-sweep curves: the fixture tests/data/fastai_lr_rules.json that
tests/unit/test_lr_sweep.py checks disttrain's suggestion rules against. Run it once with the peer
venv's python (fastai is not a dependency of disttrain) and commit the JSON:

    bash benchmarks/peers/fastai_venv.sh                          # once: ~/.cache/disttrain/peer-fastai
    ~/.cache/disttrain/peer-fastai/bin/python benchmarks/peers/fastai_lr_rules.py \\
        --real runs/demo/lr_sweep.json ... --out tests/data/fastai_lr_rules.json

The committed fixture: the defaults (seed 0, 30 curves of each kind) plus two real sweeps of the
MNIST demo, one process, fp32 (`disttrain demo-data /tmp/mnist`, then `disttrain find-lr --config
configs/demo.yaml data.root=/tmp/mnist train.precision=no log.wandb.mode=disabled`, once as is and
once with `run.name=demo50 run.seed=1 sweep.num_iter=50`).

The curves: a few hundred seeded synthetic ones (falling lines, rising lines, flat-then-fall-
then-blow-up, noisy, bumpy, flat, early stops, a loss turning NaN), each recorded the way
disttrain's sweep loop records one (debiased EMA of the raw losses, stop at the first smoothed
loss that is not finite or exceeds 4 x the best so far, that point included), plus the real
`lr_sweep.json` curves given with --real.

fastai's answers come from fastai's own `Learner.lr_find` code path: `Learner.lr_find` runs on a
stand-in learner whose `fit` does nothing and whose `recorder` already holds the curve (`lrs` as
Python floats, `losses` as 0-d float32 tensors, as fastai's Recorder stores `smooth_loss.value`),
so fastai's trimming (`[num_it // 10 : -5]`), its conversion to float32 tensors, its NaN cut and its
call of each suggestion function (`valley`, `slide`, `minimum`, `steep` from
fastai.callback.schedule, one `lr_find` call per function, since a function that fails on a curve
fails the whole call) are fastai's. A wrapper around each function records what it was fed.

Values are stored rounded (LRs to 4 significant digits, losses to 5) and are float32: each stored
decimal, read as float32, is exactly the value fastai was fed. Per curve and rule the fixture holds
fastai's answer and the index of the point it picked in the curve fastai was fed (`fed`: the slice
[a, b) of the stored curve), or the error fastai raised.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import fastai
from fastai.callback.schedule import minimum, slide, steep, valley
from fastai.learner import Learner

RULES = {"valley": valley, "slide": slide, "minimum": minimum, "steep": steep}
GRIDS = [(1e-7, 10.0), (1e-6, 1.0), (1e-5, 1.0), (1e-5, 10.0), (1e-6, 10.0)]
LENGTHS = [20, 30, 50, 100, 100, 100, 150, 200]


def sweep_lrs(start: float, end: float, n: int) -> list[float]:
    """disttrain's sweep schedule: exactly `start` first and `end` last."""
    return [start * (end / start) ** (i / (n - 1)) for i in range(n)]


def record(raw: np.ndarray, beta: float, divergence: float = 4.0) -> list[float]:
    """The smoothed curve disttrain's sweep loop records for these raw losses (debiased EMA, stop at
    the first non-finite or divergent smoothed loss, which is kept)."""
    avg, best, out = 0.0, math.inf, []
    for n, loss in enumerate(raw, start=1):
        if not math.isfinite(loss):
            out.append(math.nan)
            break
        avg = beta * avg + (1 - beta) * float(loss)
        value = avg / (1 - beta**n)
        out.append(value)
        if value > divergence * best:
            break
        best = min(best, value)
    return out


def f32(x: float, digits: int) -> float:
    """x rounded to `digits` significant digits, as the float32 it becomes (NaN stays NaN)."""
    return x if math.isnan(x) else float(np.float32(float(f"{x:.{digits}g}")))


def short(x: float) -> float | None:
    """The shortest decimal that reads back as the same float32 (for a small JSON file)."""
    return x if math.isnan(x) else float(str(np.float32(x)))


def synthetic(rng: np.random.Generator, kind: str) -> tuple[dict, np.ndarray, float]:
    """One random curve of `kind`: (its description, raw losses over the whole sweep, EMA beta)."""
    n = int(rng.choice(LENGTHS))
    start, end = GRIDS[int(rng.integers(len(GRIDS)))]
    lrs = np.array(sweep_lrs(start, end, n))
    x = np.log10(lrs)
    t = np.linspace(0, 1, n)
    beta = float(rng.choice([0.98, 0.98, 0.95, 0.9, 0.7]))
    level = rng.uniform(0.5, 3.0)
    noise = rng.uniform(0.0, 0.01) * level

    def fall(center, width, depth):
        return -depth / (1 + np.exp(-(x - center) / width))

    def blow(at, power):
        return np.clip(x - at, 0.0, None) ** power * level * rng.uniform(0.5, 3)

    lo, hi = x[0], x[-1]
    if kind == "falling_line":
        raw = level * (1 - rng.uniform(0.2, 0.9) * t)
    elif kind == "rising_line":
        raw = level * (1 + rng.uniform(0.1, 2.0) * t)
    elif kind == "flat":
        raw = np.full(n, level)
        noise = rng.uniform(0.005, 0.05) * level
    elif kind in ("fall_blowup", "noisy", "nan"):
        c = rng.uniform(lo + 0.3 * (hi - lo), lo + 0.7 * (hi - lo))
        raw = level + fall(c, rng.uniform(0.1, 0.6), level * rng.uniform(0.3, 0.8))
        raw = raw + blow(c + rng.uniform(0.5, 2.5), 2)
        if kind == "noisy":
            noise = rng.uniform(0.02, 0.3) * level
    elif kind == "early_stop":
        at = rng.uniform(lo + 0.05 * (hi - lo), lo + 0.45 * (hi - lo))
        raw = level + fall(at - 0.3, 0.2, level * rng.uniform(0, 0.5)) + blow(at, rng.uniform(1.5, 3))
    elif kind == "bumpy":
        c = rng.uniform(lo + 0.3 * (hi - lo), lo + 0.7 * (hi - lo))
        raw = level + fall(c, rng.uniform(0.2, 0.8), level * 0.5)
        raw = raw + level * rng.uniform(0.02, 0.15) * np.sin(x * rng.uniform(2, 8))
        raw = raw + blow(c + rng.uniform(1.0, 3.0), 2)
    else:
        raise ValueError(kind)
    raw = raw + rng.normal(0.0, 1.0, n) * noise
    if kind == "nan":
        raw[int(rng.integers(n // 3, n))] = math.nan
    return {"kind": kind, "num_iter": n, "lrs": lrs}, raw, beta


class StandIn:
    """The parts of a Learner `lr_find` touches, with the curve already recorded."""

    def __init__(self, lrs: list[float], losses: list[float]):
        self.dls = SimpleNamespace(train=range(10))
        self.recorder = SimpleNamespace(lrs=list(lrs), losses=[torch.tensor(v, dtype=torch.float32) for v in losses])

    def fit(self, n_epoch, cbs=None):
        pass  # the sweep already ran: `recorder` holds its curve

    @contextmanager
    def no_logging(self):
        yield


def fastai_answers(lrs: list[float], smoothed: list[float], num_iter: int) -> tuple[list[int] | None, dict]:
    """fastai's four answers through `Learner.lr_find`: (the fed slice [a, b) of the curve, None
    when fastai fed its functions no point; {rule: {"lr", "index"} or {"error"}})."""
    fed, answers = [], {}
    for name, func in RULES.items():
        seen = {}

        @functools.wraps(func)
        def spy(lrs_t, losses_t, num_it, func=func, seen=seen):
            seen["lrs"], seen["losses"] = lrs_t.clone(), losses_t.clone()
            return func(lrs_t, losses_t, num_it)

        try:
            lr = getattr(Learner.lr_find(StandIn(lrs, smoothed), num_it=num_iter, show_plot=False, suggest_funcs=(spy,)), name)
        except Exception as err:  # fastai has no answer on this curve
            answer = {"error": f"{type(err).__name__}: {err}"}
        else:
            given = [float(v) for v in seen["lrs"]]
            picked = [i for i, v in enumerate(given) if (v / 10 if name == "minimum" else v) == lr]
            assert len(picked) == 1, (name, lr)
            answer = {"lr": lr, "index": picked[0]}
        answers[name] = answer
        assert seen["lrs"].dtype == seen["losses"].dtype == torch.float32
        given = [float(v) for v in seen["lrs"]]
        a = lrs.index(given[0]) if given else None
        assert not given or given == lrs[a : a + len(given)]
        assert [float(v) for v in seen["losses"]] == smoothed[a : a + len(given)] if given else True
        fed.append(None if a is None else [a, a + len(given)])
    assert all(f == fed[0] for f in fed), fed
    return fed[0], answers


def curve_entry(name: str, kind: str, num_iter: int, lrs: list[float], smoothed: list[float]) -> dict:
    fed, answers = fastai_answers(lrs, smoothed, num_iter)
    return {"name": name, "kind": kind, "num_iter": num_iter, "lrs": [short(v) for v in lrs],
            "smoothed": [short(v) for v in smoothed], "fed": fed, "fastai": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tests/data/fastai_lr_rules.json"))
    parser.add_argument("--per-kind", type=int, default=30, help="random curves of each kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", type=Path, nargs="*", default=[], help="lr_sweep.json files of real sweeps")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    curves = []
    kinds = ["falling_line", "rising_line", "flat", "fall_blowup", "noisy", "early_stop", "bumpy", "nan"]
    for kind in kinds:
        for k in range(args.per_kind):
            desc, raw, beta = synthetic(rng, kind)
            smoothed = [f32(v, 5) for v in record(raw, beta)]
            lrs = [f32(v, 4) for v in desc["lrs"][: len(smoothed)]]
            curves.append(curve_entry(f"{kind}-{k}", kind, desc["num_iter"], lrs, smoothed))
    for path in args.real:
        sweep = json.loads(path.read_text())
        assert all(s is not None for s in sweep["smoothed"]), f"{path}: skipped steps (fp16) have no fastai equivalent"
        num_iter = _num_iter(path)
        lrs = [f32(v, 4) for v in sweep["lrs"]]
        smoothed = [f32(v, 5) for v in sweep["smoothed"]]
        curves.append(curve_entry(f"real-{path.parent.name}-{path.stem}", "real", num_iter, lrs, smoothed))

    data = {
        "about": "Curves and fastai's own valley/slide/minimum/steep answers through Learner.lr_find; made by "
                 "benchmarks/peers/fastai_lr_rules.py. lrs and smoothed are float32: read them as float32. `fed`: the "
                 "slice [a, b) of the curve fastai's suggestion functions were given (null: none); per rule `lr` is "
                 "fastai's answer and `index` the point it picked in the fed curve, or `error` what fastai raised.",
        "fastai": fastai.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "seed": args.seed,
        "curves": curves,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("{\n" + ",\n".join(
        f" {json.dumps(k)}: " + (json.dumps(v) if k != "curves" else "[\n" + ",\n".join("  " + json.dumps(c) for c in v) + "\n ]")
        for k, v in data.items()) + "\n}\n")
    print(f"{len(curves)} curves, fastai {fastai.__version__}: {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")


def _num_iter(path: Path) -> int:
    """sweep.num_iter of the run that wrote `path` (the run folder's config.yaml)."""
    import yaml

    cfg = yaml.safe_load((path.parent / "config.yaml").read_text())
    return int(cfg["sweep"]["num_iter"])


if __name__ == "__main__":
    main()
