"""Argument parsing shared by the scripts: HfArgumentParser, plus a YAML/JSON config file as first argument.

`python train.py configs/x.yaml --learning_rate 1e-3` reads the file's keys as defaults and lets the
command line override them; an unknown key in the file is an error that names it. Several files may come
first (`configs/cpu/recipe.yaml configs/cpu/student.yaml`): a later file's keys override an earlier one's.
"""

import difflib
import json
import os
import sys

import yaml
from transformers import HfArgumentParser

from wikigpt.errors import UsageError

CONFIG_EXTENSIONS = (".yaml", ".yml", ".json")


def _read_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise UsageError(f"config file {path!r} could not be read ({str(err).splitlines()[0]}); fix its syntax") from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"config file {path!r} must hold a mapping of argument names to values")
    return values


def read_config(path: str, parser: HfArgumentParser) -> dict:
    """One config file's keys, each checked against the parser's argument names."""
    values = _read_config(path)
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"config file {path!r} has unknown keys {unknown}; remove them or fix the spelling "
                         f"(see --help for the accepted names)")
    return values


def parse_args(dataclass_types, argv: list[str] | None = None, description: str | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types, description=description)
    values, paths = {}, []
    while argv and argv[0].endswith(CONFIG_EXTENSIONS) and not argv[0].startswith("-"):
        path = argv.pop(0)
        if not os.path.isfile(path):
            raise UsageError(f"config file {path!r} does not exist; pass the path of a .yaml or .json file")
        values.update(read_config(path, parser))
        paths.append(path)
    if paths:
        parser.set_defaults(**values)
        # Fields that are required on the command line are satisfied by the files.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    help_hint = f"python {parser.prog} --help lists every flag with its type and choices"

    def error(message):  # argparse's own error() prints the whole usage block and exits
        raise UsageError(f"{message}; fix the value ({help_hint})")

    parser.error = error
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as err:  # TrainingArguments.__post_init__ rejects some values and flag combinations
        message = " ".join(str(err).split())
        # "weekly is not a valid IntervalStrategy": name the flag that was given the value.
        given = [f"{argv[i - 1]} {argv[i]}: " for i in range(1, len(argv))
                 if argv[i - 1].startswith("--") and argv[i] and message.startswith(argv[i] + " ")]
        prefix = given[-1] if given else ""
        raise UsageError(f"{prefix}{message} (fix the flags named here; {help_hint})") from err
    if remaining:
        unknown = next((a for a in remaining if a.startswith("-")), remaining[0])
        flag = unknown.split("=")[0]
        close = difflib.get_close_matches(flag, [o for a in parser._actions for o in a.option_strings], n=1)
        fix = f"did you mean {close[0]}?" if close else "check the spelling"
        raise UsageError(f"unrecognized argument {flag!r}; {fix} ({help_hint})")
    return tuple(parsed)
