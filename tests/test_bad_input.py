"""Bad input, all scripts: one `error:` line naming the argument and the fix, exit != 0, no
traceback, and the output directory exactly as it was.

One row per case in CASES: (script, name, argv builder, strings the error line must contain). Add
eval.py and generate.py rows to the same table: the argv builder gets a `Inputs` object with
ready-made bad inputs (files, folders, checkpoints) and the output dir, and returns the full command
line after the script name. Rows run in-process (fast); rows marked `subprocess=True` run the real
script to prove the exit status and that no traceback reaches the terminal.
"""

import importlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import run_script
from runs import micro_args, micro_files, train_in_process  # noqa: F401 - micro_files is a fixture
from transformers import GPT2Config, GPT2LMHeadModel

from wikigpt.errors import UsageError, run_main


class Inputs:
    """Bad (and good) inputs, created on first use in the test's tmp dir. `out` is the output dir
    under test."""

    def __init__(self, tmp: Path, files: dict, tiny_checkpoint: Path, trained_checkpoint: Path):
        self.tmp, self.files, self.tiny_checkpoint = tmp, files, tiny_checkpoint
        self._trained_checkpoint = trained_checkpoint
        self.out = tmp / "out"

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.tmp / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def checkpoint(self, name: str, vocab_size: int = 50257, pickle_only: bool = False) -> Path:
        path = self.tmp / name
        model = GPT2LMHeadModel(
            GPT2Config(n_layer=1, n_head=1, n_embd=8, n_positions=64, vocab_size=vocab_size)
        )
        if pickle_only:
            model.config.save_pretrained(path)
            torch.save(model.state_dict(), path / "pytorch_model.bin")
        else:
            model.save_pretrained(path)
        return path

    def run_with_checkpoint(self) -> Path:
        """`out` holding checkpoint-2 of a finished micro run (tests/runs.py micro_args)."""
        shutil.copytree(self._trained_checkpoint, self.out / "checkpoint-2")
        return self.out / "checkpoint-2"

    def eval(self, *extra) -> list:
        """An eval.py command line that works (tiny model, small slice, one method); `extra` flags
        override."""
        return [
            "--model",
            self.tiny_checkpoint,
            "--test_file",
            self.files["validation"],
            "--methods",
            "blocks",
            "--output_file",
            self.out / "report.json",
            *extra,
        ]

    def generate(self, *extra) -> list:
        """A generate.py command line that works; `extra` flags override."""
        return [
            "--model",
            self.tiny_checkpoint,
            "--prompt",
            "Hello",
            "--max_new_tokens",
            4,
            "--no_stream",
            "--output_file",
            self.out / "samples.jsonl",
            *extra,
        ]

    def train(self, *extra, drop=()) -> list:
        """A train.py command line that works; `extra` flags come last and so override; `drop`
        removes flags."""
        argv = micro_args(self.files, self.out, *extra, max_steps=2, save_steps=2)
        for flag in drop:
            i = argv.index(flag)
            del argv[i : i + 2]
        return argv


@dataclass
class Case:
    script: str  # "train.py", "eval.py", "generate.py"
    name: str
    argv: Callable[[Inputs], list]
    expect: tuple[
        str, ...
    ]  # every one must be in the error line: the argument, and a word of the fix
    subprocess: bool = False
    exit_code: int = 2


def truncated_checkpoint(i: Inputs):
    checkpoint = i.run_with_checkpoint()
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return i.train("--resume_from_checkpoint", "latest")


def search(i: Inputs, space: str, trials: int = 2) -> list:
    """A train.py --hp_search command line with `space` as its search-space file."""
    return i.train("--hp_search", trials, "--hp_space", i.file("space.yaml", space))


