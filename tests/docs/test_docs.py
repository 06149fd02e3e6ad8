"""The documentation says only what is true of the code: the configuration reference is what the
schema generates now, every config key and command-line flag a page names exists, and the site
builds with `mkdocs build --strict` (a broken link or anchor fails it)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from disttrain.config import reference
from docs_checks import REPO, command_count, config_problems, flag_problems, known_names, pages, parsers


def test_the_configuration_reference_is_what_the_schema_generates():
    page = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == reference.markdown(), (
        "docs/configuration.md is stale: run `python -m disttrain.config.reference > docs/configuration.md`"
    )


def test_the_reference_names_every_key_of_every_section():
    text = reference.markdown()
    keys = reference.config_keys()
    for expected in ("run.name", "data.cache", "log.wandb.mode", "train.pin_cores", "stages.N.freeze_to",
                     "stages.N.schedule.cycle_mult", "stages.N.sweep.num_iter"):
        assert expected in keys
    for key in keys.values():
        assert f"**`{key.name}`**" in text
        assert key.doc, f"{key.name} has no docstring in disttrain/config/schema.py"


def test_every_config_key_the_pages_name_exists():
    names = known_names()
    problems = [p for page in pages() for p in config_problems(page.read_text(encoding="utf-8"), page.name, names)]
    assert not problems, "\n".join(map(str, problems))
    assert len(pages()) >= 15  # README.md and every page of docs/


def test_every_flag_the_pages_give_a_command_exists():
    known = parsers()
    problems = [p for page in pages() for p in flag_problems(page.read_text(encoding="utf-8"), page.name, known)]
    assert not problems, "\n".join(map(str, problems))
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert command_count(readme) >= 15  # the check reads the README's command lines, not nothing


def test_the_checks_catch_a_misspelling_and_pass_the_right_spelling():
    names = known_names()
    wrong = "Set `optim.lr=3e-3` and `data.batch_sise=32`, or `stages.1.lrr=1e-4` and `stages[0].freeze_too`.\n"
    found = [p.what for p in config_problems(wrong, "t.md", names)]
    assert len(found) == 3 and any("data.batch_sise" in f for f in found), found
    assert any("stages.1.lrr" in f for f in found) and any("freeze_too" in f for f in found), found
    yaml_block = "```yaml\nstages:\n  - name: head\n    freez_to: -1\n```\n"
    assert [p.what for p in config_problems(yaml_block, "t.md", names)] == [
        "config key 'stages.N.freez_to' of a yaml block is not in the schema"]
    right = ("`launch/train.py`, `model.pt`, `log.wandb.mode=offline`, `stages[1].lr=3e-4`, `stages.N.sweep.method`\n"
             "```yaml\nlog:\n  wandb: {mode: offline}\nstages:\n  - schedule: {name: sgdr}\n```\n")
    assert config_problems(right, "t.md", names) == []

    known = parsers()
    commands = ("```bash\n"
                "disttrain predict --weights m.pt --topkk 3 x/\n"
                "disttrain launch --multi_gpu --num_procs 2 -m disttrain.cli evaluate --weights m.pt \\\n"
                "    --tta --out-dirr eval/\n"
                "accelerate launch --num_processes 2 launch/train.py --config c.yaml --find-lrr\n"
                "```\n")
    found = [p.what.split(" (in")[0] for p in flag_problems(commands, "t.md", known)]
    assert found == ["--topkk is not an option of disttrain predict", "--num_procs is not an option of disttrain launch",
                     "--out-dirr is not an option of disttrain evaluate", "--find-lrr is not an option of launch/train.py"], found
    fine = ("```bash\ndisttrain launch --multi_gpu --num_processes 2 -m disttrain.cli evaluate --weights m.pt --tta --out-dir e/\n"
            "disttrain export --weights m.pt --no-dynamic-batch --batch-size 8 --out m.onnx\n"
            "python launch/train.py --config c.yaml --find-lr\n```\n`disttrain prepare a b --presize 28 --no-progress`\n")
    assert flag_problems(fine, "t.md", known) == []


def test_the_site_builds_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs and mkdocs-material are not installed (pip install -e '.[dev]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()


def test_every_file_of_the_project_the_pages_name_exists():
    """A page that names disttrain/old_module.py after a move sends the reader nowhere."""
    import re

    named = {(page.name, path) for page in pages()
             for path in re.findall(r"\b(?:disttrain|benchmarks|tests|launch|configs)/[\w/.\-]+\.(?:py|yaml|sh|sbatch)\b",
                                    page.read_text(encoding="utf-8"))}
    assert len(named) > 20
    missing = sorted((page, path) for page, path in named if not (REPO / path).exists())
    assert not missing, missing


def test_no_page_for_users_names_an_issue():
    """What landed when is CHANGELOG.md's; the pages say what the code does now."""
    import re

    named = [(page.name, hit) for page in pages() for hit in re.findall(r"(?i)\bissues? ?#?\d+", page.read_text(encoding="utf-8"))]
    assert not named, named
