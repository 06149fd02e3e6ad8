"""Real multi-process runs on CPU (gloo): `accelerate launch --multi_gpu --num_processes N`, torchrun."""

import json
import re

import pytest
import torch

from conftest import launch, make_folder, rank_exit_codes

pytestmark = pytest.mark.dist

# fp32 (train.precision=no): these tests check distributed mechanics, which must not depend on whether this
# CPU has native bf16 (emulated bf16 is several times slower); tests/e2e/test_demo.py keeps one bf16 run.
TINY = ["model.name=resnet18", "data.load_size=36", "data.image_size=32", "data.num_workers=0", "log.progress=false",
        "train.precision=no"]


@pytest.mark.parametrize("nproc", [3])  # 3 ranks: every pair compared, an uneven share
def test_weights_identical_on_every_rank_after_training_steps(tmp_path, mnist_small, nproc):
    args = [f"data.root={mnist_small}", f"run.output_dir={tmp_path}", "data.load_size=28", "data.image_size=28",
            "data.batch_size=8", "train.max_steps_per_epoch=4", "data.num_workers=0", "log.progress=false",
            "augment.flip=true", "train.precision=no"]
    launch(["tests/distributed/weights_worker.py", str(tmp_path)] + args, nproc=nproc)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(nproc)]
    init = torch.load(tmp_path / "init.pt", weights_only=True)
    params = [k for k in states[0] if "running" not in k and "num_batches" not in k]
    assert not torch.equal(states[0]["fc.weight"], init["fc.weight"]), "training changed nothing"
    for other in states[1:]:
        assert other.keys() == states[0].keys()
        for key in params:
            assert torch.equal(states[0][key], other[key]), f"{key} differs between ranks"


@pytest.mark.parametrize(
    "launcher, nproc, accum, steps",
    [("accelerate", 2, 1, 3), ("accelerate", 3, 1, 2), ("torchrun", 2, 1, 3), ("accelerate", 2, 2, 2)],
)
def test_uneven_classes_and_indivisible_counts_finish(tmp_path, launcher, nproc, accum, steps):
    """23 images in classes of 13, 3 and 7: not divisible by 2 or 3 ranks x 4 per batch. With
    accumulation 2, the 3 micro-batches of an epoch make 2 optimizer steps (the last one short)."""
    data = make_folder(tmp_path / "data", {"train": {"a": 13, "b": 3, "c": 7}, "val": {"a": 2, "b": 3, "c": 2}})
    proc = launch(
        ["launch/train.py", f"data.root={data}", f"run.output_dir={tmp_path}", "run.name=u", "train.epochs=2",
         "data.batch_size=4", "optim.lr=1e-3", f"train.grad_accum={accum}"] + TINY,
        nproc=nproc,
        launcher=launcher,
        timeout=240,
    )
    assert f"training on {nproc} process(es)" in proc.stdout
    assert f"x {accum} accumulation, {steps} steps per epoch" in proc.stdout
    assert "data: 23 train / 7 valid images in 3 classes" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if re.match(r"^[01]\s+\d+\.\d{6}\s", line)]
    assert len(rows) == 2
    results = json.loads((tmp_path / "u" / "results.json").read_text())
    assert results["world_size"] == nproc
    assert len(results["epochs"]) == 2


def test_config_error_fails_fast_on_every_rank(tmp_path):
    proc = launch(["launch/train.py", "optim.lrr=1", f"run.output_dir={tmp_path}"], nproc=2, check=False, timeout=120)
    exited_2 = _user_error_ranks(proc.stderr)
    assert exited_2 <= proc.stderr.count("disttrain: error: unknown config key 'optim.lrr'; did you mean 'optim.lr'?") <= 2
    assert not (tmp_path / "run").exists()


def test_data_error_reaches_every_rank_without_a_hang(tmp_path):
    make_folder(tmp_path / "data", {"train": {"a": 3}, "valid": {"a": 1, "ghost": 1}})
    proc = launch(["launch/train.py", f"data.root={tmp_path / 'data'}", f"run.output_dir={tmp_path}"] + TINY,
                  nproc=2, check=False, timeout=120)
    exited_2 = _user_error_ranks(proc.stderr)
    # each rank that exits 2 printed the line; one stopped after printing it may have printed it too
    assert exited_2 <= proc.stderr.count("ghost do not exist") <= 2


def _user_error_ranks(stderr: str) -> int:
    """Every rank in the launcher's failure report exited 2, except ranks the launcher stopped
    (SIGTERM) after the first exit, before they reached the same error. Returns how many exited 2."""
    codes = rank_exit_codes(stderr)
    assert codes and 2 in codes.values() and set(codes.values()) <= {2, -15}, stderr[-3000:]
    return list(codes.values()).count(2)
