"""--random_block_offset (wikigpt/data/block_offsets.py): new block boundaries every epoch,
reproducible from --seed."""

import json

import numpy as np
import torch
from conftest import WT2, write_lines
from runs import micro_args, micro_files, train_in_process  # noqa: F401 - micro_files is a fixture

from wikigpt.data.block_offsets import RandomOffsetBlocks


def _offsets(ds, epochs):
    out = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        out.append(ds.offset)
    return out


def test_offsets_differ_per_epoch_repeat_per_seed_and_blocks_are_full():
    ids = np.arange(1000)
    ds = RandomOffsetBlocks(ids, block_size=32, seed=1)
    offsets = _offsets(ds, 32)
    assert sorted(offsets) == list(
        range(32)
    )  # the first block_size epochs all start at a different offset
    assert offsets == _offsets(RandomOffsetBlocks(ids, 32, seed=1), 32)
    assert offsets != _offsets(RandomOffsetBlocks(ids, 32, seed=2), 32)
    assert (
        len(ds) == (1000 - 31) // 32
    )  # fits after the largest offset, so the length never changes
    for epoch in range(32):
        ds.set_epoch(epoch)
        blocks = [ds[i] for i in range(len(ds))]
        assert all(
            b["input_ids"].shape == (32,) and torch.equal(b["input_ids"], b["labels"])
            for b in blocks
        )
        assert [int(b["input_ids"][0]) for b in blocks] == [
            ds.offset + 32 * i for i in range(len(ds))
        ]


def test_dataloader_workers_see_the_epochs_offset():
    ds = RandomOffsetBlocks(np.arange(500), block_size=16, seed=0)
    ds.set_epoch(3)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1)
    first = next(iter(loader))["input_ids"][:, 0].tolist()
    assert first == [ds.offset + 16 * i for i in range(4)]


def test_trainer_sets_a_new_offset_each_epoch(micro_files, tmp_path, monkeypatch):
    seen = []  # (epoch, offset) of every block the Trainer read
    get = RandomOffsetBlocks.__getitem__
    monkeypatch.setattr(
        RandomOffsetBlocks,
        "__getitem__",
        lambda self, i: (seen.append((self.epoch, self.offset)), get(self, i))[1],
    )
    files = {
        **micro_files,
        "train": write_lines(tmp_path / "train.raw", WT2 / "wiki.valid.raw", 0, 12),
    }  # ~10 blocks
    out = tmp_path / "run"
    argv = micro_args(files, out, max_steps=-1) + [
        "--random_block_offset",
        "--num_train_epochs",
        2,
        "--seed",
        7,
    ]
    assert train_in_process(argv, monkeypatch) == 0
    offsets = RandomOffsetBlocks(np.arange(100), 32, seed=7).offsets
    blocks = len(seen) // 2
    assert (
        seen == [(0, offsets[0])] * blocks + [(1, offsets[1])] * blocks and offsets[0] != offsets[1]
    )
    assert json.loads((out / "results.json").read_text())["train"]["global_step"] == 2 * -(
        -blocks // 2
    )


def test_persistent_workers_are_refused(micro_files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = micro_args(micro_files, out) + [
        "--random_block_offset",
        "--dataloader_num_workers",
        1,
        "--dataloader_persistent_workers",
        "true",
    ]
    assert train_in_process(argv, monkeypatch) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "error: --random_block_offset changes the training blocks every epoch, which "
            "persistent dataloader workers would not see: drop --dataloader_persistent_workers"
        )
    )
    assert not (out / "results.json").exists()
