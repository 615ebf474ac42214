"""Induction Heads (Gu & Dao 2023, Section 3.1 and Appendix E.1; Olsson et al. 2022).

Associative recall: a special token appears once at a random position, followed by some token a;
the sequence ends with the special token again and the model must predict a. The paper trains at
length 256 with vocabulary 16 and tests length generalization from 2^6 to 2^20.

One sequence of length L, vocabulary V, special token s = V-1, p uniform in [0, L-3]:

    inputs   x_0 ... x_{p-1}  s  a  x_{p+2} ... x_{L-2}  s        x_i, a uniform in 0 .. V-2
    targets  IGNORE everywhere except position L-1, whose target is a

Only one position is scored, so accuracy is the fraction of sequences answered correctly.
"""

from __future__ import annotations

import torch

from .batch import IGNORE, Batch


class InductionHeads:
    name = "induction-heads"

    def __init__(self, seq_len: int = 256, vocab_size: int = 16):
        if vocab_size < 3:
            raise ValueError(f"vocab_size must be at least 3, got {vocab_size}")
        if seq_len < 3:
            raise ValueError(f"seq_len must be at least 3 (s, a, s), got {seq_len}")
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.special = vocab_size - 1

    def config(self) -> dict:
        return {"seq_len": self.seq_len, "vocab_size": self.vocab_size}

    def sample(
        self, batch_size: int, generator: torch.Generator, seq_len: int | None = None
    ) -> Batch:
        L = self.seq_len if seq_len is None else seq_len
        if L < 3:
            raise ValueError(f"seq_len must be at least 3 (s, a, s), got {L}")
        inputs = torch.randint(0, self.vocab_size - 1, (batch_size, L), generator=generator)
        p = torch.randint(0, L - 2, (batch_size,), generator=generator)  # in [0, L-3]
        rows = torch.arange(batch_size)
        inputs[rows, p] = self.special
        inputs[:, -1] = self.special
        targets = torch.full((batch_size, L), IGNORE, dtype=torch.long)
        targets[:, -1] = inputs[rows, p + 1]
        return Batch(inputs, targets)

    def split_for_generation(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt, answer): the whole sequence; the one token to generate."""
        return batch.inputs, batch.targets[:, -1:]
