"""Two jobs started side by side on one machine do not put their threads on the same pinned cores
(disttrain/dist/cores.py: a job pins only the cores it owns; on a machine that gave it no allocation it
pins nothing)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import BIN, REPO, free_port, run_env


def _cores(spec: str) -> set[int]:
    found: set[int] = set()
    for part in spec.split(","):
        low, _, high = part.partition("-")
        found.update(range(int(low), int(high or low) + 1))
    return found


def test_two_jobs_side_by_side_do_not_share_a_pinned_core(tmp_path):
    machine = set(os.sched_getaffinity(0))
    if len(machine) < (os.cpu_count() or 1):
        pytest.skip("this process runs in an allocation (taskset, a cgroup cpuset): both jobs would own it")
    env = {k: v for k, v in run_env().items() if not k.startswith("SLURM_")}  # a machine no scheduler allocated
    jobs = [
        subprocess.Popen([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                          "tests/distributed/cores_worker.py", str(tmp_path), job],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for job in ("a", "b")
    ]
    for proc in jobs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-4000:]
    pinned: dict[str, set[int]] = {"a": set(), "b": set()}  # the cores each job's threads were narrowed to
    said = []
    for job in pinned:
        for rank in range(2):
            report = json.loads((tmp_path / f"{job}-rank{rank}.json").read_text())
            said.append(report["cores"])
            for spec in report["threads"].values():
                if _cores(spec) != machine:
                    pinned[job] |= _cores(spec)
    assert not pinned["a"] & pinned["b"], f"both jobs pinned threads to cores {sorted(pinned['a'] & pinned['b'])}: {said}"
    assert pinned == {"a": set(), "b": set()}, "a machine without an allocation: nothing pinned"
    share = f"a share of {len(machine) // 2} core(s) (not pinned: this process may run on all {len(machine)} cores of the machine"
    assert all(line.startswith(share) for line in said), said
