"""Run by tests/e2e/test_many_classes.py under a real launcher: launch/train.py's run, then each rank
writes its peak resident memory (VmHWM of /proc/self/status, in kB) to $PEAK_RSS_DIR/rank<R>.txt as
it exits.

    peak_rss_worker.py --config CONFIG [section.key=value ...]
"""

import atexit
import os
import runpy
import sys
from pathlib import Path


def record() -> None:
    status = Path("/proc/self/status").read_text()
    kb = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
    (Path(os.environ["PEAK_RSS_DIR"]) / f"rank{os.environ.get('RANK', '0')}.txt").write_text(kb + "\n")


if __name__ == "__main__":  # loader workers import this script again (disttrain/data/workers.py)
    atexit.register(record)
    sys.argv[0] = str(Path(__file__).resolve().parents[2] / "launch" / "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
