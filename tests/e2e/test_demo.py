"""The entry points as a user runs them: the demo config under accelerate launch, and plain python."""

import json
import math
import re

import pytest
import yaml

from conftest import REPO, launch
from disttrain.dist import cores

pytestmark = pytest.mark.e2e

HEADER = "epoch     train_loss  valid_loss  accuracy  time"
ROW = re.compile(r"^(\d+)\s{2,}(\d+\.\d{6})\s{2,}(\d+\.\d{6})\s{2,}([01]\.\d{6})\s{2,}(\d{2}:\d{2})$")


def test_demo_config_two_processes_prints_the_table(tmp_path, mnist_small):
    proc = launch(
        ["launch/train.py", "--config", "configs/demo.yaml", f"data.root={mnist_small}", f"run.output_dir={tmp_path}",
         "train.epochs=3", "data.batch_size=16", "log.progress=false", "train.precision=no"],
        nproc=2,
    )
    lines = proc.stdout.splitlines()
    assert lines.count(HEADER) == 1, proc.stdout
    rows = [ROW.match(line) for line in lines if ROW.match(line)]
    assert [r.group(1) for r in rows] == ["0", "1", "2"]
    train_losses = [float(r.group(2)) for r in rows]
    # learning, measured against the run's own first epoch (3 x 10 steps on 300 digits; here the last
    # epoch's loss is about a third of the first's), and well above chance (0.10) at the end
    assert train_losses[2] < 0.6 * train_losses[0], proc.stdout
    assert all(math.isfinite(float(r.group(3))) for r in rows) and float(rows[2].group(4)) > 0.25, proc.stdout
    split = cores.plan(cores.machine_here(), 0, 2, "cpu")  # rank 0's: it runs where this test runs
    assert f"training on 2 process(es) (cpu, no precision; per rank {split.describe()}; images decoded once" in proc.stdout
    assert " MB per rank: data.cache)): global batch 32 = 16 per rank x 2 rank(s)" in proc.stdout
    assert re.search(r"^900 training images in [\d.]+ s of training: [\d.]+ images/s \(world size 2", proc.stdout, re.M)
    assert proc.stdout.count(HEADER) == 1, "only the main process prints"

    run_dir = tmp_path / "demo"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["root"] == str(mnist_small) and saved["train"]["epochs"] == 3 and saved["augment"]["flip"] is False
    assert (run_dir / "bad_files.txt").read_text() == ""
    results = json.loads((run_dir / "results.json").read_text())
    assert [e["accuracy"] for e in results["epochs"]] == pytest.approx([float(r.group(4)) for r in rows], abs=1e-6)
    assert results["precision"] == "no"
    assert (run_dir / "model.pt").stat().st_size > 1_000_000


def test_demo_config_precision_auto_says_what_it_chose(tmp_path, mnist_small):
    """The demo config's `auto`, and the one bf16 run of the suite: two steps in one process (bf16
    is emulated, several times slower, on CPUs without native bf16; `auto` picks fp32 there)."""
    from disttrain.dist.precision import cpu_has_native_bf16, resolve_precision

    common = ["launch/train.py", "--config", "configs/demo.yaml", f"data.root={mnist_small}", "train.epochs=1",
              "train.max_steps_per_epoch=2", "data.batch_size=16", "log.progress=false", "data.num_workers=0"]
    auto = launch(common + [f"run.output_dir={tmp_path}", "run.name=auto"], launcher="python")
    chosen = resolve_precision("auto", "cpu")
    assert chosen.mode == ("bf16" if cpu_has_native_bf16() else "no")
    assert f"training on 1 process(es) (cpu, {chosen.mode} precision; {chosen.reason}; per rank " in auto.stdout
    meta = json.loads(next((tmp_path / "auto" / "checkpoints").glob("step-*/meta.json")).read_text())
    assert meta["precision"] == chosen.mode

    bf16 = launch(common + [f"run.output_dir={tmp_path}", "run.name=bf16", "train.precision=bf16"], launcher="python")
    assert "training on 1 process(es) (cpu, bf16 precision; per rank " in bf16.stdout
    warned = [line for line in bf16.stdout.splitlines() if line.startswith("warning: train.precision=bf16 on CPU (")]
    assert len(warned) == (0 if cpu_has_native_bf16() else 1)
    row = next(ROW.match(line) for line in bf16.stdout.splitlines() if ROW.match(line))
    assert math.isfinite(float(row.group(2))) and math.isfinite(float(row.group(3)))
    assert json.loads((tmp_path / "bf16" / "results.json").read_text())["precision"] == "bf16"


