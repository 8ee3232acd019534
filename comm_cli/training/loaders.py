"""The training and validation loaders, and the micro-batches of a run from any data position.

The training order is a seeded shuffle per epoch (``EpochSampler``), so a resumed run reads the
same batches from the saved (epoch, batch) position on as the run it continues would have.
"""

from __future__ import annotations

import torch


class EpochSampler(torch.utils.data.Sampler):
    """A seeded shuffle that differs per epoch and is reproducible after a resume."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def train_loader(split, collator, trainer_cfg, seed: int) -> torch.utils.data.DataLoader:
    """Shuffled by ``EpochSampler``; the last incomplete batch of an epoch is dropped."""
    return torch.utils.data.DataLoader(
        split,
        batch_size=trainer_cfg.batch_size,
        sampler=EpochSampler(len(split), seed),
        collate_fn=collator,
        num_workers=trainer_cfg.num_workers,
        drop_last=True,
    )


def validation_loader(split, collator, trainer_cfg) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        split,
        batch_size=trainer_cfg.eval_batch_size or trainer_cfg.batch_size,
        shuffle=False,
        collate_fn=collator,
        num_workers=trainer_cfg.num_workers,
    )


def micro_batches(accelerator, loader, epoch: int, skip: int):
    """Yield (epoch, index in epoch, batch) forever from the prepared training ``loader``,
    starting at batch ``skip`` of ``epoch``."""
    while True:
        # The prepared loader re-seeds the sampler with its own epoch counter on every pass.
        loader.set_epoch(epoch)
        batches = loader
        if skip:
            batches = accelerator.skip_first_batches(loader, skip)
            batches.set_epoch(epoch)
        for index, batch in enumerate(batches, start=skip):
            yield epoch, index, batch
        epoch, skip = epoch + 1, 0
