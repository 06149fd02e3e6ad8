import pytest

"""The pure config: YAML and overrides typed by the dataclass fields, each section's own checks, and
no model family involved (the family checks: tests/unit/models/test_checks.py)."""

from disttrain.config import Config, ConfigError, ModelConfig, save_config
from disttrain.config.parse import build_config_unchecked, load_config_unchecked


def test_defaults_are_valid():
    cfg = build_config_unchecked()
    assert isinstance(cfg, Config)
    assert cfg.data.valid_dir == "auto" and cfg.train.precision == "auto"


def test_overrides_are_typed_by_field():
    cfg = build_config_unchecked(
        {"optim": {"lr": 0.1}},
        [
            "optim.lr=3e-3",
            "data.batch_size=32",
            "model.channels_last=false",
            "augment.mean=[0.5, 0.5, 0.5]",
            "augment.std=0.2,0.2,0.2",
            "train.clip_grad=1",
            "model.pretrained=null",
            "run.name=x1",
        ],
    )
    assert cfg.optim.lr == 3e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 32 and isinstance(cfg.data.batch_size, int)
    assert cfg.model.channels_last is False
    assert cfg.augment.mean == [0.5, 0.5, 0.5] and cfg.augment.std == [0.2, 0.2, 0.2]
    assert cfg.train.clip_grad == 1.0 and isinstance(cfg.train.clip_grad, float)
    assert cfg.model.pretrained is None
    assert cfg.run.name == "x1"


def test_yaml_3e_minus_3_without_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 3e-3\ntrain:\n  clip_grad: null\n")
    cfg = load_config_unchecked(path)
    assert cfg.optim.lr == 3e-3 and cfg.train.clip_grad is None


@pytest.mark.parametrize(
    "override, closest",
    [("optim.lrr=1", "optim.lr"), ("data.batchsize=3", "data.batch_size"), ("trian.epochs=2", "train.epochs")],
)
def test_unknown_key_names_it_and_the_closest_valid_key(override, closest):
    with pytest.raises(ConfigError) as err:
        build_config_unchecked({}, [override])
    message = str(err.value)
    assert repr(override.split("=")[0]) in message and repr(closest) in message


@pytest.mark.parametrize(
    "raw, overrides, expected",
    [
        ({"finetuning": {"groups": 3}}, [], "unknown config section 'finetuning'; did you mean 'finetune'?"),
        ({"fintune": {"groups": 3}}, [], "unknown config section 'fintune'; did you mean 'finetune'?"),
        ({"zzz": {}}, [], "unknown config section 'zzz'; the sections are run, data, augment, model, finetune, "
         "optim, schedule, sweep, train, log, checkpoint, stages"),
        ({}, ["stage.x=1"], "unknown config section 'stage' (in 'stage.x'); did you mean 'stages'?"),
        ({}, ["optim.zzz=1"], "unknown config key 'optim.zzz'; the keys of optim are name, lr, weight_decay, momentum, nesterov, betas2"),
        ({}, ["log.wandb.mod=x"], "unknown config key 'log.wandb.mod'; did you mean 'log.wandb.mode'?"),
    ],
)
def test_unknown_section_names_the_sections_and_an_unknown_key_its_section_keys(raw, overrides, expected):
    with pytest.raises(ConfigError) as err:
        build_config_unchecked(raw, overrides)
    assert str(err.value).startswith(expected)
    assert "data.batch_size" not in str(err.value), "never all the keys"


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  roott: /x\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'data\.roott'.*'data\.root'"):
        load_config_unchecked(path)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.batch_size=abc", r"data\.batch_size: 'abc' is not int"),
        ("optim.lr=fast", r"optim\.lr: 'fast' is not float"),
        ("model.channels_last=maybe", r"model\.channels_last: 'maybe' is not bool"),
        ("train.precision=fp8", r"train\.precision: 'fp8' is not one of auto, no, bf16, fp16"),
        ("train.epochs=null", r"train\.epochs: 'null' is not int"),
        ("augment.mean=[a, b, c]", r"augment\.mean\[0\]: 'a' is not float"),
    ],
)
def test_wrong_type_names_key_value_and_expected_type(override, expected):
    with pytest.raises(ConfigError, match=expected):
        build_config_unchecked({}, [override])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.image_size=300", r"data\.image_size \(300\) is larger than data\.load_size"),
        ("data.batch_size=0", r"data\.batch_size: must be > 0"),
        ("schedule.warmup=1.5", r"schedule\.warmup"),
        ("augment.std=[1, 0, 1]", r"augment\.std"),
        ("run.name=a/b", r"run\.name"),
    ],
)
def test_invalid_values_say_what_to_change(override, expected):
    with pytest.raises(ConfigError, match=expected):
        build_config_unchecked({}, [override])


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="section.key=value"):
        build_config_unchecked({}, ["optim.lr"])


def test_saved_config_loads_back_equal(tmp_path):
    cfg = build_config_unchecked({}, ["optim.lr=3e-3", "augment.flip=false", "train.clip_grad=2.5"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config_unchecked(tmp_path / "run" / "config.yaml") == cfg


def test_every_field_has_a_docstring():
    import ast
    import inspect

    import disttrain.config.schema as module

    tree = ast.parse(inspect.getsource(module))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.endswith("Config") and node.name != "ConfigError":
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), (
                        f"{node.name}.{stmt.target.id} has no docstring"
                    )


def test_the_config_package_builds_a_default_config_without_any_model_family():
    """disttrain.config imports nothing of disttrain but its errors; a model name no family has
    passes the pure build (disttrain.models.checks refuses it: tests/unit/models/test_checks.py)."""
    import subprocess
    import sys

    code = ("import sys; from disttrain.config.parse import build_config_unchecked; "
            "cfg = build_config_unchecked({'model': {'name': 'no_such_model'}, 'finetune': {'groups': 9}, 'stages': [{}]}); "
            "assert cfg.model == __import__('disttrain.config', fromlist=['ModelConfig']).ModelConfig(name='no_such_model'); "
            "print(sorted(m for m in sys.modules if m.startswith('disttrain')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(out)
    assert loaded and all(m == "disttrain" or m.startswith(("disttrain.config", "disttrain.errors")) for m in loaded), loaded
    assert ModelConfig(name="timm/no_such_model", pretrained="/nonexistent.pt").pretrained == "/nonexistent.pt"
