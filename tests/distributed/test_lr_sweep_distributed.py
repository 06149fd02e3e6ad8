"""The synchronized LR sweep with 2 and 3 real processes (gloo on CPU)."""

import json

import pytest

from conftest import launch
from disttrain.config import SweepConfig
from disttrain.train.lr_sweep import DebiasedEMA, suggest

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("nproc", [3])  # 3 ranks: uneven shares, and every pair of ranks compared
def test_every_rank_gets_the_identical_curve_from_the_mean_loss(tmp_path, mnist_small, nproc):
    sweep = ["sweep.num_iter=30", "sweep.start_lr=1e-5", "sweep.end_lr=1", "sweep.skip_start=2", "sweep.skip_end=1",
             "sweep.save_per_rank=true"]
    args = [f"data.root={mnist_small}", f"run.output_dir={tmp_path}", "run.name=s", "data.load_size=28", "data.image_size=28",
            "data.batch_size=8", "data.num_workers=0", "train.max_steps_per_epoch=2", "log.progress=false",
            "train.precision=no"] + sweep
    proc = launch(["tests/distributed/sweep_worker.py", "real", str(tmp_path)] + args, nproc=nproc)
    run_dir = tmp_path / "s"
    ranks = [json.loads((run_dir / f"lr_sweep.rank{r}.json").read_text()) for r in range(nproc)]
    for key in ("lrs", "losses", "smoothed", "suggestions", "suggestion", "iterations", "stopped_early"):
        assert all(r[key] == ranks[0][key] for r in ranks), f"{key} differs between ranks"
    assert any(r["local_losses"] != ranks[0]["local_losses"] for r in ranks[1:]), "ranks saw different batches"

    # one process, from the per-step mean of the ranks' own losses, computes the same curve
    cfg = SweepConfig(num_iter=30, start_lr=1e-5, end_lr=1, skip_start=2, skip_end=1)
    ema = DebiasedEMA(cfg.beta)
    assert len(ranks[0]["losses"]) == len(ranks[0]["smoothed"]) == ranks[0]["iterations"] > cfg.skip_start + cfg.skip_end + 3
    for step, loss in enumerate(ranks[0]["losses"]):
        mean = sum(r["local_losses"][step] for r in ranks) / nproc
        assert loss == pytest.approx(mean, rel=1e-12, abs=0)
        assert ranks[0]["smoothed"][step] == pytest.approx(ema.update(mean), rel=1e-12)
    values, suggestion, _ = suggest(ranks[0]["lrs"], ranks[0]["smoothed"], cfg)
    assert suggestion == ranks[0]["suggestion"] and values == ranks[0]["suggestions"]

    main = json.loads((run_dir / "lr_sweep.json").read_text())
    assert main["world_size"] == nproc and main["global_batch_size"] == 8 * nproc and main["method"] == "valley"
    assert "local_losses" not in main and (run_dir / "lr_sweep.png").stat().st_size > 10_000
    assert f"agreed by {nproc} ranks" in proc.stdout and proc.stdout.count("LR sweep: suggestion") == 1

    for r in range(nproc):
        state = json.loads((tmp_path / f"state.rank{r}.json").read_text())
        assert state.pop("scaler") == {"before": None, "after": None}, "no grad scaler on CPU in fp32"
        sizes = state.pop("sizes")
        assert sizes["buffers"] > 0 and sizes["optimizer_state"] > 0 and sizes["moments"] == ["exp_avg", "exp_avg_sq", "step"]
        assert set(state) == {"parameters", "buffers", "optimizer_state", "optimizer_groups", "schedule", "python_rng",
                              "numpy_rng", "torch_rng", "augment", "loader_epoch"}
        assert {k for k, v in state.items() if not v["changed"]} == set(), f"rank {r}: unchanged before the restore: {state}"
        assert {k for k, v in state.items() if not v["restored"]} == set(), f"rank {r}: not restored: {state}"


@pytest.mark.parametrize("nproc", [3])  # 3 ranks: uneven shares, and every pair of ranks compared
def test_divergence_stop_is_shared_even_when_own_losses_would_stop_elsewhere(tmp_path, nproc):
    launch(["tests/distributed/sweep_worker.py", "constructed", str(tmp_path)], nproc=nproc)
    found = [json.loads((tmp_path / f"constructed.rank{r}.json").read_text()) for r in range(nproc)]
    assert [f["own_steps"] for f in found] == [11 + 5 * r for r in range(nproc)], "alone, each rank stops elsewhere"
    assert [f["steps"] for f in found] == [16] * nproc, "together, all stop at step 15"
    assert all(f["losses"] == found[0]["losses"] and f["stopped"] for f in found)
