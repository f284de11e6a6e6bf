"""Argument parsing shared by the scripts: HfArgumentParser, plus a YAML/JSON config file as first argument.

`python train.py configs/x.yaml --learning_rate 1e-3` reads the file's keys as defaults and lets the
command line override them; an unknown key in the file is an error that names it.
"""

import json
import os
import sys

import yaml
from transformers import HfArgumentParser

from .errors import UsageError

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


def parse_args(dataclass_types, argv: list[str] | None = None, description: str | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types, description=description)
    if argv and argv[0].endswith(CONFIG_EXTENSIONS) and not argv[0].startswith("-"):
        path = argv.pop(0)
        if not os.path.isfile(path):
            raise UsageError(f"config file {path!r} does not exist; pass the path of a .yaml or .json file")
        values = _read_config(path)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"config file {path!r} has unknown keys {unknown}; remove them or fix the spelling "
                             f"(see --help for the accepted names)")
        parser.set_defaults(**values)
        # Fields that are required on the command line are satisfied by the file.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    return parser.parse_args_into_dataclasses(args=argv)
