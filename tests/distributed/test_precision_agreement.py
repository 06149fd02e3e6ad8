"""One precision for the job (disttrain/dist/runtime.py, disttrain/dist/precision.py `agree`): two real
processes whose devices differ (rank 0: native bf16, rank 1: none) exchange their facts before the
Accelerator is built and train in the same precision; an explicit precision one rank cannot run is
the same one-line error on every rank."""

from __future__ import annotations

import json

from conftest import launch


def test_ranks_on_different_devices_agree_on_one_precision(tmp_path):
    launch(["tests/distributed/precision_worker.py", str(tmp_path)], nproc=2, launcher="torchrun")
    auto = [json.loads((tmp_path / f"auto-rank{rank}.json").read_text()) for rank in range(2)]
    assert [a["mode"] for a in auto] == ["no", "no"], auto  # each rank alone: bf16 on rank 0, fp32 on rank 1
    assert auto[0]["reason"] == auto[1]["reason"] == (
        "auto: rank 1's CPU (test: AVX2) has no native bf16 and cannot run fp16, so the job trains in fp32")
    errors = [json.loads((tmp_path / f"bf16-rank{rank}.json").read_text())["error"] for rank in range(2)]
    assert errors[0] == errors[1] == ("train.precision: bf16 does not run on rank 1's GeForce GTX 1080 (compute capability 6.1); "
                                      "use train.precision=auto (fp16 there) or no"), errors
