"""What the documentation may name: config keys that the schema has, and command-line flags that the
parsers take. Kept apart from the tests so that a test can show the checks fail on a misspelling.

Config keys are found as `section.key` for the schema's sections (`log.wandb.mode`, and a stage's
`stages.1.lr`, `stages[1].lr`, `stages.N.lr`), and in ```yaml blocks as nested mappings. Flags are
found on command lines (in code blocks, or inline code) that run `disttrain <command>`,
`disttrain launch` / `accelerate launch` / `torchrun` (their own flags up to the script, then the
script's: `launch/train.py` or `-m disttrain.cli <command>`), or `python launch/train.py`.
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from disttrain.config.reference import config_keys, sections

REPO = Path(__file__).resolve().parents[2]
# file names that look like `section.key` (launch/train.py, model.pt, data.md, train.sbatch, ...)
FILE_SUFFIXES = {"py", "pt", "pth", "onnx", "ts", "md", "yaml", "sbatch", "json", "jsonl", "safetensors", "bin", "csv", "png", "sh"}
# a line that shows a wrong key on purpose (an error message, a typo's row in a table)
DELIBERATE = re.compile(r"unknown config key|typo", re.IGNORECASE)


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Problem:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


# ------------------------------------------------------------------------------------ config keys

def known_names() -> set[str]:
    """Every key, and every section name (`log.wandb`, `stages.N.schedule`), as the reference spells them."""
    return set(config_keys()) | {s.name for s in sections()}


def _sections_pattern(names: set[str]) -> re.Pattern:
    tops = sorted({name.split(".")[0] for name in names if not name.startswith("stages")})
    return re.compile(r"(?<![\w./\-\[])(" + "|".join(tops) + r")\.([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)")


STAGE_KEY = re.compile(r"(?<![\w./\-])stages(?:\.(?:\d+|N)|\[\d+\])\.([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)")


def _yaml_keys(data, prefix: str) -> list[str]:
    out = []
    if isinstance(data, dict):
        for key, value in data.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            out.append(name)
            out += _yaml_keys(value, name)
    elif isinstance(data, list) and prefix == "stages":
        for item in data:
            out += _yaml_keys(item, "stages.N")
    return out


def config_problems(text: str, where: str, names: set[str] | None = None) -> list[Problem]:
    """The config keys `text` names that the schema does not have."""
    names = known_names() if names is None else names
    pattern = _sections_pattern(names)
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        if DELIBERATE.search(line):
            continue
        for match in pattern.finditer(line):
            section, rest = match.group(1), match.group(2)
            if rest.split(".")[0] in FILE_SUFFIXES:
                continue
            key = f"{section}.{rest}"
            if key not in names:
                problems.append(Problem(f"{where}:{number}", f"config key {key!r} is not in the schema"))
        for match in STAGE_KEY.finditer(line):
            key = f"stages.N.{match.group(1)}"
            if key not in names:
                problems.append(Problem(f"{where}:{number}", f"stage key {match.group(0)!r} is not in the schema"))
    for block in re.finditer(r"```ya?ml\n(.*?)```", text, re.DOTALL):
        data = yaml.safe_load(block.group(1))
        for key in _yaml_keys(data, ""):
            if key not in names and key != "stages":
                problems.append(Problem(where, f"config key {key!r} of a yaml block is not in the schema"))
    return problems


# ------------------------------------------------------------------------------------ CLI flags

def _flags(parser: argparse.ArgumentParser) -> dict[str, bool]:
    """{option: takes a value} of a parser."""
    out = {}
    for action in parser._actions:
        for option in action.option_strings:
            out[option] = action.nargs != 0
    return out


@dataclass
class Parsers:
    commands: dict[str, dict[str, bool]]  # disttrain <command> -> its options
    train: dict[str, bool]  # launch/train.py
    launchers: dict[str, dict[str, bool]]  # accelerate launch / disttrain launch / torchrun


def parsers() -> Parsers:
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    import disttrain.cli as cli

    train_parser = getattr(cli, "train_parser", None)
    if train_parser is None:
        from disttrain.cli.parsers import train_parser
    command = cli.command_parser()
    sub = next(a for a in command._actions if isinstance(a, argparse._SubParsersAction))
    commands = {name: _flags(p) for name, p in sub.choices.items()}
    accelerate = _flags(launch_command_parser())
    return Parsers(commands, _flags(train_parser()), {"accelerate": accelerate, "disttrain": accelerate, "torchrun": _flags(get_args_parser())})


def _command_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command) for each line of a code block (continuations joined) and each inline
    code span that runs disttrain, a launcher or launch/train.py."""
    lines = text.splitlines()
    out: list[tuple[int, str]] = []
    in_block, pending, start = False, "", 0
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            if not pending:
                start = number
            pending += " " + line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            out.append((start, pending.strip()))
            pending = ""
        else:
            out += [(number, span) for span in re.findall(r"`([^`]+)`", line)]
    return [(n, c) for n, c in out if re.search(r"\bdisttrain [a-z]|accelerate launch|torchrun |launch/train\.py", c)]


