"""A million files: the scan (cold and warm), the listing's memory per rank, `disttrain prepare` and
`disttrain predict` over a folder of N tiny PNGs.

    .venv/bin/python benchmarks/million.py --files 100000,1000000 [--root /tmp/million] [--only scan,prepare,predict]

For each N it makes (or reuses, when `ROOT/N/.complete` says N) `ROOT/N/train/cNNNN/*.png`: N 8 x 8
PNGs in 1,000 class folders, plus 10,000 in `valid/`, and a handful of bad files in train/c0000
(an empty one, a truncated PNG, a text file named .png). They are written fast: a few hundred
distinct PNG byte strings reused, with os.open/os.write. Every file name is unique across the
classes. Then each measure runs in a fresh subprocess; its peak resident memory is
`resource.getrusage(RUSAGE_SELF).ru_maxrss`.

- scan: `disttrain.data.folder.scan_image_folder(root, "train", "auto", "skip", workers=2, verify=V,
  cache_dir=...)`, cold (the folders' scan caches removed) and warm (from the cache the cold scan
  wrote), V = header (and full, off at the smaller sizes; full at 1M only with --full-at-1m). With
  --drop-caches (root only) the kernel's page, dentry and inode caches are dropped before a cold
  scan (`sync; echo 3 > /proc/sys/vm/drop_caches`): truly cold; without it the files' metadata may
  still be in memory from the previous step. The listing's memory per rank is
  len(pickle.dumps(data)): what the main process broadcasts and every rank holds.
- prepare: `disttrain prepare ROOT/N OUT --presize 8 --workers 2`, images/s of a whole run; then a
  second run killed (SIGKILL to its process group) once its progress file has K complete shards,
  and a rerun that must keep them (its "resuming, K shard(s) already written" line) and end with a
  manifest and shards byte-equal to the uninterrupted run's. The kill is timed by watching the
  progress file (polled every 50 ms): acceptable in a benchmark, never in a test.
- predict: `disttrain predict --weights model.pt ROOT/N/train --out X.csv --workers 2 --batch-size
  256` with a freshly initialised `tiny/cnn` for 10 classes (no training: the cost measured is the
  listing's, decoding's and writing's), peak RSS of the main process and the sum of its decoding
  workers' peaks (sampled from /proc every 0.2 s: a worker's VmHWM is its own peak, so the last
  sample before it exits has it), images/s. With --old PATH (a copy of the package, e.g. from
  before a change) the same predict runs with PYTHONPATH=PATH too, for a before/after figure.

Figures print as one table at the end (and as they come).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASSES = 1000
VALID = 10_000
DISTINCT = 300
BAD = {"bad-empty.png": b"", "bad-text.png": b"this is not an image\n"}


# ------------------------------------------------------------------------------------------------
# the data


def _pngs() -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(DISTINCT):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def make_folder(root: Path, files: int) -> Path:
    """ROOT/train (files PNGs in CLASSES folders + the bad ones), ROOT/valid (VALID PNGs)."""
    marker = root / ".complete"
    if marker.is_file() and marker.read_text().strip() == str(files):
        return root
    if root.exists():
        shutil.rmtree(root)
    start = time.perf_counter()
    pngs = _pngs()
    number = 0
    for split, count in (("train", files), ("valid", VALID)):
        for c in range(CLASSES):
            folder = root / split / f"c{c:04d}"
            os.makedirs(folder)
            share = count // CLASSES + (c < count % CLASSES)
            base = str(folder)
            for _ in range(share):
                _write(f"{base}/{number:08d}.png", pngs[number % DISTINCT])
                number += 1
    bad = root / "train" / "c0000"
    for name, data in BAD.items():
        _write(str(bad / name), data)
    _write(str(bad / "bad-truncated.png"), pngs[0][:30])
    marker.write_text(f"{files}\n")
    print(f"made {root}: {files} + {VALID} files in {time.perf_counter() - start:.0f} s", flush=True)
    return root


# ------------------------------------------------------------------------------------------------
# measuring a subprocess


def _status(pid: int, key: str) -> int:
    """A /proc/PID/status field in kB (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Descendants:
    """The peak VmHWM of each descendant of a process, sampled every `every` seconds (a benchmark's
    sampler: the figure is the sum of the workers' own peaks)."""

    def __init__(self, pid: int, every: float = 0.2):
        self.pid, self.every, self.peaks = pid, every, {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(self.every):
            for child in _descendants(self.pid):
                hwm = _status(child, "VmHWM")
                if hwm:
                    self.peaks[child] = max(self.peaks.get(child, 0), hwm)

    def stop(self) -> dict[int, int]:
        self.done.set()
        self.thread.join()
        return self.peaks


def run_measured(code: str, env: dict | None = None, sample: bool = False, cwd: Path | None = None) -> dict:
    """Run `code` in a fresh Python; it prints one JSON line starting with RESULT; adds the peak
    RSS (MB) of the process, and with `sample` the sum of its descendants' peaks."""
    wrapper = code + textwrap.dedent("""
        import json as _json, resource as _resource
        RESULT["peak_mb"] = _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss / 1024
        import disttrain as _disttrain
        RESULT["package"] = str(_disttrain.__file__)
        print("RESULT " + _json.dumps(RESULT), flush=True)
    """)
    # run outside the repository: `python -c` puts its folder first on sys.path, before PYTHONPATH
    process = subprocess.Popen([sys.executable, "-c", wrapper], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})}, cwd=cwd or Path(tempfile.gettempdir()))
    sampler = Descendants(process.pid) if sample else None
    out, err = process.communicate()
    peaks = sampler.stop() if sampler else {}
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if process.returncode or not lines:
        raise RuntimeError(f"measured run failed ({process.returncode}):\n{out[-3000:]}\n{err[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    if sample:
        result["workers_mb"] = sum(peaks.values()) / 1024
        result["descendants"] = len(peaks)
    result["stderr_tail"] = err[-400:]
    return result


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------
# scan


SCAN = """
import os, pickle, time
from pathlib import Path
from disttrain.data.folder import scan_image_folder
start = time.perf_counter()
data = scan_image_folder({root!r}, "train", "auto", "skip", workers=2, verify={verify!r}, cache_dir=Path({cache!r}))
seconds = time.perf_counter() - start
RESULT = dict(seconds=seconds, train=len(data.train.paths), listing_mb=len(pickle.dumps(data)) / 2**20,
              table=type(data.train.paths).__name__)
"""


def _clear_scan_cache(root: Path, cache: Path) -> None:
    for folder in (root / "train", root / "valid"):
        for name in folder.glob(".disttrain-scan*"):
            name.unlink()
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)


