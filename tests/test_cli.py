"""wikigpt/cli.py: config files first (several layer, a later one wins), then flags; unknown keys refused."""

import pytest

from wikigpt.cli import parse_args
from wikigpt.errors import UsageError
from wikigpt.train.arguments import WikiTrainingArguments


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_layered_config_files_then_flags(tmp_path):
    base = write(tmp_path / "recipe.yaml", "learning_rate: 2.0e-3\nnum_train_epochs: 12\nseed: 3\n")
    top = write(tmp_path / "student.yaml", "learning_rate: 1.4e-3\nnum_train_epochs: 15\n")
    (args,) = parse_args((WikiTrainingArguments,), [base, top, "--num_train_epochs", "9", "--output_dir", "o"])
    assert (args.learning_rate, args.num_train_epochs, args.seed) == (1.4e-3, 9, 3)


def test_an_unknown_key_in_a_later_file_names_that_file(tmp_path):
    base = write(tmp_path / "recipe.yaml", "learning_rate: 2.0e-3\n")
    top = write(tmp_path / "student.yaml", "learning_rat: 1.4e-3\n")
    with pytest.raises(UsageError) as err:
        parse_args((WikiTrainingArguments,), [base, top])
    assert str(err.value) == (f"config file {top!r} has unknown keys ['learning_rat']; remove them or fix the "
                              f"spelling (see --help for the accepted names)")