CASES = [
    # paths
    Case(
        "train.py",
        "missing_train_file",
        lambda i: i.train("--train_file", i.tmp / "nope.raw"),
        ("--train_file", "does not exist", "pass the path of an existing file"),
    ),
    Case(
        "train.py",
        "directory_as_train_file",
        lambda i: i.train("--train_file", i.tmp),
        ("--train_file", "is a directory", "pass a file"),
    ),
    Case(
        "train.py",
        "file_as_dataset_dir",
        lambda i: i.train("--dataset_dir", i.files["train"]),
        ("--dataset_dir", "is not a directory", "pass the folder"),
    ),
    Case(
        "train.py",
        "file_as_output_dir",
        lambda i: i.train("--output_dir", i.file("taken.txt", "x")),
        ("--output_dir", "is a file", "pass a directory"),
    ),
    Case(
        "train.py",
        "non_empty_output_dir",
        lambda i: (i.out.mkdir(), (i.out / "model.safetensors").write_text("precious"), i.train())[
            -1
        ],
        ("--output_dir", "is not empty", "--overwrite_output_dir", "--resume_from_checkpoint"),
    ),
    Case(
        "train.py",
        "unsupported_extension",
        lambda i: i.train("--train_file", i.file("notes.docx", "text")),
        ("--train_file", ".docx", "use one of"),
    ),
    Case(
        "train.py",
        "missing_tokenizer_dir",
        lambda i: i.train("--tokenizer_name", i.tmp / "no-tokenizer"),
        ("--tokenizer_name", "is not a local path", "pass --tokenizer_name DIR"),
    ),
    # file contents
    Case(
        "train.py",
        "empty_validation_file",
        lambda i: i.train("--validation_file", i.file("empty.raw", "")),
        ("--validation_file", "is empty", "pass a file with text"),
    ),
    Case(
        "train.py",
        "whitespace_only_train_file",
        lambda i: i.train("--train_file", i.file("blank.raw", "\n \n\n")),
        ("--train_file", "holds no text", "pass a file with text"),
    ),
    Case(
        "train.py",
        "non_utf8_train_file",
        lambda i: i.train(
            "--train_file", i.file("latin1.raw", "Caf\u00e9 au lait\n".encode("latin-1"))
        ),
        ("--train_file", "is not UTF-8 text", "iconv"),
        subprocess=True,
    ),
    Case(
        "train.py",
        "missing_text_column",
        lambda i: i.train("--train_file", i.file("rows.jsonl", '{"body": "hi"}\n')),
        ("--text_column 'text'", "pass --text_column with one of them"),
    ),
    Case(
        "train.py",
        "fewer_tokens_than_a_block",
        lambda i: i.train("--train_file", i.file("short.raw", "Hello.\n")),
        ("fewer than one block of --block_size 32", "a smaller --block_size"),
    ),
    # the test split chooses nothing
    Case(
        "train.py",
        "validation_file_is_the_test_file_and_calibrates",
        lambda i: i.train("--test_file", i.files["validation"], "--calibrate_temperature", "true"),
        (
            "--validation_file",
            "is the test split (it is --test_file's text)",
            "--calibrate_temperature would choose with it",
            "drop --validation_file",
        ),
    ),
    Case(
        "train.py",
        "validation_file_is_wikitext_test_and_stops_early",
        lambda i: i.train(
            "--validation_file",
            i.file("wiki.test.raw", i.files["validation"].read_bytes()),
            "--calibrate_token_offsets",
            "true",
        ),
        (
            "is the test split (it is WikiText's wiki.test.raw)",
            "--calibrate_token_offsets would choose",
        ),
    ),
    # types and ranges
    Case(
        "train.py",
        "learning_rate_not_a_number",
        lambda i: i.train("--learning_rate", "fast"),
        ("--learning_rate", "invalid float value: 'fast'", "--help"),
    ),
    Case(
        "train.py",
        "negative_learning_rate",
        lambda i: i.train("--learning_rate", "-0.1"),
        ("--learning_rate must be a positive number", "--learning_rate 6e-4"),
    ),
    Case(
        "train.py",
        "misspelled_flag",
        lambda i: i.train("--lerning_rate", "1e-3"),
        ("'--lerning_rate'", "did you mean --learning_rate?"),
    ),
    Case(
        "train.py",
        "unknown_strategy",
        lambda i: i.train("--eval_strategy", "weekly"),
        ("--eval_strategy weekly", "select one of ['no', 'steps', 'epoch']"),
    ),
    Case(
        "train.py",
        "rare_tokens_below_zero",
        lambda i: i.train("--rare_tokens_below", 0),
        ("--rare_tokens_below", "1 or more", "got 0"),
    ),
    Case(
        "train.py",
        "rare_input_dropout_one",
        lambda i: i.train("--rare_tokens_below", 2, "--rare_input_dropout", 1),
        ("--rare_input_dropout is the probability", "below 1 (e.g. 0.05); got 1.0"),
    ),
    Case(
        "train.py",
        "rare_input_dropout_without_rare_tokens",
        lambda i: i.train("--rare_input_dropout", 0.05),
        ("--rare_input_dropout replaces training input tokens", "add --rare_tokens_below K"),
    ),
    Case(
        "train.py",
        "rare_token_groups_without_rare_tokens",
        lambda i: i.train("--rare_token_groups", "spelling"),
        (
            "--rare_token_groups spelling groups the tokens --rare_tokens_below ties",
            "add --rare_tokens_below K",
        ),
    ),
    Case(
        "train.py",
        "rare_token_groups_unknown",
        lambda i: i.train("--rare_tokens_below", 2, "--rare_token_groups", "case"),
        ("--rare_token_groups", "invalid choice: 'case'"),
    ),
    Case(
        "train.py",
        "rare_tokens_with_a_checkpoint",
        lambda i: i.train(
            "--rare_tokens_below",
            1,
            "--model_name_or_path",
            i.tiny_checkpoint,
            drop=["--preset", "--config_overrides"],
        ),
        ("--rare_tokens_below", "from scratch", "drop --rare_tokens_below"),
    ),
    Case(
        "train.py",
        "block_size_zero",
        lambda i: i.train("--block_size", 0),
        (
            "--block_size must be between 1 and the model's n_positions (256)",
            "Pass --block_size 256 or less",
        ),
    ),
    Case(
        "train.py",
        "block_size_over_context",
        lambda i: i.train("--block_size", 257),
        ("--block_size", "got 257", "Pass --block_size 256 or less"),
    ),
    Case(
        "train.py",
        "validation_percentage_over_100",
        lambda i: i.train("--validation_split_percentage", 150, drop=["--validation_file"]),
        ("--validation_split_percentage must be in (0, 100)", "got 150.0"),
    ),
    Case("train.py", "fp16_on_cpu", lambda i: i.train("--fp16"), ("--fp16 needs a GPU", "--bf16")),
    Case(
        "train.py",
        "ema_decay_over_one",
        lambda i: i.train("--ema_decay", 1.5),
        ("--ema_decay must be between 0 and 1", "got 1.5"),
    ),
    Case(
        "train.py",
        "ema_and_swa_together",
        lambda i: i.train("--ema_decay", 0.99, "--swa_start", 0.5),
        ("--ema_decay 0.99 and --swa_start 0.5", "pass only one of them"),
    ),
    Case(
        "train.py",
        "time_budget_zero",
        lambda i: i.train("--max_train_minutes", 0),
        ("--max_train_minutes must be a positive number of minutes", "got 0"),
    ),
    Case(
        "train.py",
        "time_budget_with_plateau_schedule",
        lambda i: i.train("--max_train_minutes", 5, "--lr_scheduler_type", "reduce_lr_on_plateau"),
        ("--max_train_minutes plans a step schedule", "--lr_scheduler_type cosine"),
    ),
    Case(
        "train.py",
        "wsd_without_decay_length",
        lambda i: i.train("--lr_scheduler_type", "warmup_stable_decay"),
        (
            "--lr_scheduler_type warmup_stable_decay needs the length of its decay",
            "num_decay_steps",
        ),
    ),
    Case(
        "train.py",
        "wsd_decay_fraction_over_one",
        lambda i: i.train(
            "--lr_scheduler_type",
            "warmup_stable_decay",
            "--lr_scheduler_kwargs",
            '{"num_decay_steps": 1.5}',
        ),
        (
            "--lr_scheduler_kwargs num_decay_steps must be a fraction of the steps in (0, 1]",
            "got 1.5",
        ),
    ),
    Case(
        "train.py",
        "unknown_matrix_optimizer",
        lambda i: i.train("--optim_matrices", "sgd"),
        ("--optim_matrices", "invalid choice: 'sgd'"),
    ),
    # model and config
    Case(
        "train.py",
        "unknown_preset",
        lambda i: i.train("--preset", "gpt5"),
        ("--preset 'gpt5'", "choose one of"),
    ),
    Case(
        "train.py",
        "unknown_override_key",
        lambda i: i.train("--config_overrides", "n_layers=2"),
        ("--config_overrides key 'n_layers'", "check the spelling"),
    ),
    Case(
        "train.py",
        "config_file_unknown_keys",
        lambda i: [i.file("recipe.yaml", "learning_rat: 0.1\n"), *i.train()],
        ("recipe.yaml", "unknown keys ['learning_rat']", "fix the spelling"),
    ),
    Case(
        "train.py",
        "config_file_bad_syntax",
        lambda i: [i.file("broken.yaml", "learning_rate: [1e-3\n"), *i.train()],
        ("broken.yaml", "could not be read", "fix its syntax"),
    ),
    Case(
        "train.py",
        "file_as_checkpoint",
        lambda i: i.train(
            "--model_name_or_path", i.files["train"], drop=["--preset", "--config_overrides"]
        ),
        ("--model_name_or_path", "is a file", "pass the checkpoint folder"),
    ),
    Case(
        "train.py",
        "pickle_only_checkpoint",
        lambda i: i.train(
            "--model_name_or_path",
            i.checkpoint("pickled", pickle_only=True),
            drop=["--preset", "--config_overrides"],
        ),
        ("--model_name_or_path", "only pickle weights", "--allow_pickle"),
    ),
    Case(
        "train.py",
        "checkpoint_with_smaller_vocabulary",
        lambda i: i.train(
            "--model_name_or_path",
            i.checkpoint("small-vocab", vocab_size=1000),
            drop=["--preset", "--config_overrides"],
        ),
        (
            "--tokenizer_name has 50257 tokens but the checkpoint's vocabulary has 1000",
            "use the checkpoint's own",
        ),
    ),
    # resume
    Case(
        "train.py",
        "resume_path_missing",
        lambda i: i.train("--resume_from_checkpoint", i.tmp / "checkpoint-9"),
        ("--resume_from_checkpoint", "does not exist", "'latest'"),
    ),
    Case(
        "train.py",
        "resume_latest_without_checkpoints",
        lambda i: i.train("--resume_from_checkpoint"),
        (
            "--resume_from_checkpoint latest",
            "has no checkpoint-N folders",
            "drop --resume_from_checkpoint",
        ),
    ),
    Case(
        "train.py",
        "resume_from_truncated_checkpoint",
        truncated_checkpoint,
        (
            "--resume_from_checkpoint latest: no complete checkpoint",
            "model.safetensors is truncated",
            "pass a complete checkpoint folder",
        ),
        subprocess=True,
    ),
    Case(
        "train.py",
        "resume_from_elsewhere_into_non_empty_output_dir",
        lambda i: (
            i.out.mkdir(),
            (i.out / "model.safetensors").write_text("precious"),
            i.train("--resume_from_checkpoint", i._trained_checkpoint),
        )[-1],
        (
            "--output_dir",
            "is not empty and --resume_from_checkpoint",
            "is not one of its checkpoints",
            "--overwrite_output_dir",
        ),
    ),
    Case(
        "train.py",
        "resume_another_architecture",
        lambda i: i.train(
            "--resume_from_checkpoint", i.run_with_checkpoint(), "--config_overrides", "n_embd=32"
        ),
        (
            "--resume_from_checkpoint",
            "holds a different model (n_embd 16 there, 32 here)",
            "--config_overrides",
        ),
    ),
    # hyper-parameter search: the whole space is checked before anything trains
    Case(
        "train.py",
        "search_space_unknown_key",
        lambda i: search(i, "lerning_rate: {type: float, low: 0.001, high: 0.01}\n"),
        ("--hp_space", "lerning_rate is not a searchable key", "did you mean learning_rate?"),
    ),
    Case(
        "train.py",
        "search_space_low_above_high",
        lambda i: search(i, "weight_decay: {type: float, low: 0.2, high: 0.1}\n"),
        ("--hp_space", "weight_decay has low 0.2 above high 0.1; swap them"),
    ),
    Case(
        "train.py",
        "search_space_empty_range",
        lambda i: search(i, "n_layer: {type: int, low: 2, high: 2}\n"),
        ("--hp_space", "n_layer has an empty range (low = high = 2)", "widen it"),
    ),
    Case(
        "train.py",
        "search_space_empty_choices",
        lambda i: search(i, "lr_scheduler_type: {type: categorical, choices: []}\n"),
        ("--hp_space", "lr_scheduler_type has empty choices; list at least one value"),
    ),
    Case(
        "train.py",
        "search_space_unknown_schedule",
        lambda i: search(i, "lr_scheduler_type: {type: categorical, choices: [cosine, cosin]}\n"),
        ("--hp_space", "lr_scheduler_type choice 'cosin' is not one of", "fix the entry"),
    ),
    Case(
        "train.py",
        "search_space_log_from_zero",
        lambda i: search(i, "learning_rate: {type: float, low: 0, high: 0.01, log: true}\n"),
        ("--hp_space", "learning_rate has log: true with low 0; a log range needs low > 0"),
    ),
    Case(
        "train.py",
        "search_space_float_for_int_key",
        lambda i: search(i, "n_layer: {type: float, low: 1, high: 4}\n"),
        ("--hp_space", "n_layer takes whole numbers (int); use type: int"),
    ),
    Case(
        "train.py",
        "search_space_block_size_over_context",
        lambda i: search(i, "block_size: {type: categorical, choices: [32, 512]}\n"),
        (
            "--hp_space",
            "block_size reaches 512, more than the model's n_positions (256)",
            "at or below 256",
        ),
    ),
    Case(
        "train.py",
        "search_space_width_not_divisible_by_heads",
        lambda i: search(i, "n_embd: {type: int, low: 16, high: 24}\n"),
        (
            "--hp_space",
            "n_embd must be divisible by n_head, but n_embd 17 with n_head 2 is not",
            "categorical",
        ),
    ),
    Case(
        "train.py",
        "search_space_not_a_range",
        lambda i: search(i, "learning_rate: 0.001\n"),
        (
            "--hp_space",
            "learning_rate must be a mapping with a type",
            "{type: float, low: 0.0, high: 0.2}",
        ),
    ),
    Case(
        "train.py",
        "search_space_missing_file",
        lambda i: i.train("--hp_search", 2, "--hp_space", i.tmp / "nope.yaml"),
        ("--hp_space", "does not exist", "configs/search_spaces/cpu.yaml"),
    ),
    Case(
        "train.py",
        "search_without_space",
        lambda i: i.train("--hp_search", 2),
        ("--hp_search needs --hp_space FILE",),
    ),
    Case(
        "train.py",
        "search_zero_trials",
        lambda i: search(i, "weight_decay: {type: float, low: 0, high: 0.2}\n", trials=0),
        ("--hp_search must be at least 1", "got 0"),
        subprocess=True,
    ),
    # eval.py
    Case(
        "eval.py",
        "missing_model_dir",
        lambda i: i.eval("--model", i.tmp / "no-model"),
        ("--model", "does not exist", "pass a checkpoint folder"),
    ),
    Case(
        "eval.py",
        "model_without_tokenizer",
        lambda i: i.eval("--model", i.checkpoint("no-tokenizer")),
        ("--model", "holds no tokenizer files", "pass --tokenizer_name DIR"),
        subprocess=True,
    ),
    Case(
        "eval.py",
        "stride_zero",
        lambda i: i.eval("--methods", "sliding_window", "--stride", 0),
        ("--stride must be between 1 and the model's context (128)", "got 0"),
    ),
    Case(
        "eval.py",
        "stride_over_context",
        lambda i: i.eval("--methods", "sliding_window", "--stride", 129),
        ("--stride must be between 1 and the model's context (128)", "Pass --stride 64"),
    ),
    Case(
        "eval.py",
        "empty_test_file",
        lambda i: i.eval("--test_file", i.file("empty.raw", "")),
        ("--test_file", "is empty", "pass a file with text"),
    ),
    Case(
        "eval.py",
        "unknown_split",
        lambda i: i.eval("--split", "dev"),
        ("--split 'dev' is unknown", "choose one of train, validation, test"),
    ),
    Case(
        "eval.py",
        "split_not_given",
        lambda i: i.eval("--split", "validation"),
        ("no validation split", "pass --validation_file"),
    ),
    Case(
        "eval.py",
        "unknown_method",
        lambda i: i.eval("--methods", "blocks,bleu"),
        ("--methods", "['bleu']", "choose from blocks, sliding_window, documents"),
    ),
    Case(
        "eval.py",
        "detokenize_is_for_training",
        lambda i: i.eval("--detokenize"),
        ("--detokenize is a train.py flag", "drop --detokenize"),
    ),
    Case(
        "eval.py",
        "batch_size_zero",
        lambda i: i.eval("--batch_size", 0),
        ("--batch_size must be at least 1",),
    ),
    Case(
        "eval.py",
        "unknown_dtype",
        lambda i: i.eval("--dtype", "float8"),
        ("--dtype 'float8' is unknown", "choose"),
    ),
    Case(
        "eval.py",
        "pickle_only_model",
        lambda i: i.eval(
            "--model",
            i.checkpoint("pickled", pickle_only=True),
            "--tokenizer_name",
            i.tiny_checkpoint,
        ),
        ("--model", "only pickle weights", "--allow_pickle"),
    ),
    Case(
        "eval.py",
        "tokenizer_larger_than_model",
        lambda i: i.eval(
            "--model", i.checkpoint("small", vocab_size=1000), "--tokenizer_name", i.tiny_checkpoint
        ),
        (
            "--tokenizer_name has 50257 tokens but the model's vocabulary has 1000",
            "pass the tokenizer",
        ),
    ),
    # generate.py
    Case(
        "generate.py",
        "missing_model_dir",
        lambda i: i.generate("--model", i.tmp / "no-model"),
        ("--model", "does not exist"),
    ),
    Case(
        "generate.py",
        "zero_temperature_when_sampling",
        lambda i: i.generate("--do_sample", "--temperature", 0),
        ("--temperature 0", "must be > 0 when sampling", "--greedy"),
    ),
    Case(
        "generate.py",
        "top_p_over_one",
        lambda i: i.generate("--top_p", 1.5),
        ("--top_p 1.5", "must be in (0, 1]"),
    ),
    Case(
        "generate.py",
        "seed_out_of_range",
        lambda i: i.generate("--seed", -1),
        ("--seed -1", "must be in [0, 4294967295]"),
    ),
    Case(
        "generate.py",
        "no_new_tokens",
        lambda i: i.generate("--max_new_tokens", 0),
        ("--max_new_tokens 0", "must be >= 1"),
    ),
    Case(
        "generate.py",
        "more_sequences_than_beams",
        lambda i: i.generate("--num_beams", 2, "--num_return_sequences", 3),
        ("--num_return_sequences 3 is more than --num_beams 2", "raise --num_beams"),
    ),
    Case(
        "generate.py",
        "missing_prompt_file",
        lambda i: i.generate("--prompt_file", i.tmp / "prompts.txt"),
        ("--prompt_file", "does not exist"),
    ),
    Case(
        "generate.py",
        "existing_output_file",
        lambda i: (i.out.mkdir(), (i.out / "samples.jsonl").write_text("precious"), i.generate())[
            -1
        ],
        ("--output_file", "already exists", "nothing is overwritten"),
        subprocess=True,
    ),
]


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, micro_files):
    out = tmp_path_factory.mktemp("trained") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert (
            train_in_process(micro_args(micro_files, out, max_steps=2, save_steps=2), monkeypatch)
            == 0
        )
    return out / "checkpoint-2"


