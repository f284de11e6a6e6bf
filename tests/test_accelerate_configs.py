"""The accelerate configs parse into accelerate's ClusterConfig and launch what their comments
promise."""

from pathlib import Path

import accelerate.utils.launch
import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils.launch import prepare_multi_gpu_env, prepare_simple_launcher_cmd_env
from accelerate.utils.other import get_free_port
from conftest import REPO

CONFIGS = [
    REPO / "accelerate_config.yaml",
    *sorted((REPO / "configs" / "accelerate").glob("*.yaml")),
]


def launch_args(config: Path, *flags: str):
    """What `accelerate launch --config_file CONFIG FLAGS train.py` resolves to (no process
    started)."""
    args = launch_command_parser().parse_args(
        ["--config_file", str(config), *flags, "train.py", "--preset", "tiny"]
    )
    args, _, _ = _validate_launch_command(args)
    return args


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses_into_cluster_config_with_known_keys(config):
    cfg = load_config_from_file(str(config))  # raises on any key ClusterConfig does not know
    assert isinstance(cfg, ClusterConfig)
    assert cfg.mixed_precision == "bf16" and cfg.use_cpu is False
    # accelerate silently ignores a misspelt fsdp_config key; every one must be a launch flag
    launch_flags = {a.dest for a in launch_command_parser()._actions}
    assert set(cfg.fsdp_config) <= launch_flags, set(cfg.fsdp_config) - launch_flags


def test_top_level_config_is_ddp_on_all_gpus():
    args = launch_args(REPO / "accelerate_config.yaml")
    assert (
        args.multi_gpu and not args.use_fsdp and args.num_processes == 8 and args.num_machines == 1
    )
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16" and args.nproc_per_node == "8"
    assert launch_args(REPO / "accelerate_config.yaml", "--num_processes", "4").num_processes == 4


def test_single_gpu_config_runs_one_process_on_gpu_0(monkeypatch):
    args = launch_args(REPO / "configs" / "accelerate" / "single_gpu.yaml")
    assert not args.multi_gpu and not args.use_fsdp and args.num_processes == 1
    # accelerate names the visible devices for the backend it finds: a CUDA machine's, whatever runs
    # the test
    monkeypatch.setattr(
        accelerate.utils.launch,
        "get_torch_accelerator_backend",
        lambda check_available=True: ("cuda", None),
        raising=False,
    )
    cmd, env = prepare_simple_launcher_cmd_env(args)
    assert cmd[-3:] == ["train.py", "--preset", "tiny"]
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"


@pytest.mark.parametrize("rank", ["0", "1"])
def test_multi_node_config_two_nodes_of_eight(rank):
    config = REPO / "configs" / "accelerate" / "multi_node.yaml"
    assert load_config_from_file(str(config)).main_process_port == 29500
    # rank 0 checks that its port is free: use one no other process here holds
    port = str(get_free_port())
    args = launch_args(
        config,
        "--machine_rank",
        rank,
        "--main_process_ip",
        "192.168.1.7",
        "--main_process_port",
        port,
    )
    assert args.multi_gpu and args.num_machines == 2 and args.num_processes == 16
    prepare_multi_gpu_env(args)
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", int(rank))
    assert args.rdzv_endpoint == f"192.168.1.7:{port}"


def test_fsdp_config_full_shard_wraps_gpt2_blocks_in_bf16():
    cfg = load_config_from_file(str(REPO / "configs" / "accelerate" / "fsdp.yaml"))
    assert cfg.distributed_type == DistributedType.FSDP
    args = launch_args(REPO / "configs" / "accelerate" / "fsdp.yaml")
    assert args.use_fsdp and args.num_processes == 8
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_RESHARD_AFTER_FORWARD"] == "true"  # FSDP2's FULL_SHARD
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert (
        env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    )  # final save is a from_pretrained-loadable file
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    from transformers.models.gpt2 import modeling_gpt2

    assert hasattr(
        modeling_gpt2, env["FSDP_TRANSFORMER_CLS_TO_WRAP"]
    )  # the wrap class exists by that name
