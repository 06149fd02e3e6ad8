"""Training and exact evaluation from shards on 2 real processes (gloo), with a corrupt sample."""

import io
import json
import re
import subprocess
import tarfile

import pytest

from conftest import BIN, launch, run_env

pytestmark = pytest.mark.dist

ROW = re.compile(r"^0\s{2,}(\d+\.\d{6})\s{2,}(\d+\.\d{6})\s{2,}([01]\.\d{6})", re.M)


def test_two_processes_train_from_one_shard_with_a_corrupt_member(tmp_path, mnist_small):
    """1 train shard for 2 ranks x 2 workers (fewer shards than readers), one sample that is not an
    image: one epoch finishes on both ranks (no hang), the bad sample is counted, and `evaluate` on
    2 processes reproduces the epoch's validation exactly."""
    shards = tmp_path / "shards"
    subprocess.run([str(BIN / "disttrain"), "prepare", str(mnist_small), str(shards), "--samples-per-shard", "1000",
                    "--workers", "1", "--no-progress"], env=run_env(), check=True, capture_output=True)
    with tarfile.open(shards / "train-000000.tar", "a") as tar:  # a sample whose image is text
        for name, data in (("zzbad.cls", b"3"), ("zzbad.jpg", b"definitely not a JPEG")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["samples"] += 1
    (shards / "manifest.json").write_text(json.dumps(manifest))

    common = ["--config", "configs/demo.yaml", f"data.root={shards}", "data.format=shards", f"run.output_dir={tmp_path}",
              "run.name=s", "data.num_workers=2", "data.batch_size=16", "log.progress=false", "train.precision=no"]
    proc = launch(["launch/train.py", *common, "train.epochs=1"], nproc=2)
    assert "data: 301 train / 110 valid samples in 10 classes from 1 + 1 shards" in proc.stdout
    assert "10 steps per epoch" in proc.stdout  # ceil(301 / 32), on both ranks
    assert "epoch 0: 1 unreadable training sample(s) skipped and replaced by others" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "zzbad skipped (undecodable" in line]
    assert warnings and all(re.match(r"\[rank [01]\] WARNING disttrain\.data: ", line) for line in warnings), proc.stderr[-3000:]
    row = ROW.search(proc.stdout)
    assert row, proc.stdout
    results = json.loads((tmp_path / "s" / "results.json").read_text())
    assert len(results["epochs"]) == 1 and results["world_size"] == 2

    out = tmp_path / "eval.json"
    launch(["-m", "disttrain.cli", "evaluate", *common, "--weights", str(tmp_path / "s" / "model.pt"), "--out", str(out)], nproc=2)
    evaluated = json.loads(out.read_text())
    assert evaluated["count"] == 110 and evaluated["skipped"] == 0
    assert evaluated["accuracy"] == pytest.approx(float(row.group(3)), abs=1e-6)
    assert evaluated["loss"] == pytest.approx(float(row.group(2)), abs=1e-4)
