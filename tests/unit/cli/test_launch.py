"""How `disttrain launch` sums up its workers' ends (`conclude`): exit codes and the lines printed."""

from __future__ import annotations

import pytest

from disttrain.cli.launch import conclude


def _user(rank, message):
    return {"rank": rank, "kind": "user", "message": message}


def test_the_same_user_error_on_every_rank_is_printed_once(capsys):
    assert conclude({1: 2, 0: 2}, [_user(0, "data.root: /x is not a folder"), _user(1, "data.root: /x is not a folder")]) == 2
    assert capsys.readouterr().err == "disttrain: error: data.root: /x is not a folder\n"
    # the agent stopped rank 1 (SIGTERM) before it reached the same error
    assert conclude({0: 2, 1: -15}, [_user(0, "data.root: /x is not a folder")]) == 2
    assert capsys.readouterr().err == "disttrain: error: data.root: /x is not a folder\n"


def test_preempted_ranks_exit_75(capsys):
    line = "preempted: checkpoint saved in runs/p/checkpoints/step-00000004; exiting with 75"
    reports = [{"rank": 0, "kind": "preempted", "message": line}]
    assert conclude({0: 75, 1: -15}, reports) == 75  # a rank the agent stopped after the first one left
    assert capsys.readouterr().err == f"disttrain: {line}\n"


@pytest.mark.parametrize("codes, expected", [({1: 1, 0: -15}, 1), ({0: -9}, 137), ({1: 2, 0: 1}, 2)])
def test_a_crash_names_every_failed_rank(capsys, codes, expected):
    reports = [_user(1, "bad")] if codes.get(1) == 2 else []
    assert conclude(codes, reports) == expected
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("disttrain: the job failed: ") and all(f"rank {r} " in err[-1] for r in codes)
    assert ("killed by SIGKILL" in err[-1]) == (codes == {0: -9})
