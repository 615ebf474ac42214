"""Evaluation: accuracy on answer positions, held-out perplexity, and length generalization.

Evaluation runs the model without gradients and without compiling it (the compiled graphs are the
training step's; evaluation at many lengths would only recompile). Under several processes each
evaluates its share of the sequences and the sums are reduced, so every process returns the same
numbers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mamba_compiled.distributed import DistEnv, all_reduce_sum
from mamba_compiled.tasks import IGNORE, Batch, ByteLM, generator


def autocast(device: torch.device, precision: str = "bf16"):
    """bf16 autocast on CUDA (precision "bf16"); CPU, and precision "fp32", run in float32."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def answer_stats(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[correct answers, answers, sequences with every answer right, sequences] (float64 sums).

    logits (b, l, V), targets (b, l) with IGNORE where nothing is asked.
    """
    mask = targets != IGNORE  # (b, l)
    correct = (logits.argmax(-1) == targets) & mask  # (b, l)
    seq_ok = (correct | ~mask).all(-1)  # (b,)
    rows = targets.new_full((), targets.shape[0])  # a fill, not a host-to-device copy
    return torch.stack([correct.sum(), mask.sum(), seq_ok.sum(), rows]).double()


def eval_batches(
    task, sequences: int, batch_size: int, seed: int, env: DistEnv, stream: str = "eval"
) -> Iterator[Batch]:
    """This process's share of the fixed evaluation set: `sequences` in all, `batch_size` per
    process and batch. The same set on every call and for any number of processes; another
    `stream` ("test") draws another set (synthetic tasks; bytes have one held-out split)."""
    per_step = batch_size * env.world_size
    if isinstance(task, ByteLM):
        source: Iterable[Batch] = task.eval_batches(per_step, max_tokens=sequences * task.seq_len)
    else:
        steps = math.ceil(sequences / per_step)
        source = (
            task.sample(min(per_step, sequences - i * per_step), generator(seed, stream, i))
            for i in range(steps)
        )
    for batch in source:
        n = len(batch)
        lo, hi = n * env.rank // env.world_size, n * (env.rank + 1) // env.world_size
        yield batch.slice(lo, hi)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    env: DistEnv,
    per_byte: bool = False,
    precision: str = "bf16",
) -> dict:
    """Loss (nats per answer), accuracy and sequence accuracy over `batches`, on every process.

    With `per_byte` (byte-level language modelling) also bits per byte and perplexity.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=env.device)  # loss, 4 answer stats
    for batch in batches:
        if len(batch) == 0:  # an uneven split can leave a process without rows
            continue
        batch = batch.to(env.device)
        with autocast(env.device, precision):
            logits = model(batch.inputs).logits
        logits = logits.float()
        sums[0] += F.cross_entropy(
            logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="sum"
        ).double()
        sums[1:] += answer_stats(logits, batch.targets)
    model.train(was_training)
    all_reduce_sum(sums, env)
    loss_sum, correct, answers, seq_ok, seqs = sums.tolist()
    if answers == 0:
        raise ValueError("evaluation saw no answer positions: raise --eval-sequences")
    loss = loss_sum / answers
    out = {
        "loss": loss,
        "accuracy": correct / answers,
        "seq_accuracy": seq_ok / seqs,
        "sequences": int(seqs),
    }
    if per_byte:
        out["bits_per_byte"] = loss / math.log(2)
        out["perplexity"] = math.exp(min(loss, 700.0))
    return out


@torch.no_grad()
def last_token_logits(model: nn.Module, inputs: torch.Tensor, chunk: int) -> torch.Tensor:
    """Logits (b, V) at the last position of `inputs` (b, l), reading at most `chunk` tokens per
    forward: longer sequences are prefilled chunk by chunk, carrying the recurrent state, so memory
    stays bounded whatever l is (chunked prefill through the scan's initial_state)."""
    b, l = inputs.shape
    if l <= chunk:
        return model(inputs, num_last_tokens=1).logits[:, -1]
    config = model.config
    param = next(model.parameters())
    states = [
        (
            torch.zeros(b, config.d_inner, config.d_conv, device=inputs.device, dtype=param.dtype),
            torch.zeros(
                b, config.d_inner, config.d_state, device=inputs.device, dtype=torch.float32
            ),
        )
        for _ in range(config.n_layer)
    ]
    for start in range(0, l, chunk):
        logits = model(inputs[:, start : start + chunk], num_last_tokens=1, states=states).logits
    return logits[:, -1]


@torch.no_grad()
def length_sweep(
    model: nn.Module,
    task,
    lengths: list[int],
    sequences: int,
    seed: int,
    env: DistEnv,
    token_budget: int = 1 << 20,
    precision: str = "bf16",
) -> list[dict]:
    """Accuracy of the last-position answer at each length (induction heads' generalization test).

    Each length draws its own `sequences` sequences; a forward reads at most `token_budget` tokens
    (batch = token_budget // length, at least 1; longer sequences go through chunked prefill).
    """
    was_training = model.training
    model.eval()
    results = []
    for length in lengths:
        per_process = math.ceil(sequences / env.world_size)
        batch_size = max(1, min(per_process, token_budget // length))
        correct = torch.zeros((), dtype=torch.float64, device=env.device)
        done = 0
        for i in range(math.ceil(per_process / batch_size)):
            # Seeded by (length, process, batch): a fixed set for a given number of processes.
            n = min(batch_size, per_process - done)
            batch = task.sample(
                n, generator(seed, f"length-{length}-{env.rank}", i), seq_len=length
            )
            batch = batch.to(env.device)
            with autocast(env.device, precision):
                logits = last_token_logits(model, batch.inputs, chunk=token_budget)
            correct += (logits.float().argmax(-1) == batch.targets[:, -1]).sum()
            done += n
        total = torch.tensor(float(done), dtype=torch.float64, device=env.device)
        all_reduce_sum(correct, env)
        all_reduce_sum(total, env)
        results.append(
            {
                "length": length,
                "accuracy": correct.item() / total.item(),
                "sequences": int(total.item()),
            }
        )
    model.train(was_training)
    return results
