"""The paper's synthetic tasks and byte-level language modelling, generated on the fly.

Every task draws its batches from a `torch.Generator` that the caller seeds, so a batch is a pure
function of (seed, step): a resumed run, or a batch split across processes, sees the same data.

A batch is next-token prediction: `inputs` (batch, seqlen) int64 and `targets` (batch, seqlen)
int64 with `IGNORE` (-100, `F.cross_entropy`'s default `ignore_index`) where no loss is taken.
Accuracy is argmax(logits) == target over the positions that are not ignored.
"""

from .batch import IGNORE, Batch, generator
from .byte_lm import ByteLM
from .induction_heads import InductionHeads
from .selective_copying import SelectiveCopying

TASKS = {
    "selective-copying": SelectiveCopying,
    "induction-heads": InductionHeads,
    "bytes": ByteLM,
}

__all__ = ["IGNORE", "TASKS", "Batch", "generator", "ByteLM", "InductionHeads", "SelectiveCopying"]
