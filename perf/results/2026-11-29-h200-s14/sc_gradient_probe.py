import torch, sys
import torch.nn.functional as F
from mamba_compiled.training import make_config, build_task, model_config
from mamba_compiled.models.lm import MambaLMHeadModel
torch.manual_seed(0)
g = torch.Generator().manual_seed(1)
for L in [int(x) for x in sys.argv[1:]]:
    c = make_config("selective-copying", "paper", seq_len=L, device="cpu")
    task = build_task(c)
    model = MambaLMHeadModel(model_config(c, c.vocab_size))
    b = task.sample(8, g)
    emb = model.backbone.embedding if hasattr(model, "backbone") else None
    store = {}
    def hook(m, i, o):
        o.retain_grad(); store['e'] = o
    h = emb.register_forward_hook(hook)
    logits = model(b.inputs).logits.float()
    loss = F.cross_entropy(logits.flatten(0,1), b.targets.flatten(), ignore_index=-100)
    loss.backward(); h.remove()
    gr = store['e'].grad.norm(dim=-1)  # (b, L)
    P = L - 16
    data = (b.inputs[:, :P] != 0)
    gd = gr[:, :P][data]; gn = gr[:, :P][~data]
    pos = torch.nonzero(data)[:,1]
    dist = P - pos
    # grad by distance bins
    bins = [0, 64, 256, 1024, 4096, 1<<20]
    s = []
    for lo, hi in zip(bins, bins[1:]):
        m = (dist >= lo) & (dist < hi)
        if m.any(): s.append(f"[{lo},{hi}): {gd[m].mean():.2e} (n={int(m.sum())})")
    print(f"L={L} loss={loss.item():.4f} data grad mean {gd.mean():.2e} noise {gn.mean():.2e}; by distance: " + "; ".join(s))
    # parameter grads
    for n, p in model.named_parameters():
        if 'dt_proj.bias' in n or 'A_log' in n:
            print("   ", n, f"{p.grad.abs().mean():.2e}")
