"""--random_block_offset: cut the training token stream into blocks at a new offset every epoch.

With fixed blocks every epoch shows the model the same block boundaries, so the first tokens of each
block are always predicted from the same (short) context; in a data-starved regime that is
memorised. Here epoch e cuts the stream at offset perm[e % block_size], a permutation of
0..block_size-1 drawn from --seed, so epochs differ (the first block_size epochs all differ) and a
rerun with the same seed sees the same blocks.

The Trainer (through accelerate's DataLoaderShard) calls `dataset.set_epoch(epoch)` before each
epoch in one process; with several processes accelerate forwards set_epoch to the sampler instead,
so a callback sets it too at `on_epoch_begin`, which the Trainer runs before it starts the epoch's
data iterator. Worker processes are started by that iterator, after set_epoch, so they see the new
offset (persistent workers would not: refused). Validation and test blocks are unchanged.
"""

import numpy as np
import torch
from transformers import TrainerCallback

from wikigpt.data.blocks import token_stream
from wikigpt.errors import UsageError


def epoch_offsets(seed: int, block_size: int) -> np.ndarray:
    """The offset of every epoch (index e % block_size): a permutation of range(block_size) drawn
    from seed."""
    return np.random.default_rng([seed, block_size]).permutation(block_size)


class RandomOffsetBlocks(torch.utils.data.Dataset):
    """Blocks of `block_size` tokens from one token stream, starting at an offset that changes with
    set_epoch."""

    def __init__(self, ids: np.ndarray, block_size: int, seed: int):
        self.ids, self.block_size = np.asarray(ids, dtype=np.int64), block_size
        self.offsets = epoch_offsets(seed, block_size)
        # The same length at every offset (the Trainer plans its steps from len): the blocks that
        # fit after the largest offset. Each epoch drops < 2 blocks of tokens, at its ends, and
        # which ones changes.
        self.n_blocks = (len(self.ids) - (block_size - 1)) // block_size
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.offset = int(self.offsets[self.epoch % self.block_size])

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n_blocks:
            raise IndexError(i)
        start = self.offset + i * self.block_size
        block = torch.from_numpy(self.ids[start : start + self.block_size])
        return {
            "input_ids": block,
            "labels": block.clone(),
        }  # labels = inputs; the model shifts them


class SetEpochCallback(TrainerCallback):
    def __init__(self, dataset: RandomOffsetBlocks):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is epoch + steps/steps_in_epoch: exactly the epoch about to start (or, resumed
        # mid-epoch, its start)
        self.dataset.set_epoch(int(state.epoch + 1e-9))


def random_offset_training(
    data_args, raw_train, train_blocks, tokenizer, block_size: int, training_args
):
    """(train dataset, callbacks): fixed blocks and [] unless --random_block_offset."""
    if not data_args.random_block_offset:
        return train_blocks, []
    if training_args.dataloader_persistent_workers and training_args.dataloader_num_workers > 0:
        raise UsageError(
            "--random_block_offset changes the training blocks every epoch, which persistent "
            "dataloader workers would not see: drop --dataloader_persistent_workers"
        )
    ids = token_stream(
        raw_train, tokenizer, data_args.preprocessing_num_workers
    )  # the datasets cache: no new work
    if len(ids) < 2 * block_size - 1:
        raise UsageError(
            f"--random_block_offset needs at least {2 * block_size - 1} training tokens at "
            f"--block_size {block_size} (the train split has {len(ids)}); pass more text, a "
            "smaller --block_size, or drop --random_block_offset"
        )
    dataset = RandomOffsetBlocks(ids, block_size, training_args.seed)
    return dataset, [SetEpochCallback(dataset)]
