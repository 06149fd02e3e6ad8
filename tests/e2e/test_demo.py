"""The entry points as a user runs them: the demo config under accelerate launch, and plain python."""

import json
import re

import pytest
import yaml

from conftest import launch

pytestmark = pytest.mark.e2e

HEADER = "epoch     train_loss  valid_loss  accuracy  time"
ROW = re.compile(r"^(\d+)\s{2,}(\d+\.\d{6})\s{2,}(\d+\.\d{6})\s{2,}([01]\.\d{6})\s{2,}(\d{2}:\d{2})$")


def test_demo_config_two_processes_prints_the_table(tmp_path, mnist_small):
    proc = launch(
        ["launch/train.py", "--config", "configs/demo.yaml", f"data.root={mnist_small}", f"run.output_dir={tmp_path}",
         "train.epochs=1", "data.batch_size=16", "log.progress=false"],
        nproc=2,
    )
    lines = proc.stdout.splitlines()
    assert lines.count(HEADER) == 1, proc.stdout
    rows = [ROW.match(line) for line in lines if ROW.match(line)]
    assert [r.group(1) for r in rows] == ["0"]
    epoch, train_loss, valid_loss, accuracy, _ = rows[0].groups()
    # 10 steps on 300 digits: better than chance (loss ln 10 = 2.30, accuracy 0.10)
    assert 0 < float(train_loss) < 2.2 and 0 < float(valid_loss) and float(accuracy) > 0.2, proc.stdout
    assert "training on 2 process(es) (cpu, bf16 precision): global batch 32 = 16 per rank x 2 rank(s)" in proc.stdout
    assert re.search(r"^300 training images in [\d.]+ s of training: [\d.]+ images/s \(world size 2", proc.stdout, re.M)
    assert proc.stdout.count(HEADER) == 1, "only the main process prints"

    run_dir = tmp_path / "demo"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["root"] == str(mnist_small) and saved["train"]["epochs"] == 1 and saved["augment"]["flip"] is False
    assert (run_dir / "bad_files.txt").read_text() == ""
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs"][0]["accuracy"] == pytest.approx(float(accuracy), abs=1e-6)
    assert (run_dir / "model.pt").stat().st_size > 1_000_000


def test_plain_python_on_real_photos_one_process(tmp_path, hymenoptera):
    proc = launch(
        ["launch/train.py", f"data.root={hymenoptera}", f"run.output_dir={tmp_path}", "run.name=h", "model.name=resnet18",
         "data.load_size=72", "data.image_size=64", "data.batch_size=16", "train.epochs=1", "train.max_steps_per_epoch=3",
         "log.progress=false", "data.num_workers=2"],
        launcher="python",
    )
    assert "data: 245 train / 153 valid images in 2 classes" in proc.stdout
    assert "training on 1 process(es)" in proc.stdout
    assert len([line for line in proc.stdout.splitlines() if ROW.match(line)]) == 1
    assert (tmp_path / "h" / "bad_files.txt").read_text() == ""


def test_demo_data_is_written_once(tmp_path):
    from disttrain.demo_data import write_demo_data

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