def test_plain_python_on_real_photos_one_process(tmp_path, hymenoptera):
    proc = launch(
        ["launch/train.py", f"data.root={hymenoptera}", f"run.output_dir={tmp_path}", "run.name=h", "model.name=resnet18",
         "data.load_size=72", "data.image_size=64", "data.batch_size=16", "train.epochs=1", "train.max_steps_per_epoch=3",
         "log.progress=false", "data.num_workers=2", "train.precision=no"],
        launcher="python",
    )
    assert "data: 245 train / 153 valid images in 2 classes" in proc.stdout
    assert "training on 1 process(es)" in proc.stdout
    assert len([line for line in proc.stdout.splitlines() if ROW.match(line)]) == 1
    assert (tmp_path / "h" / "bad_files.txt").read_text() == ""


def test_demo_data_is_written_once(tmp_path):
    from disttrain.data.demo import write_demo_data

    path = write_demo_data(tmp_path / "m", train_per_class=3, valid_per_class=2)
    assert sorted(p.name for p in (path / "train").iterdir()) == [str(d) for d in range(10)]
    assert len(list(path.glob("train/*/*.png"))) == 30 and len(list(path.glob("valid/*/*.png"))) == 20
    first = (path / "train" / "7" / "3500.png").stat().st_mtime_ns
    write_demo_data(tmp_path / "m", train_per_class=3, valid_per_class=2)
    assert (path / "train" / "7" / "3500.png").stat().st_mtime_ns == first
    assert (path / "valid" / "7" / "3999.png").exists(), "valid takes the last rows of each digit"
    with pytest.raises(FileExistsError):
        write_demo_data(tmp_path / "m", train_per_class=4, valid_per_class=2)


def test_user_error_exits_2_with_one_line(tmp_path):
    proc = launch(["launch/train.py", "data.root=/definitely/missing", f"run.output_dir={tmp_path}"], launcher="python", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "disttrain: error: data.root: /definitely/missing is not a folder (it should hold train/<class>/ and valid/<class>/)"


def test_the_finetune_config_trains_the_lessons_recipe_on_the_real_photos(tmp_path, hymenoptera):
    """configs/finetune.yaml as a user runs it (`disttrain launch`, 2 processes, its own data path and
    the shared ImageNet weights), with the unfreeze stage cut short and swept (`stages.1.lr=auto`, the
    lesson's LR finder after unfreezing; the config's own is a fixed rate): the head stage trains on
    precomputed activations after its sweep, then every layer after a second sweep. The pretrained
    features separate ants from bees: the head alone is far above the 0.5 of chance (0.95 measured)."""
    weights = REPO.parent / "shared" / "weights" / "mobilenet_v2_imagenet.pt"
    if not weights.is_file():
        pytest.skip("../shared/weights/mobilenet_v2_imagenet.pt is not present")
    done = launch(["launch/train.py", "--config", "configs/finetune.yaml", f"run.output_dir={tmp_path}", "log.progress=false",
                   "stages.1.epochs=1", "stages.1.lr=auto", "stages.1.sweep.num_iter=12", "train.max_steps_per_epoch=4"],
                  launcher="disttrain")
    out = done.stdout
    assert "data: 245 train / 153 valid images in 2 classes" in out
    assert re.search(r"layer groups of mobilenet_v2 \(finetune\.groups=3: .*\):\n  group 0: features\.0 \.\. features\.6 .*\n"
                     r"  group 1: features\.7 \.\. features\.18 .*\n  group 2 \(head\): classifier ", out), out
    assert "head: precomputed the frozen body's output for 245 train + 153 valid images" in out
    assert out.count("LR sweep: suggestion") == 2
    assert re.search(r"unfreeze \(2/2\): epoch 4, nothing frozen, BatchNorm running statistics kept, swept peak LR \S+ / \S+ / \S+ "
                     r"\(group 0 \.\. head\), sgdr \(cycle_len 1, cycle_mult 2\), 224 px from 256 \(augmented\)", out), out
    epochs = json.loads((tmp_path / "finetune" / "results.json").read_text())["epochs"]
    assert [e["stage"] for e in epochs] == [0, 0, 0, 0, 1]
    assert epochs[3]["accuracy"] > 0.8 and math.isfinite(epochs[4]["valid_loss"])
