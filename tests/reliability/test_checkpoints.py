"""wikigpt/reliability/checkpoints.py: half-written checkpoints are found without loading them;
resume picks the newest good one."""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from runs import make_checkpoint
from transformers import GPT2Config, GPT2LMHeadModel, Trainer
from transformers.trainer_utils import sort_checkpoints

from wikigpt.reliability.checkpoints import (
    ResumePlan,
    checkpoint_problem,
    last_good_checkpoint,
    normalize_resume_value,
    plan_resume,
)
from wikigpt.errors import UsageError
from wikigpt.train.arguments import WikiTrainingArguments


def truncate(path, keep=None):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


CORRUPTIONS = {
    "no_trainer_state": (
        lambda c: (c / "trainer_state.json").unlink(),
        "trainer_state.json is missing (the save was interrupted)",
    ),
    "truncated_trainer_state": (
        lambda c: truncate(c / "trainer_state.json"),
        "trainer_state.json is truncated or unreadable",
    ),
    "half_safetensors": (
        lambda c: truncate(c / "model.safetensors"),
        "model.safetensors is truncated (",
    ),
    "safetensors_header_only": (
        lambda c: truncate(c / "model.safetensors", keep=5),
        "model.safetensors is truncated or not a safetensors file",
    ),
    "no_weights": (lambda c: (c / "model.safetensors").unlink(), "model.safetensors is missing"),
    "no_optimizer": (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    "truncated_optimizer": (
        lambda c: truncate(c / "optimizer.pt"),
        "optimizer.pt is truncated or not a torch.save file",
    ),
    "no_scheduler": (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    "truncated_rng": (lambda c: truncate(c / "rng_state.pth"), "rng_state.pth is truncated"),
    "no_rng": (lambda c: (c / "rng_state.pth").unlink(), "rng_state.pth is missing"),
    "step_mismatch": (
        lambda c: (c / "trainer_state.json").write_text('{"global_step": 3}'),
        "trainer_state.json says step 3, the folder name says 4",
    ),
}


def test_complete_checkpoint_has_no_problem(tmp_path):
    assert checkpoint_problem(make_checkpoint(tmp_path / "checkpoint-4", 4)) is None


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_half_written_checkpoint_is_detected(name, tmp_path):
    checkpoint = make_checkpoint(tmp_path / "checkpoint-4", 4)
    corrupt, problem = CORRUPTIONS[name]
    corrupt(checkpoint)
    assert checkpoint_problem(checkpoint).startswith(problem)


def test_sharded_weights_are_checked_shard_by_shard(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "checkpoint-4", 4)
    (checkpoint / "model.safetensors").rename(checkpoint / "model-00001-of-00002.safetensors")
    index = {
        "weight_map": {
            "wte": "model-00001-of-00002.safetensors",
            "wpe": "model-00002-of-00002.safetensors",
        }
    }
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    assert checkpoint_problem(checkpoint) == "model-00002-of-00002.safetensors is missing"


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None),
        (False, None),
        ("false", None),
        ("", None),
        (True, "latest"),
        ("true", "latest"),
        ("latest", "latest"),
        ("LATEST", "latest"),
        ("out/checkpoint-4", "out/checkpoint-4"),
    ],
)
def test_resume_values(value, expected):
    assert normalize_resume_value(value) == expected


def test_latest_skips_incomplete_checkpoints_in_one_line_each_and_sets_them_aside(tmp_path, caplog):
    for step in (2, 4, 6, 8):
        make_checkpoint(tmp_path / f"checkpoint-{step}", step)
    (tmp_path / "checkpoint-8" / "optimizer.pt").unlink()
    truncate(tmp_path / "checkpoint-6" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="wikigpt.reliability.checkpoints"):
        plan = plan_resume("latest", str(tmp_path))
    assert plan.path == str(tmp_path / "checkpoint-4")
    assert [r.getMessage() for r in caplog.records] == [
        f"skipping incomplete checkpoint {tmp_path / 'checkpoint-8'}: optimizer.pt is missing",
        f"skipping incomplete checkpoint {tmp_path / 'checkpoint-6'}: model.safetensors is "
        f"truncated ({(tmp_path / 'checkpoint-6' / 'model.safetensors').stat().st_size} of "
        f"{(tmp_path / 'checkpoint-4' / 'model.safetensors').stat().st_size} bytes)",
    ]
    plan.set_aside(is_main_process=True)
    assert sorted(os.listdir(tmp_path)) == [
        "checkpoint-2",
        "checkpoint-4",
        "corrupt-checkpoint-6",
        "corrupt-checkpoint-8",
    ]
    # The Trainer's rotation (save_total_limit) no longer counts them, so it cannot delete a good
    # one for them.
    assert sort_checkpoints(str(tmp_path)) == [
        str(tmp_path / "checkpoint-2"),
        str(tmp_path / "checkpoint-4"),
    ]


