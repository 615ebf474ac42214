"""What the compiled training objective keeps for its backward, per distinct storage (no GPU).

    python perf/saved_activations.py                       # 1.4B's widths, 2 layers, 1 x 512
    python perf/saved_activations.py --model 130m --tokens 2048

Compiles the training objective (model + cross-entropy, fullgraph, bf16 autocast on CPU) with AOT
autograd and Inductor's partitioner (min-cut rematerialization), runs one forward, and lists the
forward graph's saved outputs grouped by storage (views of one tensor count once; parameters are
left out), largest first. Token-dependent sizes scale linearly: multiply by the training batch's
tokens / --tokens and by n_layer / --layers to estimate a full model's activation memory. The
CPU scan saves fp32 checkpoints every 8 steps, like the CUDA one for fp32 inputs; for 16-bit
inputs the CUDA checkpoints are bf16 (`lowering.common.checkpoint_dtype`): halve those rows. The
rest matches the GPU's up to the partitioner's device-dependent choices.
"""

from __future__ import annotations

import argparse

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition

from mamba_compiled.models import MambaConfig, MambaLMHeadModel, set_recompute
from mamba_compiled.training import Objective


def saved_storages(model: MambaLMHeadModel, batch: int, seqlen: int) -> list[tuple[int, list]]:
    """[(bytes, [(graph name, shape, dtype), ...]), ...] of the storages saved for backward."""
    captured = {}

    def fw_compiler(gm, example_inputs):
        output = next(n for n in gm.graph.nodes if n.op == "output")
        names = [getattr(v, "name", str(v)) for v in output.args[0]]

        def run(*args):
            outs = gm.forward(*args)
            captured["outs"] = list(zip(names, outs, strict=True))
            return outs

        return run

    backend = aot_autograd(
        fw_compiler=fw_compiler,
        bw_compiler=lambda gm, example_inputs: gm.forward,
        partition_fn=min_cut_rematerialization_partition,
    )
    objective = torch.compile(Objective(model), backend=backend, fullgraph=True)
    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen + 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        objective(ids[:, :-1], ids[:, 1:])
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, tuple[int, list]] = {}
    for name, t in captured["outs"][2:]:  # after the objective's two outputs
        if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in params:
            continue
        s = t.untyped_storage()
        entry = storages.setdefault(s.data_ptr(), (s.nbytes(), []))
        entry[1].append((name, tuple(t.shape), str(t.dtype).removeprefix("torch.")))
    return sorted(storages.values(), key=lambda e: -e[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="1.4b", help="named size whose widths to use")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=512, help="sequence length")
    p.add_argument("--min-mb", type=float, default=1.0, help="list storages from this size")
    p.add_argument("--recompute", action="store_true", help="models.set_recompute")
    args = p.parse_args()
    config = MambaConfig.from_name(args.model, n_layer=args.layers, vocab_size=256)
    model = set_recompute(MambaLMHeadModel(config), args.recompute)
    storages = saved_storages(model, args.batch, args.tokens)
    print(
        f"{args.model} widths, {args.layers} layers, {args.batch} x {args.tokens} tokens, bf16"
        f"{', recompute' if args.recompute else ''}"
    )
    for nbytes, views in storages:
        if nbytes >= args.min_mb * 1e6:
            names = "; ".join(f"{n}{list(s)} {d}" for n, s, d in views[:3])
            print(f"{nbytes / 1e6:8.2f} MB  {names}")
    total = sum(nbytes for nbytes, _ in storages)
    print(f"total {total / 1e6:.1f} MB in {len(storages)} storages (parameters excluded)")


if __name__ == "__main__":
    main()
