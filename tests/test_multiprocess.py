"""train.py under `accelerate launch` with 2 CPU processes (gloo) against 1 process at the same
global batch.

accelerate 1.15's `--cpu` flag starts a single process unless an MPI launcher is configured, so two
CPU processes are started the way a GPU run is (`--multi_gpu`: torchrun) and train.py's `--use_cpu`
makes them pick gloo.
"""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, TOKENIZER_DIR, WT2, write_lines
from safetensors.torch import load_file

# Same seed, same global batch (1 x 4 blocks vs 2 x 2), dropout off: both runs see the same blocks
# in the same order and average the same gradients; only float summation order differs (gloo
# all-reduce), which is far below this tolerance over 6 steps (measured: identical to ~1e-10).
RTOL = 1e-5


def train_args(small_files, validation, out, per_device_train, per_device_eval):
    return [
        "--preset",
        "tiny",
        "--config_overrides",
        "resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0",
        "--tokenizer_name",
        TOKENIZER_DIR,
        "--train_file",
        small_files["train"],
        "--validation_file",
        validation,
        "--block_size",
        64,
        "--per_device_train_batch_size",
        per_device_train,
        "--per_device_eval_batch_size",
        per_device_eval,
        "--max_steps",
        6,
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--logging_steps",
        2,
        "--output_dir",
        out,
        "--disable_tqdm",
        "true",
        "--use_cpu",
        "--bf16",
        "false",
    ]  # fp32 in both (bf16 autocast is the default on a bf16 CPU)


# Two CPU processes as a GPU run starts them (torchrun); train.py's --use_cpu makes them pick gloo.
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", 2]
LAUNCH += ["--num_machines", 1, "--mixed_precision", "no", "--dynamo_backend", "no"]
LAUNCH += ["--main_process_port", 0]


def run(cmd, cache_dir):
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache_dir), "DATASETS_VERBOSITY": "info"}
    return subprocess.run(
        [str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_files):
    d = tmp_path_factory.mktemp("multiprocess")
    # 36 lines of WT2 test -> an odd number of 64-token blocks, so the last eval batch is uneven
    validation = write_lines(d / "valid.raw", WT2 / "wiki.test.raw", 0, 36)
    one = run(
        [sys.executable, REPO / "train.py", *train_args(small_files, validation, d / "one", 4, 8)],
        d / "cache-one",
    )
    two = run(
        [
            *LAUNCH,
            REPO / "train.py",
            *train_args(small_files, validation, d / "two", 2, 4),
        ],
        d / "cache-two",
    )
    return d, one, two


def results(d, name):
    return json.loads((d / name / "results.json").read_text())


def test_two_processes_train_and_evaluate_like_one(runs):
    d, one, two = runs
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = results(d, "one"), results(d, "two")
    assert r1["hardware"]["processes"] == 1 and r1["hardware"]["distributed"] == "NO"
    assert r2["hardware"]["processes"] == 2 and r2["hardware"]["distributed"] == "MULTI_CPU"
    assert (
        r1["hyperparameters"]["global_batch_blocks"]
        == r2["hyperparameters"]["global_batch_blocks"]
        == 4
    )
    assert r1["train"]["tokens_seen"] == r2["train"]["tokens_seen"] == 6 * 4 * 64
    assert r2["train"]["train_loss"] == pytest.approx(r1["train"]["train_loss"], rel=RTOL)
    assert r2["validation"]["eval_token_loss"] == pytest.approx(
        r1["validation"]["eval_token_loss"], rel=RTOL
    )
    w1, w2 = load_file(d / "one" / "model.safetensors"), load_file(d / "two" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for name in w1:
        assert (w1[name] - w2[name]).abs().max().item() < 1e-5, name


def test_eval_counts_every_block_exactly_once_with_an_uneven_last_batch(runs):
    d, _, _ = runs
    r1, r2 = results(d, "one"), results(d, "two")
    blocks = r1["data"]["validation"]["blocks"]
    assert (
        blocks % 2 == 1 and blocks % 8 != 0
    )  # the premise: 2 x 4 per eval step leaves a ragged last batch
    for r in (r1, r2):
        assert r["validation"]["eval_blocks"] == blocks
        assert r["validation"]["eval_tokens"] == blocks * 63


def test_preprocessing_runs_once_on_the_main_process_first(runs):
    """Every datasets map is computed ("Caching processed dataset") by one process and read from the
    cache by the other ("Loading cached processed dataset"), and every computation finishes before
    any cache read starts: rank 0 tokenized first while rank 1 waited at the barrier, and nothing
    was tokenized twice."""
    _, _, two = runs
    events = re.findall(
        r"INFO datasets\.arrow_dataset: (Caching processed dataset|Loading cached processed "
        r"dataset) at \S*/(cache-[0-9a-f]+)",
        two.stderr,
    )  # the map's fingerprint names its cache file
    computed = [path for kind, path in events if kind.startswith("Caching")]
    loaded = [path for kind, path in events if kind.startswith("Loading")]
    assert len(computed) >= 4  # tokenize + group for train and validation at least
    assert len(set(computed)) == len(computed), "a map was computed twice"
    assert sorted(loaded) == sorted(computed)  # the other process read each result from the cache
    last_compute = max(i for i, (kind, _) in enumerate(events) if kind.startswith("Caching"))
    first_load = min(i for i, (kind, _) in enumerate(events) if kind.startswith("Loading"))
    assert last_compute < first_load
