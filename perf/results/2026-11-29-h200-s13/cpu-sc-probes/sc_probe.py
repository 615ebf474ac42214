import sys
from mamba_compiled.training import make_config, train
L, lr, wd, beta2, steps, out = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
c = make_config("selective-copying", "paper", seq_len=L, lr=lr, weight_decay=wd, beta2=beta2, steps=steps,
                eval_every=250, ckpt_every=0, log_every=50, eval_sequences=256, device="cpu",
                progress=False, out_dir=out)
train(c, overwrite=True)