def measure_scan(root: Path, work: Path, levels: list[str], drop: bool) -> list[dict]:
    rows = []
    cache = work / "scan-cache"
    for verify in levels:
        _clear_scan_cache(root, cache)
        kinds = [("cold", False)] + ([("cold, caches dropped", True)] if drop else []) + [("warm", False)]
        for kind, dropping in kinds:
            if kind.startswith("cold"):
                _clear_scan_cache(root, cache)
            if dropping and not drop_caches():
                continue
            result = run_measured(SCAN.format(root=str(root), verify=verify, cache=str(cache)))
            rows.append(dict(what=f"scan verify={verify} {kind}", seconds=result["seconds"], peak_mb=result["peak_mb"],
                             extra=f"listing per rank {result['listing_mb']:.1f} MB ({result['table']}, {result['train']} train)"))
            print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------------
# prepare


def _prepare_cmd(root: Path, out: Path) -> list[str]:
    return [str(REPO / ".venv" / "bin" / "disttrain"), "prepare", str(root), str(out), "--presize", "8", "--workers", "2"]


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def _addressless(value) -> str:
    """A manifest part as JSON with object addresses (`at 0x7f...`, which a PIL error message about
    an in-memory file may hold) blanked."""
    return re.sub(r"0x[0-9a-fA-F]+", "0x?", json.dumps(value, sort_keys=True))


