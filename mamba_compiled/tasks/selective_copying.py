"""Selective Copying (Gu & Dao 2023, Section 3.1, Figure 2 and Appendix E.1).

Data tokens are scattered at random positions among noise tokens; at the end the model must
reproduce them in order. Content-aware selection is needed because the positions vary from
sequence to sequence: a time-invariant model (S4) cannot tell noise from data.

A sequence of length `seq_len`, vocabulary V, M = `num_tokens` data tokens and P = seq_len - M.
Data tokens are drawn uniformly from 1 .. V-2; 0 is the noise token and V-1 the marker. Two
answer formats:

`markers` (the paper's data, S4's copying generator with `variable=True`): the sequence ends with
M marker tokens and the k-th answer is read at the k-th marker.

    inputs   [ noise (0) with M data tokens at sorted random positions | V-1 ... V-1 ]
               positions 0 .. P-1                                       P .. seq_len-1
    targets  [ IGNORE ...                                               | d_0 ... d_{M-1} ]

`copy`: one marker (a separator), then the answers as ordinary next tokens (teacher forcing), so
that the trained model can also be sampled with `generate` (the main job does).

    inputs   [ noise with data | V-1 | d_0 ... d_{M-2} ]
    targets  [ IGNORE ...      | d_0 ... d_{M-1}     ]

Both ask for the same tokens from the same distances. They learn differently: after the data a
marker carries no information, so the last answer is simply the most recent data token, an easy
first step; with `copy` every answer sits after a data token. With the paper's setting (length
4096, lr 1e-4) `markers` reached 99.7 % in 110K steps, where `copy` stayed at chance for 135K
(perf/NOTES.md, Run 17). Accuracy is taken over the M answer positions.
"""

from __future__ import annotations

import torch

from .batch import IGNORE, Batch

ANSWER_FORMATS = ("copy", "markers")


class SelectiveCopying:
    name = "selective-copying"

    def __init__(
        self,
        seq_len: int = 4096,
        vocab_size: int = 16,
        num_tokens: int = 16,
        answer_format: str = "copy",
    ):
        if vocab_size < 3:
            raise ValueError(
                f"vocab_size must be at least 3 (noise, separator, a data token), got {vocab_size}"
            )
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be at least 1, got {num_tokens}")
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(
                f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}"
            )
        if seq_len < 2 * num_tokens:
            raise ValueError(
                f"seq_len must be at least 2 * num_tokens = {2 * num_tokens} "
                f"(room for the data tokens and their copy), got {seq_len}"
            )
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.num_tokens = num_tokens
        self.answer_format = answer_format
        self.noise_token = 0
        self.separator = vocab_size - 1  # the marker

    def config(self) -> dict:
        return {
            "seq_len": self.seq_len,
            "vocab_size": self.vocab_size,
            "num_tokens": self.num_tokens,
            "answer_format": self.answer_format,
        }

    def sample(
        self, batch_size: int, generator: torch.Generator, seq_len: int | None = None
    ) -> Batch:
        L = self.seq_len if seq_len is None else seq_len
        M = self.num_tokens
        P = L - M  # length of the noisy region
        if P < M:
            raise ValueError(f"seq_len must be at least 2 * num_tokens = {2 * M}, got {L}")
        data = torch.randint(1, self.vocab_size - 1, (batch_size, M), generator=generator)
        # M distinct positions per row: the top-M of uniform noise is a uniform M-subset.
        positions = torch.rand(batch_size, P, generator=generator).topk(M, dim=1).indices
        positions = positions.sort(dim=1).values  # (batch, M)
        region = torch.full((batch_size, P), self.noise_token, dtype=torch.long)
        region.scatter_(1, positions, data)
        tail = torch.full((batch_size, M), self.separator, dtype=torch.long)  # M markers
        if self.answer_format == "copy":  # one separator, then the answers teacher-forced
            tail[:, 1:] = data[:, :-1]
        inputs = torch.cat([region, tail], dim=1)  # (batch, L)
        targets = torch.full((batch_size, L), IGNORE, dtype=torch.long)
        targets[:, P:] = data
        return Batch(inputs, targets)

    def split_for_generation(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt, answer): the noisy region and the separator; the M data tokens to generate."""
        if self.answer_format != "copy":
            raise ValueError(
                f"answer_format {self.answer_format!r} reads every answer at a marker in one "
                "forward pass; generation needs answer_format 'copy'"
            )
        P = batch.inputs.shape[1] - self.num_tokens
        return batch.inputs[:, : P + 1], batch.targets[:, P:]