def _words(command: str) -> list[str]:
    command = re.sub(r"(^|\s)#.*$", "", command)  # a comment
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    return [w.strip("[]") for w in words]


def _check_options(words: list[str], options: dict[str, bool], what: str) -> list[str]:
    bad = []
    for word in words:
        if word.startswith("--"):
            flag = word.split("=", 1)[0]
            if flag not in options:
                bad.append(f"{flag} is not an option of {what}")
    return bad


def _script_problems(words: list[str], known: Parsers) -> list[str]:
    """The words after a launcher's options: launch/train.py ... or -m disttrain.cli <command> ..."""
    if not words:
        return []
    if words[0] == "-m" and len(words) > 2 and words[1] in ("disttrain.cli", "disttrain"):
        return _command_problems(words[2:], known)
    if words[0].endswith("launch/train.py"):
        return _check_options(words[1:], known.train, "launch/train.py")
    return []


def _command_problems(words: list[str], known: Parsers) -> list[str]:
    """`<command> args` of `disttrain <command>`."""
    if not words or words[0] not in known.commands or words[0] == "launch":
        return []
    return _check_options(words[1:], known.commands[words[0]], f"disttrain {words[0]}")


def _launcher_problems(words: list[str], options: dict[str, bool], name: str, known: Parsers) -> list[str]:
    bad, i = [], 0
    while i < len(words):
        word = words[i]
        if word == "-m" or word.endswith(".py"):
            return bad + _script_problems(words[i:], known)
        if word == "...":  # an elision may hide the script: what follows is not the launcher's
            return bad
        if not word.startswith("-"):  # the value of an option whose arity is unknown (a misspelt one), or `...`
            i += 1
            continue
        flag = word.split("=", 1)[0]
        if flag.startswith("--") and flag not in options:
            bad.append(f"{flag} is not an option of {name}")
        i += 2 if options.get(flag) and "=" not in word else 1
    return bad


def command_count(text: str) -> int:
    """How many command lines `flag_problems` reads in `text`."""
    return len(_command_lines(text))


def flag_problems(text: str, where: str, known: Parsers) -> list[Problem]:
    """The flags that `text`'s command lines give a command that does not take them."""
    problems = []
    for number, command in _command_lines(text):
        words = _words(command)
        for i, word in enumerate(words):
            rest, bad = words[i + 1:], None
            if word.endswith("disttrain") and rest[:1] == ["launch"]:
                bad = _launcher_problems(rest[1:], known.launchers["disttrain"], "disttrain launch", known)
            elif word == "accelerate" and rest[:1] == ["launch"]:
                bad = _launcher_problems(rest[1:], known.launchers["accelerate"], "accelerate launch", known)
            elif word == "torchrun":
                bad = _launcher_problems(rest, known.launchers["torchrun"], "torchrun", known)
            elif word.endswith("disttrain") and (i == 0 or words[i - 1] not in ("-m",)):
                bad = _command_problems(rest, known)
            elif word.endswith("python") or word.endswith("python3"):
                bad = _script_problems(rest, known)
            if bad is not None:
                problems += [Problem(f"{where}:{number}", f"{b} (in `{command}`)") for b in bad]
                break
    return problems