@pytest.fixture
def inputs(tmp_path, micro_files, tiny_checkpoint, trained_checkpoint):
    return Inputs(tmp_path, micro_files, tiny_checkpoint, trained_checkpoint)


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its size and mtime: equal snapshots = nothing written, removed
    or touched."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def run_in_process(script: str, argv: list, monkeypatch, capsys) -> tuple[int, str]:
    main = importlib.import_module(script.removesuffix(".py")).main
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.script}:{c.name}")
def test_bad_input(case, inputs, monkeypatch, capsys):
    argv = case.argv(inputs)
    before = snapshot(inputs.out)
    if case.subprocess:
        proc = run_script(case.script, *argv)
        code, stderr = proc.returncode, proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
    else:
        code, stderr = run_in_process(case.script, argv, monkeypatch, capsys)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == case.exit_code, stderr[-2000:]
    assert len(errors) == 1, stderr[-2000:]
    for text in case.expect:
        assert text in errors[0], errors[0]
    assert snapshot(inputs.out) == before


def test_debug_shows_the_traceback(inputs, monkeypatch):
    monkeypatch.setattr(
        sys, "argv", ["train.py", *map(str, inputs.train("--block_size", 0)), "--debug"]
    )
    with pytest.raises(UsageError, match="--block_size must be between 1"):
        run_main(importlib.import_module("train").main)
