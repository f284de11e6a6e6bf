"""The recipes in configs/ (not configs/accelerate/): each parses with train.py's dataclasses and
trains a few CPU steps with micro-size overrides (tokenizer, files, width, block, steps), the rest
of the recipe as written; the one-command script recipes/cpu_30min.sh runs end to end at micro
size."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, TOKENIZER_DIR, WT2, write_lines
from runs import micro_files, train_in_process  # noqa: F401 - micro_files is a fixture

from wikigpt.train.run import parse_run_args

CPU = ["cpu/recipe.yaml"]
# Each entry is the config files of one run, layered left to right.
RECIPES = [[p.name] for p in sorted((REPO / "configs").glob("*.yaml"))] + [
    CPU,
    CPU + ["cpu/teacher.yaml"],
    CPU + ["cpu/student.yaml"],
]
# Switches this CPU-only machine cannot run (bf16/TF32 need CUDA; compiling takes ~45 s), the rest
# as written.
CPU_ONLY_FLAGS = {
    "gpu_fast.yaml": ["--bf16", "false", "--tf32", "false", "--torch_compile", "false"]
}
BUNDLED = (
    "data/wikitext-2-raw/wiki.valid.raw",
    None,
)  # train_file, validation_file: articles held out of train


def name_of(files: list[str]) -> str:
    return "+".join(files)


def parse(files: list[str], *flags):
    paths = [str(REPO / "configs" / f) for f in files]
    return parse_run_args([*paths, *CPU_ONLY_FLAGS.get(files[0], []), *flags])


@pytest.mark.parametrize("files", RECIPES, ids=name_of)
def test_recipe_parses(files, monkeypatch):
    # parsed as on a GPU machine: a CPU-only one with native bf16 sets use_cpu for bf16 autocast
    monkeypatch.setattr("wikigpt.train.precision.no_accelerator", lambda: False)
    model, data, levers, calibration, training = parse(files)
    name = name_of(files)
    if name == "quickstart.yaml" or name.startswith("cpu/"):
        # No flags needed: the bundled tokenizer and files, paths relative to the repository root.
        assert model.preset == "tiny" and model.model_name_or_path is None
        assert (REPO / model.tokenizer_name / "tokenizer.json").is_file()
        assert (data.train_file, data.validation_file) == BUNDLED and (
            REPO / data.train_file
        ).is_file()
        assert 0 < data.validation_split_percentage <= 10 and training.use_cpu is False
        # the recipe's levers: rare tokens by spelling, Muon, the chunked loss, eager attention
        assert (levers.rare_tokens_below, levers.rare_token_groups, levers.rare_input_dropout) == (
            4,
            "spelling",
            0.1,
        )
        assert (
            training.optim_matrices == "muon"
            and levers.chunked_loss_size
            and data.random_block_offset
        )
        assert model.attn_implementation == "eager" and training.max_train_minutes > 0
    else:
        assert (data.dataset_name, data.dataset_config_name) == (
            "wikitext",
            "wikitext-2-raw-v1",
        )  # Hub data
        assert not data.uses_local_files
    if name == "quickstart.yaml":  # minutes, not epochs; test perplexity at the end
        assert (
            training.max_train_minutes <= 4
            and data.test_file == "data/wikitext-2-raw/wiki.test.raw"
        )
        # the token offsets alone: the temperature adds nothing beside them out of sample
        assert calibration.calibrate_token_offsets and not calibration.calibrate_temperature
        assert training.output_dir == "out/quickstart"
    if name == "cpu/recipe.yaml":
        assert (
            data.test_file == "data/wikitext-2-raw/wiki.test.raw"
            and training.output_dir == "out/cpu-recipe"
        )
        assert data.validation_split_percentage == 5  # 4 of wiki.valid.raw's 60 articles
        assert calibration.calibrate_token_offsets and not calibration.calibrate_temperature
    if (
        name == "cpu/recipe.yaml+cpu/teacher.yaml"
    ):  # 9 epochs or 10.5 minutes, no calibration, no test pass
        assert (training.num_train_epochs, training.max_train_minutes) == (
            9,
            10.5,
        ) and data.test_file is None
        assert not (calibration.calibrate_temperature or calibration.calibrate_token_offsets)
        assert training.output_dir == "out/cpu-30min/teacher" and levers.distill_from is None
    if (
        name == "cpu/recipe.yaml+cpu/student.yaml"
    ):  # 12 layers, no dropout, the teacher's targets, 15 minutes
        assert (
            model.config_overrides
            == "n_layer=12,n_head=4,n_embd=128,resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0"
        )
        assert (levers.distill_from, levers.distill_share) == ("out/cpu-30min/teacher", 0.5)
        assert (training.learning_rate, training.num_train_epochs, training.max_train_minutes) == (
            1.4e-3,
            15,
            15,
        )
        assert calibration.calibrate_token_offsets and data.test_file is None
        assert not calibration.calibrate_temperature
        assert training.output_dir == "out/cpu-30min/student"
    if name == "wikitext_scratch.yaml":
        assert (
            data.block_size == 1024 and "n_positions=1024" in model.config_overrides
        )  # the protocol's eval blocks
        assert levers.rare_tokens_below == 3 and levers.rare_token_groups == "spelling"
        assert training.optim_matrices == "muon" and calibration.calibrate_token_offsets
    if name == "gpt2_finetune.yaml":
        assert model.model_name_or_path == "gpt2" and model.preset is None
        assert (
            training.learning_rate,
            training.num_train_epochs,
            training.per_device_train_batch_size,
        ) == (5e-5, 3, 8)


@pytest.fixture(scope="module")
def micro_test_file(tmp_path_factory):
    """A test slice apart from the micro validation slice (a validation file that is the test file
    is refused)."""
    return write_lines(
        tmp_path_factory.mktemp("test-slice") / "test.raw", WT2 / "wiki.test.raw", 40, 60
    )


def micro_flags(micro_files, out) -> list:
    return [
        "--tokenizer_name",
        TOKENIZER_DIR,
        "--train_file",
        micro_files["train"],
        "--validation_file",
        micro_files["validation"],
        "--block_size",
        32,
        "--per_device_train_batch_size",
        2,
        "--per_device_eval_batch_size",
        16,
        "--max_steps",
        4,
        "--eval_strategy",
        "steps",
        "--eval_steps",
        2,
        "--save_strategy",
        "steps",
        "--save_steps",
        2,
        "--logging_steps",
        1,
        "--output_dir",
        out,
        "--disable_tqdm",
        "true",
        "--report_to",
        "none",
        "--use_cpu",
        "true",
    ]


@pytest.mark.parametrize("files", [r for r in RECIPES if "cpu/student.yaml" not in r], ids=name_of)
def test_recipe_trains_a_few_cpu_steps(
    files, micro_files, micro_test_file, tiny_checkpoint, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    model, data, *_ = parse(files)
    # Micro size: the recipe's model is narrowed (a from-scratch one) or swapped for a tiny local
    # checkpoint.
    model_flags = (
        ["--model_name_or_path", tiny_checkpoint]
        if model.model_name_or_path
        else ["--config_overrides", "n_layer=1,n_head=2,n_embd=16"]
    )
    # A recipe's bundled test file is swapped for a micro test slice too.
    test_flags = ["--test_file", micro_test_file] if data.test_file else []
    argv = [
        *(REPO / "configs" / f for f in files),
        *CPU_ONLY_FLAGS.get(files[0], []),
        *model_flags,
        *test_flags,
        *micro_flags(micro_files, out),
    ]
    assert train_in_process(argv, monkeypatch) == 0
    results = json.loads(Path(out / "results.json").read_text())
    assert results["train"]["global_step"] == 4
    if data.test_file:  # test perplexity over every test block
        assert results["test"]["test_blocks"] == results["data"]["test"]["blocks"] > 0
    _, _, _, calibration, _ = parse(files)
    if (
        calibration.calibrate_token_offsets
    ):  # the offsets are fitted on the held-out split after the 4 steps
        assert (
            len(results["token_offsets"]["offsets"])
            == len(results["token_offsets"]["count_edges"])
            > 1
        )
    assert (out / "model.safetensors").exists()


def test_the_one_command_runs_at_micro_size(micro_files, micro_test_file, tmp_path):
    """recipes/cpu_30min.sh as written (teacher, student against it, eval.py), with micro-size flags
    appended."""
    out = tmp_path / "pair"
    flags = [str(a) for a in micro_flags(micro_files, "unused")]
    flags = flags[: flags.index("--output_dir")] + flags[flags.index("--output_dir") + 2 :]
    flags += ["--config_overrides", "n_layer=1,n_head=2,n_embd=16"]
    env = {**os.environ, "OUT": str(out), "TEST_FILE": str(micro_test_file), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", str(REPO / "recipes" / "cpu_30min.sh"), *flags],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    teacher = json.loads((out / "teacher" / "results.json").read_text())
    student = json.loads((out / "student" / "results.json").read_text())
    assert "test" not in teacher and "test" not in student  # eval.py alone scores the test split
    assert student["model"]["distilled_from"]["teacher"] == str(out / "teacher")
    report = json.loads((out / "test.json").read_text())
    assert report["dataset"] == str(micro_test_file) and report["split"] == "test"
    ppl = report["metrics"]["perplexity"]["value"]
    last = proc.stdout.strip().splitlines()[-1]
    assert (
        last.startswith(f"recipes/cpu_30min.sh: test perplexity {ppl:.1f} in ")
        and "(student budget 15.00" in last
    )
