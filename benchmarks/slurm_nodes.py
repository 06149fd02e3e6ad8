"""One run (tiny/cnn on 8x8 images, the LR sweep, 2 epochs of 8 steps) on 8 processes in four ways
that must agree to the last digit, and a preemption on one node that must not change it.

    python benchmarks/slurm_nodes.py [--work DIR] [--keep]      # as root: it starts a SLURM cluster

The runs, one after the other (each timed):
  one       `accelerate launch --num_processes 8` on one machine (the reference);
  loopback  4 "machines" on this host: 4 x `accelerate launch --num_machines 4 --machine_rank R`, 2 processes each;
  slurm     `sbatch --nodes 4 launch/slurm/train.sbatch` (CPU_PROCS_PER_NODE=2) on the 4-node cluster that
            tests/slurm/cluster.sh starts on this host (4 slurmd, nodes dt1..dt4);
  preempted the same job with tests/slurm/step_preempt_worker.py: node dt4's ranks get SIGUSR1 once 11 steps
            are done; every rank checkpoints at step 12 and exits 75, the job is requeued and resumed.

Checks, each printed PASS or FAIL: each rank's own LR sweep file (lr_sweep.rank<R>.json, written by that
rank from its own curve) is the same curve on every rank and equals the reference's file of that rank;
results.json's epochs (all but the wall-clock figures) and model.pt's weights equal the reference's
bit for bit; the preempted job was requeued once, every rank exited 75 at step 12 and the requeued job
resumed there, and its epochs, weights and logged train/loss points equal the uninterrupted job's.
The configuration is tests/slurm/test_slurm_nodes.py's; that test runs `one` and `preempted` only, with 1
process per node (4 ranks), to fit the suite's time.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "slurm")]

import torch  # noqa: E402

from conftest import BIN, free_port, launch, make_folder, run_env  # noqa: E402
from test_slurm import _failure_report, _job_record, _sbatch, _wait_until  # noqa: E402
from test_slurm_nodes import NODES, PREEMPT_NODE, PREEMPT_STEP, _epochs, _weights, overrides  # noqa: E402

PER_NODE = 2  # the suite's test runs 1 per node
WORLD = NODES * PER_NODE
CONFIG = "configs/demo.yaml"
results: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    results.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}{'  (' + detail + ')' if detail and not ok else ''}", flush=True)


def timed(name: str, fn) -> float:
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    print(f"      {name}: {seconds:.1f} s", flush=True)
    return seconds


def run_args(data: Path, out: Path, name: str) -> list[str]:
    return ["--config", CONFIG, f"data.root={data}", f"run.output_dir={out}", f"run.name={name}", *overrides(WORLD)]


def loopback(data: Path, out: Path) -> None:
    port = str(free_port())
    machines = [subprocess.Popen(
        [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_machines", str(NODES), "--machine_rank", str(rank),
         "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--num_processes", str(WORLD),
         "--mixed_precision", "no", "--dynamo_backend", "no", "launch/train.py", *run_args(data, out, "loopback")],
        cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(NODES)]
    for rank, machine in enumerate(machines):
        output = machine.communicate(timeout=600)[0]
        if machine.returncode != 0:
            raise RuntimeError(f"loopback machine {rank} exited {machine.returncode}:\n{output[-4000:]}")


def sbatch_and_wait(env: dict, data: Path, out: Path, name: str) -> tuple[str, dict, str]:
    logs = out / f"{name}-log"
    logs.mkdir(parents=True)
    _, job = _sbatch(env, logs, *run_args(data, out, name)[2:], wait=False, nodes=NODES, config=CONFIG)

    def finished():
        return _job_record(env, job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")

    _wait_until(finished, f"job {job} to finish", timeout=900)
    return job, _job_record(env, job), next(logs.glob("*.out")).read_text()


def compare_with_reference(name: str, run_dir: Path, one: Path) -> None:
    sweeps = [json.loads((run_dir / f"lr_sweep.rank{r}.json").read_text()) for r in range(WORLD)]
    shared = [{k: v for k, v in s.items() if k != "local_losses"} for s in sweeps]
    check(f"{name}: every rank's own sweep file holds the same curve", all(s == shared[0] for s in shared))
    reference = [json.loads((one / f"lr_sweep.rank{r}.json").read_text()) for r in range(WORLD)]
    differing = [r for r in range(WORLD) if sweeps[r] != reference[r]]
    check(f"{name}: each rank's sweep file = that rank's on one machine", not differing, f"ranks {differing} differ")
    mine, theirs = _epochs(run_dir), _epochs(one)
    check(f"{name}: results.json epochs = one machine's, every digit", mine == theirs, f"{mine} vs {theirs}")
    a, b = _weights(run_dir), _weights(one)
    check(f"{name}: model.pt weights = one machine's, bit for bit", a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/slurm_nodes_bench"), help="scratch folder (removed unless --keep)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = args.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    data = make_folder(work / "tints", {"train": {c: 64 for c in "abcd"}, "valid": {c: 16 for c in "abcd"}}, size=(8, 8))
    out, cluster = work / "runs", work / "cluster"
    cluster_sh = REPO / "tests" / "slurm" / "cluster.sh"
    times = {}
    try:
        times["cluster start (4 nodes)"] = timed("cluster start", lambda: subprocess.run(
            ["bash", str(cluster_sh), "start", str(cluster), str(NODES)], check=True, capture_output=True, timeout=300))
        env = {**run_env(), "SLURM_CONF": str(cluster / "slurm.conf"), "GPUS_PER_NODE": "0", "CPU_PROCS_PER_NODE": str(PER_NODE)}
        times["one machine, 8 processes"] = timed("one", lambda: launch(
            ["launch/train.py", *run_args(data, out, "one")], nproc=WORLD, timeout=900))
        times["4 machines on loopback"] = timed("loopback", lambda: loopback(data, out))
        compare_with_reference("loopback", out / "loopback", out / "one")

        found = {}
        times["sbatch, 4 nodes"] = timed("slurm", lambda: found.update(slurm=sbatch_and_wait(env, data, out, "slurm")))
        _, record, log = found["slurm"]
        check("slurm: the job completed without a requeue", (record["JobState"], record["Restarts"]) == ("COMPLETED", "0"), str(record))
        check("slurm: 4 nodes x 2 processes", f"{NODES} node(s) x {PER_NODE} process(es)" in log and f"training on {WORLD} process(es)" in log)
        compare_with_reference("slurm", out / "slurm", out / "one")

        preempt_env = {**env, "TRAIN_SCRIPT": "tests/slurm/step_preempt_worker.py", "PREEMPT_NODE": str(PREEMPT_NODE),
                       "PREEMPT_STEP": str(PREEMPT_STEP)}
        times["sbatch, 4 nodes, preempted + requeued"] = timed("preempted", lambda: found.update(
            preempted=sbatch_and_wait(preempt_env, data, out, "preempted")))
        job, record, log = found["preempted"]
        check("preempted: completed after one requeue", (record["JobState"], record["Restarts"], record["ExitCode"]) == ("COMPLETED", "1", "0:0"),
              str(record))
        runs = re.split(rf"^disttrain: job {job} restart \d+: .*$", log, flags=re.M)[1:]
        first = runs[0] if runs else ""
        saved = re.findall(r"disttrain: preempted: checkpoint saved in (\S+); exiting with 75", first)
        step = str(out / "preempted" / "checkpoints" / f"step-{PREEMPT_STEP + 1:08d}")
        check("preempted: every rank saved at the log point after the signalled step", len(saved) == WORLD and set(saved) == {step},
              str(saved))
        codes = {rank: code for rank, (code, _) in _failure_report(first).items()}
        check("preempted: every rank exited 75", codes == dict.fromkeys(range(WORLD), 75), str(codes))
        check("preempted: the requeued job resumed from that checkpoint, without a second sweep",
              len(runs) == 2 and f"resuming from {step}: " in runs[1] and "LR sweep" not in runs[1])
        a, b = _weights(out / "preempted"), _weights(out / "slurm")
        check("preempted = uninterrupted: results.json epochs", _epochs(out / "preempted") == _epochs(out / "slurm"))
        check("preempted = uninterrupted: model.pt weights, bit for bit", a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))
        check("preempted = uninterrupted: every logged train/loss point", train_losses(out / "preempted") == train_losses(out / "slurm"))
        compare_with_reference("preempted", out / "preempted", out / "one")
    finally:
        subprocess.run(["bash", str(cluster_sh), "stop", str(cluster)], timeout=60)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\ntimes (s):")
    for name, seconds in times.items():
        print(f"  {name:<40} {seconds:6.1f}")
    failed = [name for name, ok, _ in results if not ok]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks passed" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
