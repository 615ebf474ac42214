"""Byte-level language modelling on a text file or folder, with held-out perplexity.

Tokens are raw bytes (vocabulary 256), so no tokenizer and no download is needed. The default corpus
is the Python standard library's own `.py` sources (about 30 MB, present wherever Python is).

Held-out split: in a folder, the files whose relative path hashes (crc32) below `val_percent` of
the hash range, so no file straddles the split and the split does not depend on the file order; for
a single file, its last `val_percent` of bytes. Training windows of seqlen + 1 bytes start at
uniformly drawn offsets of the training stream; evaluation reads the held-out stream in consecutive
non-overlapping windows from its start, so it is the same on every call.
"""

from __future__ import annotations

import math
import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch

from .batch import Batch


def default_corpus() -> Path:
    """The standard library's directory (`*.py` files below it are the default corpus)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _read_stream(paths: list[Path]) -> torch.Tensor:
    data = b"\n".join(p.read_bytes() for p in paths)
    return (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.empty(0, dtype=torch.uint8)
    )


class ByteLM:
    name = "bytes"

    def __init__(
        self,
        seq_len: int = 512,
        data: str | Path | None = None,
        pattern: str | None = None,
        val_percent: float = 2.0,
    ):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if not 0 < val_percent < 100:
            raise ValueError(f"val_percent must be in (0, 100), got {val_percent}")
        self.seq_len = seq_len
        self.vocab_size = 256
        self.val_percent = val_percent
        root = default_corpus() if data is None else Path(data)
        if pattern is None:
            pattern = "*.py" if data is None else "*"
        self.data = str(root)
        self.pattern = pattern
        if root.is_file():
            stream = _read_stream([root])
            n_val = max(1, int(len(stream) * val_percent / 100))
            self.train, self.val = stream[:-n_val], stream[-n_val:]
            self.num_files = 1
        elif root.is_dir():
            files = sorted(
                p for p in root.rglob(pattern) if p.is_file() and "site-packages" not in p.parts
            )
            if not files:
                raise ValueError(f"data: no files matching {pattern!r} under {root}")
            cut = val_percent / 100 * 2**32
            is_val = [zlib.crc32(str(p.relative_to(root)).encode()) < cut for p in files]
            if all(is_val) or not any(is_val):  # too few files for a file-level split
                stream = _read_stream(files)
                n_val = max(1, int(len(stream) * val_percent / 100))
                self.train, self.val = stream[:-n_val], stream[-n_val:]
            else:
                self.train = _read_stream([p for p, v in zip(files, is_val, strict=True) if not v])
                self.val = _read_stream([p for p, v in zip(files, is_val, strict=True) if v])
            self.num_files = len(files)
        else:
            raise ValueError(f"data: {root} is neither a file nor a directory")
        for split, stream in (("training", self.train), ("held-out", self.val)):
            if len(stream) < seq_len + 1:
                raise ValueError(
                    f"data: the {split} split of {root} has {len(stream)} bytes, fewer than "
                    f"seq_len + 1 = {seq_len + 1}; use more data or a smaller --seq-len"
                )

    def config(self) -> dict:
        return {
            "seq_len": self.seq_len,
            "data": self.data,
            "pattern": self.pattern,
            "val_percent": self.val_percent,
        }

    def describe(self) -> str:
        return (
            f"{self.num_files} files from {self.data} ({self.pattern}): "
            f"{len(self.train) / 1e6:.1f} MB training, {len(self.val) / 1e6:.2f} MB held out"
        )

    def sample(
        self, batch_size: int, generator: torch.Generator, seq_len: int | None = None
    ) -> Batch:
        L = self.seq_len if seq_len is None else seq_len
        starts = torch.randint(0, len(self.train) - L, (batch_size,), generator=generator)
        windows = self.train[starts[:, None] + torch.arange(L + 1)].long()  # (batch, L+1)
        return Batch(windows[:, :-1], windows[:, 1:])

    def eval_batches(self, batch_size: int, max_tokens: int) -> Iterator[Batch]:
        """Consecutive held-out windows, at most `max_tokens` target bytes in all."""
        L = self.seq_len
        n_windows = min((len(self.val) - 1) // L, max(1, math.ceil(max_tokens / L)))
        for first in range(0, n_windows, batch_size):
            rows = torch.arange(first, min(first + batch_size, n_windows))
            windows = self.val[rows[:, None] * L + torch.arange(L + 1)].long()
            yield Batch(windows[:, :-1], windows[:, 1:])
