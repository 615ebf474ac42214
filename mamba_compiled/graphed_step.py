"""The training step as one CUDA graph (`TrainConfig.cuda_graph`, `train --cuda-graph`).

Small models are host-bound: the paper's Induction Heads model (2 layers of width 64, 8 x 256
tokens) spends 6.5 ms of host time launching about 0.4 ms of GPU work per step. Replaying a
captured graph costs microseconds, so the step runs at the GPU's speed.

Captured: each micro-batch's forward and backward (the compiled objective), the sums of loss and
answer statistics, gradient clipping, and AdamW (capturable; its learning rate is a device tensor
that the scheduler fills between replays). Outside: sampling the batch (copied into the graph's
static input buffers), the scheduler, logging, evaluation, checkpoints.

Capturing needs the kernels compiled and AdamW's state allocated first, so `GraphedStep` runs
`WARMUP` real steps on a side stream (PyTorch's recipe for whole-network capture) and then puts
the parameters and the optimizer state back as they were: the graphed run takes the same steps
as an ungraphed one from the same state, and a resumed run continues where it stopped.

One process only (no DDP or FSDP: their communication would have to be captured too).
"""

from __future__ import annotations

import torch
from torch import nn

from mamba_compiled.evaluation import autocast
from mamba_compiled.tasks import Batch

WARMUP = 2  # real steps before the capture: the first compiles, the second runs compiled


class GraphedStep:
    """Replays one optimizer step of `train_module` + `optimizer` on the batches it is given.

    micro_batches x micro_batch rows of seq_len tokens per step; grad_clip 0 disables clipping.
    `step(share, scale)` returns (loss_sum, stats, grad_norm): device tensors that the next
    step overwrites (read or accumulate them before calling it again).
    """

    def __init__(
        self,
        train_module: nn.Module,
        optimizer: torch.optim.Optimizer,
        micro_batches: int,
        micro_batch: int,
        seq_len: int,
        grad_clip: float,
        device: torch.device,
    ):
        if device.type != "cuda":
            raise ValueError(f"cuda_graph needs a CUDA device, got {device}")
        for group in optimizer.param_groups:
            if not (group.get("capturable") and isinstance(group["lr"], torch.Tensor)):
                raise ValueError("cuda_graph needs a capturable optimizer with a tensor lr")
        self.module, self.optimizer = train_module, optimizer
        self.grad_clip = grad_clip
        self.params = [p for p in train_module.parameters() if p.requires_grad]
        shape = (micro_batches, micro_batch, seq_len)
        self.inputs = torch.zeros(shape, dtype=torch.long, device=device)
        self.targets = torch.zeros(shape, dtype=torch.long, device=device)
        self.scale = torch.zeros((), device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _body(self):
        loss_sum = torch.zeros((), device=self.scale.device)
        stats = torch.zeros(4, dtype=torch.float64, device=self.scale.device)
        for inputs, targets in zip(self.inputs, self.targets, strict=True):
            with autocast(self.scale.device):
                micro_loss, micro_stats = self.module(inputs, targets)
            (micro_loss * self.scale).backward()
            loss_sum += micro_loss.detach()
            stats += micro_stats
        if self.grad_clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        else:
            grad_norm = torch.zeros((), device=self.scale.device)
        self.optimizer.step()
        return loss_sum, stats, grad_norm

    def _load(self, share: Batch, scale: float) -> None:
        shape = self.inputs.shape
        self.inputs.copy_(share.inputs.reshape(shape).pin_memory(), non_blocking=True)
        self.targets.copy_(share.targets.reshape(shape).pin_memory(), non_blocking=True)
        self.scale.fill_(scale)

    def _capture(self) -> None:
        saved_params = [p.detach().clone() for p in self.params]
        saved_state = {
            p: {k: v.clone() for k, v in self.optimizer.state[p].items()}
            for p in self.params
            if p in self.optimizer.state
        }
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                self.optimizer.zero_grad(set_to_none=True)
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        # back to the state before the warm-up steps (in place: the graph keeps these addresses)
        with torch.no_grad():
            for p, saved in zip(self.params, saved_params, strict=True):
                p.copy_(saved)
            for p in self.params:
                for k, v in self.optimizer.state[p].items():
                    if p in saved_state:
                        v.copy_(saved_state[p][k])
                    else:  # AdamW's state starts at zero (step count and both moments)
                        v.zero_()
        self.optimizer.zero_grad(set_to_none=True)  # gradients are allocated in the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self._body()

    def step(self, share: Batch, scale: float):
        """One optimizer step on `share` (micro_batches x micro_batch rows, on the CPU), its loss
        multiplied by `scale` before the backward."""
        self._load(share, scale)
        if self.graph is None:
            self._capture()  # warms up on this batch, then captures (the capture runs nothing)
        self.graph.replay()
        return self.outputs
