"""The configuration reference (docs/configuration.md), generated from the schema itself so that the
page cannot say something the code does not: every section, every key as `section.key`, its type,
its default and its docstring.

A dataclass field's docstring (the string right below the field) is not kept at run time, so it is
read from schema.py's source with `ast`; types are read there too (as written, then shown in the
config file's words: `null`, `a | b`), defaults from the dataclasses themselves.

    python -m disttrain.config.reference > docs/configuration.md

tests/docs checks that the page equals what this module produces now, and that every config key a
page names is one of `config_keys()`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disttrain.config import schema

STAGE = "stages.N"  # how the reference spells a stage's keys (`stages.1.lr=3e-3` or `stages[1].lr=3e-3` on the line)


@dataclass(frozen=True)
class Key:
    """One config key: its dotted name, type as the user writes values, default and docstring."""

    name: str
    type: str
    default: str
    doc: str


@dataclass(frozen=True)
class Section:
    """A dataclass of the schema: its dotted prefix, what it is for, its own keys (sub-sections apart)."""

    name: str
    doc: str
    keys: tuple[Key, ...]


def _source_docs(source: str) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, ast.expr]]]:
    """Per class of the schema's source: {field: docstring} and {field: annotation node}."""
    docs: dict[str, dict[str, str]] = {}
    annotations: dict[str, dict[str, ast.expr]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        docs[node.name], annotations[node.name] = {}, {}
        body = node.body
        for stmt, after in zip(body, body[1:] + [None]):
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            annotations[node.name][stmt.target.id] = stmt.annotation
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                docs[node.name][stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs, annotations


def _type_words(node: ast.expr) -> str:
    """An annotation as the config file's values: `Optional[int]` -> `int | null`,
    `Literal["a", "b"]` -> `"a" | "b"`, `Union[int, Literal["auto"]]` -> `int | "auto"`."""
    if isinstance(node, ast.Subscript):
        head = ast.unparse(node.value)
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if head == "Literal":
            return " | ".join(f'"{a.value}"' if isinstance(a.value, str) else repr(a.value) for a in args)
        if head == "Optional":
            return f"{_type_words(args[0])} | null"
        if head == "Union":
            return " | ".join("null" if ast.unparse(a) == "None" else _type_words(a) for a in args)
        return f"{head}[{', '.join(_type_words(a) for a in args)}]"
    text = ast.unparse(node)
    return "null" if text == "None" else text


def _value_words(value: Any) -> str:
    """A default as it would be written in the YAML config."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        short = f"{value:.6g}"
        return short if float(short) == value else f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value_words(v) for v in value) + "]"
    return str(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _sections(cls: type, prefix: str, docs, annotations, section_doc: str) -> list[Section]:
    """The section `prefix` of dataclass `cls`, then its sub-sections (log.wandb; a stage's schedule
    and sweep), then the list of stages, each in field order."""
    hints = typing.get_type_hints(cls, vars(schema))
    own: list[Key] = []
    nested: list[Section] = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}.{f.name}" if prefix else f.name
        doc = docs[cls.__name__].get(f.name, "")
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            nested += _sections(hint, name, docs, annotations, doc)
        elif typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            item = typing.get_args(hint)[0]
            item_doc = inspect.cleandoc(item.__doc__ or "")
            nested += _sections(item, STAGE if f.name == "stages" else f"{name}.N", docs, annotations, f"{doc} {item_doc}".strip())
        else:
            own.append(Key(name, _type_words(annotations[cls.__name__][f.name]), _value_words(_default(f)), doc))
    here = [Section(prefix, section_doc, tuple(own))] if prefix and own else []
    return here + nested


def sections() -> list[Section]:
    """Every section of the run config, in the order of `Config`'s fields (the YAML's order)."""
    source = Path(schema.__file__).read_text(encoding="utf-8")
    docs, annotations = _source_docs(source)
    return _sections(schema.Config, "", docs, annotations, "")


def config_keys() -> dict[str, Key]:
    """Every key a config file or an override can set, by dotted name (stage keys as `stages.N.key`)."""
    return {key.name: key for section in sections() for key in section.keys}


def _md(text: str) -> str:
    """Docstring text for Markdown: one paragraph; `<`, `>` outside code spans kept literal (not HTML)."""
    text = " ".join(text.split())
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # the even parts are outside backticks
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


HEADER = """\
# Configuration reference

<!-- Generated by `python -m disttrain.config.reference > docs/configuration.md` from the field
docstrings of disttrain/config/schema.py; do not edit by hand (tests/docs checks it is current). -->

A run config is YAML with one section per dataclass of `disttrain/config/schema.py`. Every key below
can be set in the file or overridden on the command line as `section.key=value` (values are typed by
the field: `optim.lr=3e-3`, `model.channels_last=false`, `augment.mean=[0.5,0.5,0.5]`,
`train.clip_grad=null`; `log.wandb.mode=offline` for the one sub-section). An unknown key is an
error naming the closest valid one.

Stages (`stages:`, a list) take the keys of `{stage}` below; override one as `stages.1.lr=3e-4` or
`stages[1].lr=3e-4`. A key a stage leaves out takes the run's own value (see
[Fine-tuning](finetuning.md)).

Global batch = `data.batch_size` x processes x `train.grad_accum`. Accelerate configs for one GPU,
eight GPUs and two CPU processes are in `configs/accelerate/`; the precision always comes from
`train.precision`, not from the accelerate config.
"""


def markdown() -> str:
    """The text of docs/configuration.md."""
    out = [HEADER.format(stage=STAGE)]
    for section in sections():
        out.append(f"\n## `{section.name}`\n")
        if section.doc:
            out.append(f"{_md(section.doc)}\n")
        for key in section.keys:
            out.append(f"- **`{key.name}`** (`{key.type}`, default `{key.default}`): {_md(key.doc)}")
    return "\n".join(out).rstrip("\n") + "\n"


def main() -> int:
    sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
