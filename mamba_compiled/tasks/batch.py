"""A batch of next-token prediction: what every task yields and the trainer consumes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE = -100  # F.cross_entropy's default ignore_index: no loss, no accuracy at this position


@dataclass
class Batch:
    inputs: Tensor  # (batch, seqlen) int64 token ids
    targets: Tensor  # (batch, seqlen) int64, IGNORE where no loss is taken

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def slice(self, start: int, stop: int) -> Batch:
        """Rows [start, stop): one process's share or one micro-batch."""
        return Batch(self.inputs[start:stop], self.targets[start:stop])

    def to(self, device) -> Batch:
        device = torch.device(device)
        if device.type == "cuda":  # pinned and asynchronous: the copy does not wait for the GPU
            return Batch(
                self.inputs.pin_memory().to(device, non_blocking=True),
                self.targets.pin_memory().to(device, non_blocking=True),
            )
        return Batch(self.inputs.to(device), self.targets.to(device))

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE).sum())


def generator(seed: int, stream: str, index: int) -> torch.Generator:
    """A CPU generator for batch `index` of `stream` ("train", "eval", ...) of run `seed`.

    Each batch gets its own generator, so a batch depends on (seed, stream, index) alone: not on
    the device, the number of processes, or what ran before it (a resumed run sees the same data).
    """
    key = hashlib.blake2b(f"{seed}/{stream}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
