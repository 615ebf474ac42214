"""Where an Induction Heads model loses its memory of the induction pair (a diagnostic;
perf/NOTES.md, Run 18). Runs on CPU in a few seconds per 2^16 tokens.

    python perf/ih_memory.py runs/ih-paper --length 2^20 --index 5,28 [--threshold 0.3]

For each sequence (the same ones as `perf/ih_errors.py` and the run's length sweep: stream
"length-<L>-0" of the run's seed, batch 1 from 2^20 tokens on), in the last layer:

- writers: the channels whose step Δ = softplus(dt) is large (> 5) one to three steps after the
  first special token, where the pair is stored;
- memory channels: those writers whose Σ Δ·min|A| over the rest of the sequence stays < 100;
- spikes: positions in the gap where Δ on a memory channel exceeds --threshold, each with the
  tokens before it. exp(-Δ·|A|) of the state survives such a step: a large one erases the pair.

It also counts the last four tokens before every spike, to show which local patterns open the
gate. The thresholds (Δ > 5 at the write, Σ Δ·|A| < 100) fit seed 0's run; seed 6 stores the
pair with smaller steps and shows no memory channel by them.
"""

from __future__ import annotations

import argparse
import collections
import pathlib

import torch
import torch.nn.functional as F

from mamba_compiled import checkpointing
from mamba_compiled.cli import _lengths
from mamba_compiled.models import MambaLMHeadModel
from mamba_compiled.models import mamba as mamba_module
from mamba_compiled.tasks import generator
from mamba_compiled.training import TrainConfig, build_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=pathlib.Path)
    p.add_argument("--length", type=lambda s: _lengths(s)[0], default=1 << 16)
    p.add_argument("--index", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    p.add_argument("--sequences", type=int, default=512, help="as in the sweep they came from")
    p.add_argument("--token-budget", type=int, default=1 << 20)
    p.add_argument("--threshold", type=float, default=0.3)
    args = p.parse_args()
    step_dir = checkpointing.resolve(args.run)
    config = TrainConfig(**checkpointing.load_trainer_state(step_dir)["config"])
    task = build_task(config)
    model = MambaLMHeadModel.from_pretrained(step_dir / checkpointing.MODEL_DIR).eval()
    mixers = [m for m in model.modules() if isinstance(m, mamba_module.Mamba)]
    last = mixers[-1]
    captured: list[torch.Tensor] = []
    projections = mamba_module.Mamba._conv_and_projections

    def capture(self, x, conv_state, mask):
        out = projections(self, x, conv_state, mask)
        if self is last:
            captured.append(out[2])  # dt without its bias, (E, b*l)
        return out

    mamba_module.Mamba._conv_and_projections = capture
    L = args.length
    batch_size = max(1, min(args.sequences, args.token_budget // L))  # ih_errors' batches
    patterns: collections.Counter = collections.Counter()
    for index in args.index:
        draw, row = divmod(index, batch_size)
        batch = task.sample(batch_size, generator(config.seed, f"length-{L}-0", draw), seq_len=L)
        tokens = batch.inputs[row : row + 1]
        captured.clear()
        with torch.no_grad():
            logits = model(tokens).logits[0, -1].float()
        seq, answer = tokens[0], batch.targets[row, -1].item()
        first = int((seq[:-1] == task.special).int().argmax())
        delta = F.softplus(captured[0].double() + last.dt_proj.bias.double()[:, None])  # (E, L)
        min_a = torch.exp(last.A_log.double()).min(1).values
        written = delta[:, first + 1 : first + 4].max(1).values
        decay = delta[:, first + 4 : L - 1].sum(1) * min_a
        memory = [c for c in range(delta.shape[0]) if written[c] > 5 and decay[c] < 100]
        gap = delta[memory, first + 4 : L - 1]
        spikes = (gap > args.threshold).any(0).nonzero().flatten().tolist()
        other = logits.clone()
        other[answer] = -float("inf")
        print(
            f"sequence {index}: gap {L - 1 - first}, answer {answer}, "
            f"{'right' if logits.argmax().item() == answer else 'wrong'}, "
            f"margin {(logits[answer] - other.max()).item():.2f}; memory channels {memory}; "
            f"{len(spikes)} spikes"
        )
        for s in spikes:
            t = first + 4 + s
            hit = [memory[j] for j in (gap[:, s] > args.threshold).nonzero().flatten().tolist()]
            patterns[tuple(seq[t - 3 : t + 1].tolist())] += 1
            before = seq[t - 8 : t + 1].tolist()
            print(f"  t {t}: Δ max {gap[:, s].max().item():.2f} on {hit}, tokens {before}")
    print("last four tokens before a spike, most common:", patterns.most_common(8))


if __name__ == "__main__":
    main()