def _manifest(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("made")  # workers, seconds, time finished
    return manifest


def measure_prepare(root: Path, files: int, work: Path, kill_after: int) -> list[dict]:
    whole, killed = work / "shards-whole", work / "shards-killed"
    for folder in (whole, killed):
        shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run(_prepare_cmd(root, whole), capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"prepare failed:\n{done.stderr[-3000:]}")
    images = files + VALID
    rows = [dict(what="prepare (whole run)", seconds=seconds, peak_mb=None,
                 extra=f"{images / seconds:.0f} images/s with 2 workers, {len(_digests(whole))} shards")]
    print(rows[-1], flush=True)

    process = subprocess.Popen(_prepare_cmd(root, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                               start_new_session=True)
    progress = killed / ".prepare-progress.jsonl"
    while process.poll() is None:
        if progress.is_file() and len(progress.read_text().splitlines()) >= kill_after:
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait()
    complete = len(progress.read_text().splitlines()) if progress.is_file() else 0
    start = time.perf_counter()
    rerun = subprocess.run(_prepare_cmd(root, killed), capture_output=True, text=True, cwd=REPO)
    rerun_seconds = time.perf_counter() - start
    said = [line for line in (rerun.stdout + rerun.stderr).splitlines() if "resuming" in line]
    if rerun.returncode:
        raise RuntimeError(f"prepare rerun failed:\n{rerun.stderr[-3000:]}")
    one, two = _manifest(whole), _manifest(killed)
    differ = sorted(key for key in set(one) | set(two) if _addressless(one.get(key)) != _addressless(two.get(key)))
    if not differ and one != two:
        differ_note = " (apart from object addresses in bad_files reasons)"
    else:
        differ_note = ""
    shards_one, shards_two = _digests(whole), _digests(killed)
    differ += [f"shard {name}" for name in sorted(set(shards_one) | set(shards_two)) if shards_one.get(name) != shards_two.get(name)]
    equal = f"yes{differ_note}" if not differ else f"no ({', '.join(differ[:5])} differ)"
    rows.append(dict(what="prepare killed, rerun", seconds=rerun_seconds, peak_mb=None,
                     extra=f"killed with {complete} shard(s) recorded; rerun: {said[0] if said else 'no resuming line'}; "
                           f"equal to the whole run: {equal}"))
    print(rows[-1], flush=True)
    shutil.rmtree(whole, ignore_errors=True)
    shutil.rmtree(killed, ignore_errors=True)
    return rows


# ------------------------------------------------------------------------------------------------
# predict


MODEL = """
import torch
from disttrain.config import ModelConfig
from disttrain.models.build import build_model
from disttrain.train.checkpoint import save_weights
torch.manual_seed(0)
model = build_model(ModelConfig(name="tiny/cnn"), 10)
save_weights({path!r}, model.state_dict(), [f"k{{i}}" for i in range(10)], "tiny/cnn", image_size=8, load_size=8,
             normalize={{"mean": [0.5] * 3, "std": [0.25] * 3}}, precision="no")
RESULT = {{}}
"""

PREDICT = """
import sys, time
from disttrain.cli import main
start = time.perf_counter()
code = main(["predict", "--weights", {model!r}, {inputs!r}, "--out", {out!r}, "--workers", "2", "--batch-size", "256"])
RESULT = dict(seconds=time.perf_counter() - start, code=code)
"""


def measure_predict(root: Path, files: int, work: Path, old: str | None, new: bool = True) -> list[dict]:
    model = work / "model.pt"
    if not model.is_file():
        run_measured(MODEL.format(path=str(model)))
    rows = []
    runs = ([("predict", {})] if new else []) + ([("predict (old package)", {"PYTHONPATH": old})] if old else [])
    for label, env in runs:
        out = work / "predicted.csv"
        result = run_measured(PREDICT.format(model=str(model), inputs=str(root / "train"), out=str(out)), env=env, sample=True)
        lines = sum(1 for _ in open(out)) - 1
        rows.append(dict(what=label, seconds=result["seconds"], peak_mb=result["peak_mb"],
                         extra=f"{lines / result['seconds']:.0f} images/s, {lines} rows; workers' peaks summed "
                               f"{result['workers_mb']:.0f} MB over {result['descendants']} process(es); "
                               f"{Path(result['package']).parent}"))
        print(rows[-1], flush=True)
        out.unlink()
    return rows


def measure_predict_start(root: Path, work: Path, rows: int, old: str | None) -> list[dict]:
    """The peak resident memory of predict's main process (VmHWM) over its first `rows` rows, then
    killed: the listing, the loaders' start and the steady state, without the whole run's time.
    The rows are counted in its part file, polled every 0.5 s (a benchmark's sampler)."""
    model = work / "model.pt"
    if not model.is_file():
        run_measured(MODEL.format(path=str(model)))
    out, result = work / "started.csv", []
    for label, env in [("predict", {})] + ([("predict (old package)", {"PYTHONPATH": old})] if old else []):
        code = PREDICT.format(model=str(model), inputs=str(root / "train"), out=str(out))
        process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, **env}, cwd=work, start_new_session=True)
        part = Path(f"{out}.parts") / "part-00000.csv"
        start, peak, written = time.perf_counter(), 0, 0
        while process.poll() is None:
            peak = max(peak, _status(process.pid, "VmHWM"))
            written = sum(1 for _ in open(part)) if part.is_file() else 0
            if written >= rows:
                break
            time.sleep(0.5)
        peak = max(peak, _status(process.pid, "VmHWM"))
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        shutil.rmtree(f"{out}.parts", ignore_errors=True)
        result.append(dict(what=f"{label}, first {rows} rows", seconds=time.perf_counter() - start, peak_mb=peak / 1024,
                           extra=f"killed after {written} rows (VmHWM of the main process, polled)"))
        print(result[-1], flush=True)
    return result


# ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", default="100000,1000000", help="comma-separated numbers of training files")
    parser.add_argument("--root", default="/tmp/million", help="where the folders are made (and reused)")
    parser.add_argument("--only", default="scan,prepare,predict",
                        help="which measures: scan, prepare, predict, predict-old (the --old package's predict)")
    parser.add_argument("--drop-caches", action="store_true", help="also a truly cold scan (root: drops the kernel's caches)")
    parser.add_argument("--full-at-1m", action="store_true", help="also verify=full at 1,000,000 files and more")
    parser.add_argument("--kill-after", type=int, default=20, help="complete shards before the prepare run is killed")
    parser.add_argument("--predict-rows", type=int, default=0,
                        help="predict only until this many rows are written, then kill it (its peak memory so far)")
    parser.add_argument("--old", help="a copy of the disttrain package to predict with too (PYTHONPATH)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    table = []
    for files in (int(n) for n in args.files.split(",")):
        root = make_folder(Path(args.root) / str(files), files)
        work = Path(tempfile.mkdtemp(prefix=f"million-{files}-"))
        try:
            rows = []
            if "scan" in only:
                levels = ["header"] + (["full", "off"] if files < 1_000_000 else ["full"] if args.full_at_1m else [])
                rows += measure_scan(root, work, levels, args.drop_caches)
            if "prepare" in only:
                rows += measure_prepare(root, files, work, args.kill_after)
            if args.predict_rows:
                rows += measure_predict_start(root, work, args.predict_rows, args.old if "predict-old" in only else None)
            elif "predict" in only or "predict-old" in only:
                rows += measure_predict(root, files, work, args.old if "predict-old" in only else None, "predict" in only)
            table += [dict(files=files, **row) for row in rows]
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{'files':>9}  {'measure':<42} {'seconds':>8} {'peak RSS MB':>12}  notes")
    for row in table:
        peak = f"{row['peak_mb']:.0f}" if row["peak_mb"] is not None else "-"
        print(f"{row['files']:>9}  {row['what']:<42} {row['seconds']:>8.1f} {peak:>12}  {row['extra']}")


if __name__ == "__main__":
    main()
