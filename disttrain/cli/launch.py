"""`disttrain launch`: Accelerate's launcher (`accelerate launch`, same options) behind a front that

- checks the run config before any worker starts: a typo prints one line and exits 2 at once;
- turns the workers' ends into one line and one exit code: a user error that every rank hit (a
  missing folder, a bad checkpoint) is printed once and exits 2; a preempted run exits 75 (the
  checkpoint is saved), where `accelerate launch` turns both into 1 after torch elastic's
  traceback and failure table; a crash names the ranks that failed (their tracebacks are above).

    disttrain launch --multi_gpu --num_processes 2 launch/train.py --config configs/demo.yaml optim.lr=auto
    disttrain launch --config_file configs/accelerate/8gpu.yaml -m disttrain.cli evaluate --weights model.pt ...

Workers started by the front find `DISTTRAIN_ERROR_DIR` in their environment and leave their
user-error or preemption line there (`report_to_front`) instead of printing it once per rank.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ERROR_DIR_ENV = "DISTTRAIN_ERROR_DIR"
USER_ERROR_EXIT = 2
PREEMPTED_EXIT = 75  # as disttrain.train.checkpoint.PREEMPTED_EXIT (not imported: this module stays light)


def report_to_front(kind: str, message: str) -> bool:
    """In a worker: hand `message` to the `disttrain launch` front, if there is one. Returns False
    when there is none (the caller prints the message itself)."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder or not Path(folder).is_dir():
        return False
    rank = os.environ.get("RANK", "0")
    path = Path(folder) / f"rank{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rank": int(rank), "kind": kind, "message": message}))
    tmp.replace(path)
    return True


def _is_ours(args) -> bool:
    """The training script is disttrain's (launch/train.py, or `-m disttrain.cli ...`)."""
    script = str(args.training_script)
    return script in ("disttrain.cli", "disttrain") if args.module else Path(script).name == "train.py" and Path(script).parent.name == "launch"


def check_config(args) -> str | None:
    """The run config the workers will load, loaded here first. Returns the error line, or None."""
    from disttrain.cli.parsers import command_parser, train_parser
    from disttrain.config import ConfigError
    from disttrain.models.checks import load_config
    from disttrain.dist.precision import resolve_precision

    words = list(args.training_script_args)
    if args.module:
        parser = command_parser()
        if not words or words[0] not in ("train", "find-lr", "evaluate"):
            return None
        parsed, rest = parser.parse_known_args(words)
    else:
        parsed, rest = train_parser().parse_known_args(words)
    unknown = [w for w in rest if w.startswith("-")]
    if unknown:
        return f"unrecognized arguments for {args.training_script}: {' '.join(unknown)}"
    overrides = rest
    try:
        cfg = load_config(parsed.config, overrides)
        if args.cpu or not _cuda_available():
            resolve_precision(cfg.train.precision, "cpu")
    except ConfigError as err:
        return str(err)
    return None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _exit_of(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def conclude(codes: dict[int, int], reports: list[dict]) -> int:
    """The front's exit code and lines, from each failed worker's exit code (by rank, the first
    failure first) and the reports the workers left."""
    lines = list(dict.fromkeys(r["message"] for r in sorted(reports, key=lambda r: r["rank"])))
    kinds = {r["kind"] for r in reports}
    # once the first worker has exited, the agent stops the others (SIGTERM) whether or not they got
    # as far as the same error or the same checkpoint: those count as stopped, not as failed
    stopped = -signal.SIGTERM
    if kinds == {"user"} and USER_ERROR_EXIT in codes.values() and set(codes.values()) <= {USER_ERROR_EXIT, stopped}:
        for line in lines:
            print(f"disttrain: error: {line}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
    if kinds == {"preempted"} and PREEMPTED_EXIT in codes.values() and set(codes.values()) <= {PREEMPTED_EXIT, stopped}:
        for line in lines:
            print(f"disttrain: {line}", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    for line in lines:
        print(f"disttrain: error: {line}", file=sys.stderr, flush=True)
    failed = ", ".join(f"rank {rank} {_exit_of(code)}" for rank, code in codes.items())
    print(f"disttrain: the job failed: {failed} (a rank's own traceback, if any, is above)", file=sys.stderr, flush=True)
    first = next(iter(codes.values()), 1)
    return first if first > 0 else 128 + (-first if first < 0 else 1)


def _quiet_defaults(args) -> None:
    """disttrain takes precision from train.precision and compiles nothing, so Accelerate's
    "values were not passed ... defaults used" notice for these has nothing to say; without any
    accelerate config file, one machine is the default too."""
    from accelerate.commands.config import default_config_file

    args.mixed_precision = args.mixed_precision or "no"
    args.dynamo_backend = args.dynamo_backend or "no"
    if args.num_machines is None and args.config_file is None and not Path(default_config_file).is_file():
        args.num_machines = 1


def main(argv: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    parser = launch_command_parser()
    parser.prog = "disttrain launch"
    parser.description = __doc__.split("\n\n")[0]
    args = parser.parse_args(argv)
    _quiet_defaults(args)
    if _is_ours(args):
        error = check_config(args)
        if error is not None:
            print(f"disttrain: error: {error}", file=sys.stderr, flush=True)
            return USER_ERROR_EXIT
    # the agent's own lines about stopping the other workers add nothing to our summary
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="disttrain-launch-") as folder:
        os.environ[ERROR_DIR_ENV] = folder
        try:
            launch_command(args)
            return 0
        except ChildFailedError as err:
            first, _ = err.get_first_failure()  # the root cause first
            ranks = sorted(err.failures, key=lambda rank: (rank != first, rank))
            codes = {int(rank): err.failures[rank].exitcode for rank in ranks}
        except subprocess.CalledProcessError as err:
            codes = {0: err.returncode}
        except SystemExit as err:  # accelerate's own exits (bad options, --quiet single process)
            return err.code if isinstance(err.code, int) else 1
        reports = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("rank*.json"))]
    return conclude(codes, reports)