def test_no_good_checkpoint_is_an_error_and_changes_nothing(tmp_path):
    make_checkpoint(tmp_path / "checkpoint-2", 2)
    (tmp_path / "checkpoint-2" / "trainer_state.json").unlink()
    before = sorted(os.walk(tmp_path))
    with pytest.raises(UsageError) as err:
        plan_resume(True, str(tmp_path))
    assert str(err.value) == (
        "--resume_from_checkpoint latest: no complete checkpoint in --output_dir "
        f"{str(tmp_path)!r} (checkpoint-2: trainer_state.json is missing (the save was "
        "interrupted)); pass a complete checkpoint folder, or drop --resume_from_checkpoint and "
        "use a new --output_dir"
    )
    assert sorted(os.walk(tmp_path)) == before


@pytest.mark.parametrize(
    "setup, value, message",
    [
        (
            None,
            "latest",
            r"--resume_from_checkpoint latest: --output_dir '.*' has no checkpoint-N folders to "
            r"resume",
        ),
        (
            None,
            "{tmp}/nope",
            r"--resume_from_checkpoint '.*/nope' does not exist; pass a checkpoint-N folder, or "
            r"'latest'",
        ),
        (
            "file",
            "{tmp}/file",
            r"--resume_from_checkpoint '.*/file' is a file; pass a checkpoint-N folder",
        ),
        (
            "run",
            "{tmp}",
            r"--resume_from_checkpoint '.*' is a run folder, not a checkpoint; pass one of its "
            r"checkpoint-N",
        ),
        (
            "corrupt",
            "{tmp}/checkpoint-4",
            r"--resume_from_checkpoint '.*/checkpoint-4' is incomplete or corrupt "
            r"\(scheduler.pt is missing\); pass an earlier one such as '.*/checkpoint-2'",
        ),
    ],
)
def test_bad_resume_values(setup, value, message, tmp_path):
    if setup == "file":
        (tmp_path / "file").write_text("x")
    if setup in ("run", "corrupt"):
        make_checkpoint(tmp_path / "checkpoint-2", 2)
        make_checkpoint(tmp_path / "checkpoint-4", 4)
    if setup == "corrupt":
        (tmp_path / "checkpoint-4" / "scheduler.pt").unlink()
    with pytest.raises(UsageError, match=message):
        plan_resume(value.format(tmp=tmp_path), str(tmp_path / "out"))


def test_explicit_complete_checkpoint_is_used_as_is(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "checkpoint-4", 4)
    assert plan_resume(str(checkpoint), str(tmp_path / "elsewhere")) == ResumePlan(
        path=str(checkpoint)
    )


def test_checkpoint_of_another_model_is_refused(tmp_path):
    plan = ResumePlan(path=str(make_checkpoint(tmp_path / "checkpoint-4", 4, n_embd=8)))
    plan.check_model(GPT2Config(n_layer=1, n_head=1, n_embd=8, vocab_size=100, n_positions=32))
    with pytest.raises(
        UsageError,
        match=r"--resume_from_checkpoint '.*checkpoint-4' holds a different model "
        r"\(vocab_size 100 there, 50257 here; n_embd 8 there, 16 here\); resume",
    ):
        plan.check_model(
            GPT2Config(n_layer=1, n_head=1, n_embd=16, vocab_size=50257, n_positions=32)
        )


