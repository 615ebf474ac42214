"""The main job: train a small Selective Copying model, evaluate, checkpoint, export, generate.

Runs the `selective-copying` task's `cpu` preset with the compiled model (on the GPU when there
is one), then

    1. reports its accuracy on answer positions of 1024 new test sequences (a stream the training
       never evaluated on: the preset stops early once its own evaluation set reaches 99 %); the
       job fails (status 1) below --min-accuracy, 95 % by default,
    2. keeps the final checkpoint (model in mamba_ssm format, optimizer, scheduler, RNG states),
    3. exports the checkpoint with torch.export (dynamic batch and length), loads the program back
       and checks its logits against the model's,
    4. generates greedily from new prompts (noise with data tokens, then the separator) and shows
       the tokens the model copies under the ones it had to copy.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

TEST_SEQUENCES = 1024


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/demo"),
        help="run directory (replaced if it exists; default runs/demo)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--steps", type=int, default=None, help="at most this many (default: preset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--min-accuracy",
        type=float,
        default=0.95,
        help="exit with status 1 below this test accuracy (default 0.95)",
    )
    p.add_argument("--samples", type=int, default=4, help="prompts to generate from")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="PyTorch intra-op threads on CPU (default 1: this model's ops are too small for "
        "more to pay; see docs/training.md)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    from mamba_compiled import distributed
    from mamba_compiled.evaluation import eval_batches, evaluate
    from mamba_compiled.export import export_model
    from mamba_compiled.models import MambaLMHeadModel
    from mamba_compiled.tasks import generator
    from mamba_compiled.training import build_task, make_config, train

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    if not 0 <= args.min_accuracy <= 1:
        raise ValueError(f"--min-accuracy must be in [0, 1], got {args.min_accuracy}")
    if args.samples < 1:
        raise ValueError(f"--samples must be positive, got {args.samples}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be positive, got {args.threads}")
    t0 = time.perf_counter()
    device = distributed.resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    overrides = {
        "out_dir": str(args.out),
        "device": device.type,
        "seed": args.seed,
        "progress": args.progress,
    }
    if args.steps is not None:
        overrides["steps"] = args.steps
        overrides["warmup_steps"] = min(args.steps, 20)
    config = make_config("selective-copying", "cpu", **overrides)
    task = build_task(config)
    where = f"{device.type}" + (
        f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
    )
    print(
        f"[1/4] training ({where}): selective copying, {config.num_tokens} data tokens at random "
        f"positions among {config.seq_len - config.num_tokens}, vocabulary {config.vocab_size}; "
        f"{config.n_layer} Mamba layers of d_model {config.d_model}, compiled",
        flush=True,
    )
    summary = train(config, overwrite=True)
    train_s = time.perf_counter() - t0

    env = distributed.DistEnv(0, 1, 0, device, initialized=False)
    checkpoint = Path(summary["checkpoint"])
    model_dir = checkpoint / "model"
    model = MambaLMHeadModel.from_pretrained(model_dir, device=device).eval()
    test = evaluate(model, eval_batches(task, TEST_SEQUENCES, 256, args.seed, env, "test"), env)
    accuracy = test["accuracy"]
    print(
        f"      {summary['steps']} steps in {train_s:.0f} s (the first, compiling: "
        f"{summary['first_step_s']:.0f} s); accuracy on {test['sequences']} new test sequences "
        f"{100 * accuracy:.2f}% ({100 * test['seq_accuracy']:.1f}% copied entirely)",
        flush=True,
    )
    print(f"[2/4] checkpoint: {checkpoint} (model: {model_dir})", flush=True)

    t = time.perf_counter()
    program = export_model(model)
    exported = args.out / "model.pt2"
    torch.export.save(program, exported)
    loaded = torch.export.load(exported).module()
    batch = task.sample(args.samples, generator(args.seed, "demo", 0)).to(device)
    with torch.no_grad():
        diff = (loaded(batch.inputs).logits - model(batch.inputs).logits).abs().max().item()
    print(
        f"[3/4] exported: {exported} ({time.perf_counter() - t:.1f} s); reloaded, its logits "
        f"differ from the model's by at most {diff:.1e}",
        flush=True,
    )

    t = time.perf_counter()
    prompt, answer = task.split_for_generation(batch)
    out = model.generate(prompt, max_new_tokens=answer.shape[1], temperature=0.0)
    copied = out[:, prompt.shape[1] :]
    right = (copied == answer).sum().item()
    print(
        f"[4/4] generated greedily from {prompt.shape[0]} new prompts "
        f"({time.perf_counter() - t:.1f} s): {right}/{answer.numel()} tokens copied right",
        flush=True,
    )
    for i in range(prompt.shape[0]):
        print(
            f"      prompt  {' '.join(str(v) for v in prompt[i].tolist())}\n"
            f"      data    {' '.join(str(v) for v in answer[i].tolist())}   copied  "
            f"{' '.join(str(v) for v in copied[i].tolist())}"
        )
    total = time.perf_counter() - t0
    ok = accuracy >= args.min_accuracy
    verdict = "passed" if ok else f"FAILED (below {100 * args.min_accuracy:g}%)"
    print(
        f"main job {verdict}: test accuracy {100 * accuracy:.2f}%, {total:.0f} s in all", flush=True
    )
    return 0 if ok else 1
