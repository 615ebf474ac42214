import sys, torch
from mamba_compiled.tasks.selective_copying import SelectiveCopying
from mamba_compiled.tasks.batch import Batch, IGNORE
from mamba_compiled.training import make_config, train

def sample(self, batch_size, generator, seq_len=None):
    L = self.seq_len if seq_len is None else seq_len
    M = self.num_tokens; P = L - M
    data = torch.randint(1, self.vocab_size - 1, (batch_size, M), generator=generator)
    positions = torch.rand(batch_size, P, generator=generator).topk(M, dim=1).indices.sort(dim=1).values
    region = torch.full((batch_size, P), 0, dtype=torch.long)
    region.scatter_(1, positions, data)
    inputs = torch.cat([region, torch.full((batch_size, M), self.separator, dtype=torch.long)], 1)
    targets = torch.full((batch_size, L), IGNORE, dtype=torch.long)
    targets[:, P:] = data
    return Batch(inputs, targets)
if sys.argv[7] == "markers":
    SelectiveCopying.sample = sample
L, lr, wd, beta2, steps, out = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
c = make_config("selective-copying", "paper", seq_len=L, lr=lr, weight_decay=wd, beta2=beta2, steps=steps,
                eval_every=250, ckpt_every=0, log_every=50, eval_sequences=256, device="cpu",
                progress=False, out_dir=out)
train(c, overwrite=True)
