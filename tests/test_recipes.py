"""The recipes in configs/*.yaml (not configs/accelerate/): each parses with train.py's dataclasses and trains a
few CPU steps with micro-size overrides (tokenizer, files, width, block, steps), the rest of the recipe as written."""

import json
from pathlib import Path

import pytest
from conftest import REPO, TOKENIZER_DIR
from runs import micro_files, train_in_process  # noqa: F401 - micro_files is a fixture

from wikigpt.cli import parse_args
from wikigpt.data.blocks import DataArguments
from wikigpt.model import ModelArguments
from wikigpt.train.arguments import WikiTrainingArguments

RECIPES = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
# Switches this CPU-only machine cannot run (bf16/TF32 need CUDA; compiling takes ~45 s), the rest as written.
CPU_ONLY_FLAGS = {"gpu_fast.yaml": ["--bf16", "false", "--tf32", "false", "--torch_compile", "false"]}


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_parses(name, monkeypatch):
    # parsed as on a machine with a GPU: a CPU-only one with native bf16 sets use_cpu for bf16 autocast
    monkeypatch.setattr("wikigpt.train.precision.no_accelerator", lambda: False)
    model, data, training = parse_args((ModelArguments, DataArguments, WikiTrainingArguments),
                                       [str(REPO / "configs" / name), *CPU_ONLY_FLAGS.get(name, [])])
    if name == "quickstart.yaml":
        # No flags needed: the bundled tokenizer and files, paths relative to the repository root; training on
        # the validation file with a held-out slice, test perplexity on the test file.
        assert model.preset == "tiny" and model.model_name_or_path is None
        assert (REPO / model.tokenizer_name / "tokenizer.json").is_file()
        assert (data.train_file, data.validation_file, data.test_file) == (
            "data/wikitext-2-raw/wiki.valid.raw", None, "data/wikitext-2-raw/wiki.test.raw")
        assert (REPO / data.train_file).is_file() and (REPO / data.test_file).is_file()
        assert 0 < data.validation_split_percentage < 100 and training.output_dir == "out/quickstart"
        assert training.use_cpu is False  # a GPU, when there is one, is used
    else:
        assert (data.dataset_name, data.dataset_config_name) == ("wikitext", "wikitext-2-raw-v1")  # Hub data
        assert not data.uses_local_files
    if name.startswith("wikitext_scratch"):
        assert model.preset and model.model_name_or_path is None
        # new block boundaries every epoch, whole articles held out, a cosine planned for the time budget
        assert data.random_block_offset and 0 < data.validation_split_percentage <= 10 and data.block_size >= 256
        assert training.max_train_minutes > 0 and str(training.lr_scheduler_type).endswith("COSINE")
        assert model.tied_token_groups == "spelling"  # rare tokens share six rows by spelling
        assert model.tied_input_dropout == 0.1  # and 10% of the training inputs read their group's row
        assert training.optim_matrices == "muon"
        # after training: a temperature, then one logit offset per training-count class, from the held-out split
        assert training.calibrate_temperature and training.calibrate_token_offsets
    if name == "wikitext_scratch_cpu.yaml":
        assert data.validation_split_percentage == 5  # 4 of wiki.valid.raw's 60 articles
        assert model.tie_tokens_below == 5  # tokens seen at most four times share those rows
    if name == "wikitext_scratch.yaml":
        assert data.block_size == 1024 and "n_positions=1024" in model.config_overrides  # the protocol's eval blocks
        assert model.tie_tokens_below == 3
    if name == "gpt2_finetune.yaml":
        assert model.model_name_or_path == "gpt2" and model.preset is None
        assert (training.learning_rate, training.num_train_epochs, training.per_device_train_batch_size) == (5e-5, 3, 8)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_a_few_cpu_steps(name, micro_files, tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = REPO / "configs" / name
    model, *_ = parse_args((ModelArguments, DataArguments, WikiTrainingArguments),
                           [str(config), *CPU_ONLY_FLAGS.get(name, [])])
    # Micro size: the recipe's model is narrowed (a from-scratch one) or swapped for a tiny local checkpoint.
    model_flags = (["--model_name_or_path", tiny_checkpoint] if model.model_name_or_path
                   else ["--config_overrides", "n_layer=1,n_head=2,n_embd=16"])
    # The quick start's full test file is swapped for the micro validation slice too.
    test_flags = ["--test_file", micro_files["validation"]] if name == "quickstart.yaml" else []
    argv = [config, *CPU_ONLY_FLAGS.get(name, []), *model_flags, *test_flags, "--tokenizer_name", TOKENIZER_DIR,
            "--train_file", micro_files["train"], "--validation_file", micro_files["validation"],
            "--block_size", 32, "--per_device_train_batch_size", 2, "--per_device_eval_batch_size", 16,
            "--max_steps", 4, "--eval_strategy", "steps", "--eval_steps", 2, "--save_strategy", "steps",
            "--save_steps", 2, "--logging_steps", 1, "--output_dir", out, "--disable_tqdm", "true",
            "--report_to", "none", "--use_cpu", "true"]
    assert train_in_process(argv, monkeypatch) == 0
    results = json.loads(Path(out / "results.json").read_text())
    assert results["train"]["global_step"] == 4
    if name == "quickstart.yaml":  # the quick start reports test perplexity over every test block
        assert results["test"]["test_blocks"] == results["data"]["test"]["blocks"] > 0
    if name.startswith("wikitext_scratch"):  # the offsets are fitted on the held-out split after the 4 steps
        assert len(results["token_offsets"]["offsets"]) == len(results["token_offsets"]["count_edges"]) == 9
    assert (out / "model.safetensors").exists()
