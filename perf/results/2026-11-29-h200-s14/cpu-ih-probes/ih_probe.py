import sys, torch
from mamba_compiled.tasks.induction_heads import InductionHeads
from mamba_compiled.tasks.batch import Batch, IGNORE
from mamba_compiled.training import make_config, train
mode, seed, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 2000
orig = InductionHeads.sample
def sample(self, batch_size, generator, seq_len=None):
    b = orig(self, batch_size, generator, seq_len)
    if seq_len is None:  # training batches (the length sweep passes seq_len)
        t = torch.full_like(b.targets, IGNORE)
        t[:, :-1] = b.inputs[:, 1:]
        t[:, -1] = b.targets[:, -1]
        return Batch(b.inputs, t)
    return b
if mode == "all":
    InductionHeads.sample = sample
c = make_config("induction-heads", "cpu", seed=seed, steps=steps, device="cpu", progress=False,
                out_dir=out, eval_lengths=[2**k for k in range(6, 15)], eval_every=500)
train(c, overwrite=True)
