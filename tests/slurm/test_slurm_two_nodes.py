"""The sbatch script across two SLURM nodes (two slurmd on this host), one process per node."""

import json

import pytest
from test_slurm import _common, _sbatch

pytestmark = pytest.mark.slurm


def test_sbatch_trains_on_two_nodes(slurm_two_nodes, tmp_path, mnist_small):
    env = {**slurm_two_nodes, "CPU_PROCS_PER_NODE": "1"}
    proc, _ = _sbatch(env, tmp_path, *_common(mnist_small, tmp_path, "two"), "train.epochs=1", wait=True, nodes=2)
    log = next(tmp_path.glob("*.out")).read_text()
    assert proc.returncode == 0, log[-4000:]
    assert "2 node(s) x 1 process(es)" in log and "training on 2 process(es)" in log
    assert len(json.loads((tmp_path / "two" / "results.json").read_text())["epochs"]) == 1
