"""Argument parsing shared by the scripts: HfArgumentParser, plus a YAML/JSON config file as first
argument.

`python train.py configs/x.yaml --learning_rate 1e-3` reads the file's keys as defaults and lets the
command line override them; an unknown key in the file is an error that names it. Several files may
come first (`configs/cpu/recipe.yaml configs/cpu/student.yaml`): a later file's keys override an
earlier one's. Renamed flags (OLD_NAMES) keep working under their old names, on the command line and
as config-file keys, with one warning line per old name. A removed flag (REMOVED) given the value
that is now how wikigpt works is dropped with one warning line; any other value is an error that
names the commit to reproduce the old run from.
"""

import argparse
import copy
import difflib
import json
import logging
import os
import sys

import yaml
from transformers import HfArgumentParser

from wikigpt.errors import UsageError

CONFIG_EXTENSIONS = (".yaml", ".yml", ".json")
# Renamed flags, old name -> new name: the old flag is an alias of the new one (old_flags), an old
# config-file key is read as the new one (_read_config), and either logs OLD_NAME_NOTICE once.
OLD_NAMES = {
    "tie_tokens_below": "rare_tokens_below",
    "tied_token_groups": "rare_token_groups",
    "tied_input_dropout": "rare_input_dropout",
}
OLD_NAME_NOTICE = "--{old} is now --{new}; the old name still works"
# Removed flags, name -> (the value that is now how wikigpt works, the last commit that had it)
REMOVED = {"calibrate_class_shares": ("held_out", "11728d8")}
REMOVED_NOTICE = "--{name} is gone; {kept} is how wikigpt works now, so the setting is ignored"
REMOVED_ERROR = (
    "--{name} {value} was removed; drop it, or reproduce the old run at commit {commit} "
    "(git checkout {commit})"
)

logger = logging.getLogger("wikigpt.cli")


def old_flags(new: str) -> list[str]:
    """The old spellings of flag `new` (field metadata "aliases" for HfArgumentParser), as the old
    flag had them."""
    return [
        flag
        for old, name in OLD_NAMES.items()
        if name == new
        for flag in (f"--{old}", f"--{old.replace('_', '-')}")
    ]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's lines and names a renamed flag by its new name only (the old
    name, in OLD_NAMES, still parses)."""

    def _format_action_invocation(self, action):
        kept = [
            o for o in action.option_strings if o.lstrip("-").replace("-", "_") not in OLD_NAMES
        ]
        if kept != action.option_strings:
            action = copy.copy(action)
            action.option_strings = kept
        return super()._format_action_invocation(action)


def _rename_old_keys(values: dict, path: str, renamed: list | None) -> dict:
    out = {}
    for key, value in values.items():
        new = OLD_NAMES.get(key, key)
        if new != key:
            if new in values:
                raise UsageError(
                    f"config file {path!r} sets both {key} and {new}, one setting under its old "
                    f"and new name; keep {new}"
                )
            if renamed is not None:
                renamed.append(key)
        out[new] = value
    return out


def _read_config(path: str, renamed: list | None = None) -> dict:
    """A config file's mapping, old key names (OLD_NAMES) read as the new ones and appended to
    `renamed`."""
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise UsageError(
            f"config file {path!r} could not be read ({str(err).splitlines()[0]}); fix its syntax"
        ) from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"config file {path!r} must hold a mapping of argument names to values")
    for name in REMOVED.keys() & values.keys():
        drop_removed(name, values.pop(name))
    return _rename_old_keys(values, path, renamed)


def read_config(path: str, parser: HfArgumentParser, renamed: list | None = None) -> dict:
    """One config file's keys, each checked against the parser's argument names."""
    values = _read_config(path, renamed)
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(
            f"config file {path!r} has unknown keys {unknown}; remove them or fix the spelling "
            f"(see --help for the accepted names)"
        )
    return values


def drop_removed(name: str, value) -> None:
    """One warning line for a removed flag given the value wikigpt now always uses; else
    UsageError."""
    kept, commit = REMOVED[name]
    if value != kept:
        raise UsageError(REMOVED_ERROR.format(name=name, value=value, commit=commit))
    logger.warning(REMOVED_NOTICE.format(name=name, kept=kept))


def removed_flags_dropped(argv: list[str]) -> list[str]:
    """`argv` without the REMOVED flags (--name value, --name=value, dashes or underscores), each
    checked by drop_removed."""
    kept, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, equals, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if not arg.startswith("--") or name not in REMOVED:
            kept.append(arg)
            i += 1
            continue
        if not equals:
            value = argv[i + 1] if i + 1 < len(argv) else None
            i += 1
        drop_removed(name, value)
        i += 1
    return kept


def old_names_given(argv: list[str]) -> list[str]:
    """The OLD_NAMES keys among the flags of a command line (--tie_tokens_below,
    --tie-tokens-below=2, ...)."""
    names = (arg[2:].split("=")[0].replace("-", "_") for arg in argv if arg.startswith("--"))
    return [name for name in names if name in OLD_NAMES]


def parse_args(dataclass_types, argv: list[str] | None = None, description: str | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    # usage: the groups of --help list every flag; a usage line listing them too would be longer
    # than they are
    parser = HfArgumentParser(
        dataclass_types,
        description=description,
        formatter_class=HelpFormatter,
        usage="%(prog)s [CONFIG.yaml ...] [--FLAG VALUE ...]",
    )
    values, paths, renamed = {}, [], []
    while argv and argv[0].endswith(CONFIG_EXTENSIONS) and not argv[0].startswith("-"):
        path = argv.pop(0)
        if not os.path.isfile(path):
            raise UsageError(
                f"config file {path!r} does not exist; pass the path of a .yaml or .json file"
            )
        values.update(read_config(path, parser, renamed))
        paths.append(path)
    argv = removed_flags_dropped(argv)
    renamed += old_names_given(argv)
    known = {action.dest for action in parser._actions}
    for old in dict.fromkeys(renamed):  # one line per old name, however often it was given
        if OLD_NAMES[old] in known:
            logger.warning(OLD_NAME_NOTICE.format(old=old, new=OLD_NAMES[old]))
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
        *parsed, remaining = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True
        )
    except (
        ValueError
    ) as err:  # TrainingArguments.__post_init__ rejects some values and flag combinations
        message = " ".join(str(err).split())
        # "weekly is not a valid IntervalStrategy": name the flag that was given the value.
        given = [
            f"{argv[i - 1]} {argv[i]}: "
            for i in range(1, len(argv))
            if argv[i - 1].startswith("--") and argv[i] and message.startswith(argv[i] + " ")
        ]
        prefix = given[-1] if given else ""
        raise UsageError(f"{prefix}{message} (fix the flags named here; {help_hint})") from err
    if remaining:
        unknown = next((a for a in remaining if a.startswith("-")), remaining[0])
        flag = unknown.split("=")[0]
        close = difflib.get_close_matches(
            flag, [o for a in parser._actions for o in a.option_strings], n=1
        )
        fix = f"did you mean {close[0]}?" if close else "check the spelling"
        raise UsageError(f"unrecognized argument {flag!r}; {fix} ({help_hint})")
    return tuple(parsed)
