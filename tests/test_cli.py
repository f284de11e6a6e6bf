"""wikigpt/cli.py: config files first (several layer, a later one wins), then flags; unknown keys
refused; renamed flags keep their old names (OLD_NAMES) with one notice each; removed flags
(REMOVED) are dropped with a notice, or refused with the commit that had them."""

import dataclasses

import pytest

from wikigpt.calibration.arguments import CalibrationArguments
from wikigpt.cli import OLD_NAMES, parse_args
from wikigpt.errors import UsageError
from wikigpt.objectives.arguments import LeverArguments
from wikigpt.train.arguments import WikiTrainingArguments


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_layered_config_files_then_flags(tmp_path):
    base = write(tmp_path / "recipe.yaml", "learning_rate: 2.0e-3\nnum_train_epochs: 12\nseed: 3\n")
    top = write(tmp_path / "student.yaml", "learning_rate: 1.4e-3\nnum_train_epochs: 15\n")
    (args,) = parse_args(
        (WikiTrainingArguments,), [base, top, "--num_train_epochs", "9", "--output_dir", "o"]
    )
    assert (args.learning_rate, args.num_train_epochs, args.seed) == (1.4e-3, 9, 3)


def test_an_unknown_key_in_a_later_file_names_that_file(tmp_path):
    base = write(tmp_path / "recipe.yaml", "learning_rate: 2.0e-3\n")
    top = write(tmp_path / "student.yaml", "learning_rat: 1.4e-3\n")
    with pytest.raises(UsageError) as err:
        parse_args((WikiTrainingArguments,), [base, top])
    assert str(err.value) == (
        f"config file {top!r} has unknown keys ['learning_rat']; remove them or fix the "
        f"spelling (see --help for the accepted names)"
    )


# ---- renamed flags (OLD_NAMES): the old name still works, with one notice line ----

NOTICE = "--tie_tokens_below is now --rare_tokens_below; the old name still works"


def notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "wikigpt.cli"]


@pytest.mark.parametrize("old", [["--tie_tokens_below", "3"], ["--tie-tokens-below=3"]])
def test_an_old_flag_parses_as_the_new_one_with_one_notice(old, caplog):
    (new,) = parse_args((LeverArguments,), ["--rare_tokens_below", "3"])
    assert notices(caplog) == []
    (levers,) = parse_args((LeverArguments,), [*old, "--tied_input_dropout", "0.1", *old])
    assert (
        levers == LeverArguments(rare_tokens_below=3, rare_input_dropout=0.1)
        and new.rare_tokens_below == 3
    )
    assert notices(caplog) == [
        NOTICE,
        "--tied_input_dropout is now --rare_input_dropout; the old name still works",
    ]
    assert [r.levelname for r in caplog.records if r.name == "wikigpt.cli"] == [
        "WARNING",
        "WARNING",
    ]


def test_an_old_config_key_loads_to_the_new_field_with_one_notice(tmp_path, caplog):
    config = write(tmp_path / "recipe.yaml", "tie_tokens_below: 5\ntied_token_groups: spelling\n")
    (levers,) = parse_args((LeverArguments,), [config, "--tie_tokens_below", "4"])
    assert (levers.rare_tokens_below, levers.rare_token_groups) == (
        4,
        "spelling",
    )  # the command line wins
    assert notices(caplog) == [
        NOTICE,
        "--tied_token_groups is now --rare_token_groups; the old name still works",
    ]


def test_a_config_file_with_both_names_of_a_flag_is_refused(tmp_path):
    config = write(tmp_path / "recipe.yaml", "tie_tokens_below: 5\nrare_tokens_below: 3\n")
    with pytest.raises(UsageError) as err:
        parse_args((LeverArguments,), [config])
    assert str(err.value) == (
        f"config file {config!r} sets both tie_tokens_below and rare_tokens_below, one "
        f"setting under its old and new name; keep rare_tokens_below"
    )


def test_every_old_name_is_an_alias_of_its_new_flag():
    fields = {f.name: f for f in dataclasses.fields(LeverArguments)}
    for old, new in OLD_NAMES.items():
        assert f"--{old}" in fields[new].metadata["aliases"]


# ---- removed flags (REMOVED): the value wikigpt now always uses is dropped with one notice ----

REMOVED_NOTICE = (
    "--calibrate_class_shares is gone; held_out is how wikigpt works now, so the setting is ignored"
)


@pytest.mark.parametrize(
    "given",
    [
        ["--calibrate_class_shares", "held_out"],
        ["--calibrate-class-shares=held_out"],
        ["CONFIG"],
    ],
)
def test_a_removed_flag_with_the_kept_value_is_dropped_with_one_notice(given, tmp_path, caplog):
    config = write(
        tmp_path / "old.yaml", "calibrate_class_shares: held_out\ncalibrate_token_offsets: true\n"
    )
    argv = [config] if given == ["CONFIG"] else ["--calibrate_token_offsets", "true", *given]
    (calibration,) = parse_args((CalibrationArguments,), argv)
    assert calibration == CalibrationArguments(calibrate_token_offsets=True)
    assert notices(caplog) == [REMOVED_NOTICE]


@pytest.mark.parametrize("config", [False, True])
def test_a_removed_flag_with_another_value_names_the_commit_that_had_it(config, tmp_path):
    argv = ["--calibrate_class_shares", "new_articles"]
    if config:
        argv = [write(tmp_path / "old.yaml", "calibrate_class_shares: new_articles\n")]
    with pytest.raises(UsageError) as err:
        parse_args((CalibrationArguments,), argv)
    assert str(err.value) == (
        "--calibrate_class_shares new_articles was removed; drop it, or reproduce the old run "
        "at commit 11728d8 (git checkout 11728d8)"
    )
