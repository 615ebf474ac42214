"""Where an Induction Heads model fails at long lengths: accuracy by the distance between the
induction pair and the query (a diagnostic; perf/NOTES.md, Run 17).

    python perf/ih_errors.py runs/ih-paper --lengths 2^18,2^20 --sequences 256 --out DIR

The same sequences as `mamba-compiled eval --lengths` with the run's seed (length_sweep's
streams), read one by one: for each, the gap from the first special token to the query, and
whether the answer was right. Writes ih_errors.json and prints accuracy by gap quartile.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

import torch

from mamba_compiled import checkpointing
from mamba_compiled.cli import _lengths
from mamba_compiled.evaluation import autocast, last_token_logits
from mamba_compiled.models import MambaLMHeadModel
from mamba_compiled.tasks import generator
from mamba_compiled.training import TrainConfig, build_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=pathlib.Path)
    p.add_argument("--lengths", type=_lengths, default=[2**18, 2**20])
    p.add_argument("--sequences", type=int, default=256)
    p.add_argument("--token-budget", type=int, default=1 << 20)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args()
    step_dir = checkpointing.resolve(args.run)
    config = TrainConfig(**checkpointing.load_trainer_state(step_dir)["config"])
    task = build_task(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = MambaLMHeadModel.from_pretrained(step_dir / checkpointing.MODEL_DIR, device=device)
    model.eval()
    rows = []
    for length in args.lengths:
        batch_size = max(1, min(args.sequences, args.token_budget // length))
        done = 0
        for i in range(math.ceil(args.sequences / batch_size)):
            n = min(batch_size, args.sequences - done)
            batch = task.sample(n, generator(config.seed, f"length-{length}-0", i), seq_len=length)
            special = task.special
            first = (batch.inputs[:, :-1] == special).int().argmax(1)  # the pair's position
            inputs = batch.inputs.to(device)
            with torch.no_grad(), autocast(device, args.precision):
                logits = last_token_logits(model, inputs, chunk=args.token_budget).float()
            right = (logits.argmax(-1).cpu() == batch.targets[:, -1]).tolist()
            for g, r in zip((length - 1 - first).tolist(), right, strict=True):
                rows.append({"length": length, "gap": g, "right": bool(r)})
            done += n
        sub = sorted((r for r in rows if r["length"] == length), key=lambda r: r["gap"])
        quarters = [sub[k * len(sub) // 4 : (k + 1) * len(sub) // 4] for k in range(4)]
        parts = [
            f"gap <= {q[-1]['gap']:>8}: {100 * sum(r['right'] for r in q) / len(q):6.2f} %"
            for q in quarters
            if q
        ]
        acc = 100 * sum(r["right"] for r in sub) / len(sub)
        print(f"length {length}: {acc:.2f} % of {len(sub)}; by gap quartile: " + "; ".join(parts))
        wrong = [r["gap"] for r in sub if not r["right"]]
        print(f"  wrong at gaps {wrong}", flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ih_errors.json").write_text(json.dumps(rows) + "\n")


if __name__ == "__main__":
    main()