# Layouts as the Trainer writes them. FSDP and DeepSpeed cannot run on this CPU-only machine through
# the Trainer (accelerate's FSDP plugin wants a GPU, DeepSpeed is not installed), so: FSDP's files
# come from accelerate's own savers on an FSDP2 model in a one-process gloo group; DeepSpeed's from
# Trainer._save_checkpoint with a stand-in for the engine's save_checkpoint that writes DeepSpeed's
# file names (ZeRO-3 without gathered weights).


def tiny_trainer(output_dir) -> Trainer:
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_head=1, n_embd=8, vocab_size=50, n_positions=16)
    )
    args = WikiTrainingArguments(
        output_dir=str(output_dir), eval_strategy="no", save_strategy="steps", report_to="none"
    )
    trainer = Trainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    trainer.state.global_step = 2
    return trainer


def test_plain_checkpoint_written_by_the_trainer_is_complete(tmp_path):
    trainer = tiny_trainer(tmp_path)
    trainer._save_checkpoint(trainer.model, None)
    assert checkpoint_problem(tmp_path / "checkpoint-2") is None
    assert plan_resume("latest", str(tmp_path)).path == str(tmp_path / "checkpoint-2")


class DeepSpeedEngineStandIn(torch.nn.Module):
    """What Trainer._save_checkpoint calls on a DeepSpeed engine; save_checkpoint writes DeepSpeed's
    layout."""

    config = {"zero_optimization": {"stage": 3}}

    def __init__(self, trainer):
        super().__init__()
        self.trainer = [trainer]  # a list: not registered as a submodule

    def state_dict(
        self, *args, **kwargs
    ):  # what accelerate raises for ZeRO-3 without gathered 16-bit weights
        raise ValueError("stage3_gather_16bit_weights_on_model_save=false")

    def save_checkpoint(
        self,
        save_dir,
        tag=None,
        client_state=None,
        save_latest=True,
        exclude_frozen_parameters=False,
    ):
        trainer = self.trainer[0]
        tag = f"global_step{trainer.state.global_step}"
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save(
            {"module": trainer.model.state_dict()},
            os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"),
        )
        torch.save(
            {"optimizer_state_dict": trainer.optimizer.state_dict()},
            os.path.join(save_dir, tag, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
        )
        with open(os.path.join(save_dir, "latest"), "w") as f:
            f.write(tag)


def test_deepspeed_checkpoint_is_complete_and_resumable(tmp_path, monkeypatch):
    import transformers.trainer
    from accelerate.utils.deepspeed import DeepSpeedSchedulerWrapper

    monkeypatch.setattr(
        transformers.trainer, "DeepSpeedSchedulerWrapper", DeepSpeedSchedulerWrapper, raising=False
    )
    trainer = tiny_trainer(tmp_path)
    trainer.is_deepspeed_enabled = True
    trainer.model_wrapped = trainer.deepspeed = DeepSpeedEngineStandIn(trainer)
    trainer.lr_scheduler = DeepSpeedSchedulerWrapper(trainer.lr_scheduler, trainer.optimizer)
    trainer._save_checkpoint(trainer.model, None)
    checkpoint = tmp_path / "checkpoint-2"
    assert (
        not (checkpoint / "model.safetensors").exists()
        and not (checkpoint / "scheduler.pt").exists()
    )
    assert checkpoint_problem(checkpoint) is None
    assert plan_resume("latest", str(tmp_path)).path == str(checkpoint)
    assert last_good_checkpoint(str(tmp_path)) == str(
        checkpoint
    )  # what the preemption and NaN messages name
    truncate(checkpoint / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert checkpoint_problem(checkpoint) == (
        "global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt is truncated "
        "or not a torch.save file"
    )


def save_fsdp_checkpoints(root: str) -> None:
    """checkpoint-2 under root/FULL_STATE_DICT and root/SHARDED_STATE_DICT, as
    Trainer._save_checkpoint writes them under FSDP: save_model (full state dict only), accelerate's
    save_fsdp_model and save_fsdp_optimizer, scheduler.pt, rng_state.pth, trainer_state.json. Run in
    its own process: it starts a process group."""
    import types

    import torch.distributed as dist
    from accelerate import PartialState
    from accelerate.utils import save_fsdp_model, save_fsdp_optimizer
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import (
        FullOptimStateDictConfig,
        FullStateDictConfig,
        ShardedOptimStateDictConfig,
        ShardedStateDictConfig,
        StateDictType,
        fully_shard,
    )
    from transformers import TrainerState, get_scheduler

    PartialState(cpu=True)
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_head=1, n_embd=8, vocab_size=50, n_positions=16)
    )
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=4)
    ids = torch.randint(0, 50, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    layouts = {
        StateDictType.FULL_STATE_DICT: (FullStateDictConfig(), FullOptimStateDictConfig()),
        StateDictType.SHARDED_STATE_DICT: (ShardedStateDictConfig(), ShardedOptimStateDictConfig()),
    }
    for kind, (model_config, optim_config) in layouts.items():
        out = os.path.join(root, kind.name, "checkpoint-2")
        if kind == StateDictType.FULL_STATE_DICT:
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            model.save_pretrained(out, state_dict=full)
        plugin = types.SimpleNamespace(
            fsdp_version=2,
            state_dict_type=kind,
            state_dict_config=model_config,
            optim_state_dict_config=optim_config,
        )
        accelerator = types.SimpleNamespace(num_processes=1, process_index=0)
        save_fsdp_model(plugin, accelerator, model, out)
        save_fsdp_optimizer(plugin, accelerator, optimizer, model, out)
        torch.save(scheduler.state_dict(), os.path.join(out, "scheduler.pt"))
        torch.save({"cpu": torch.random.get_rng_state()}, os.path.join(out, "rng_state.pth"))
        TrainerState(global_step=2).save_to_json(os.path.join(out, "trainer_state.json"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, __file__, str(root)],
        cwd=REPO / "tests",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.parametrize(
    "layout, files",
    [
        ("FULL_STATE_DICT", {"model.safetensors", "pytorch_model_fsdp.bin", "optimizer.bin"}),
        ("SHARDED_STATE_DICT", {"pytorch_model_fsdp_0", "optimizer_0"}),
    ],
)
def test_fsdp_checkpoint_is_complete_and_resumable(fsdp_runs, layout, files):
    run = fsdp_runs / layout
    checkpoint = run / "checkpoint-2"
    assert files <= set(os.listdir(checkpoint)) and "optimizer.pt" not in os.listdir(checkpoint)
    assert checkpoint_problem(checkpoint) is None
    plan = plan_resume("latest", str(run))
    assert plan.path == str(checkpoint)
    plan.check_model(GPT2Config(n_layer=1, n_head=1, n_embd=8, vocab_size=50, n_positions=16))
    assert last_good_checkpoint(str(run)) == str(checkpoint)


def test_half_written_fsdp_checkpoints_are_detected(fsdp_runs, tmp_path):
    import shutil

    full = shutil.copytree(
        fsdp_runs / "FULL_STATE_DICT" / "checkpoint-2", tmp_path / "full" / "checkpoint-2"
    )
    truncate(full / "optimizer.bin")
    assert checkpoint_problem(full) == "optimizer.bin is truncated or not a torch.save file"
    (full / "optimizer.bin").unlink()
    assert checkpoint_problem(full) == "optimizer.bin is missing (FSDP optimizer state)"
    sharded = shutil.copytree(
        fsdp_runs / "SHARDED_STATE_DICT" / "checkpoint-2", tmp_path / "sharded" / "checkpoint-2"
    )
    (sharded / "pytorch_model_fsdp_0" / ".metadata").unlink()
    assert (
        checkpoint_problem(sharded)
        == "pytorch_model_fsdp_0/.metadata is missing (the sharded save did not finish)"
    )


if __name__ == "__main__":
    save_fsdp_checkpoints(sys.argv[1])
    # Every file is written and closed; skip the interpreter's teardown, where destroying the
    # process group's threads sometimes aborts (SIGABRT, "terminate called without an active
    # exception") after the work is done.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
