"""Data parallelism on torch.distributed: torchrun's environment, DDP, FSDP2 and compile order.

Launched by `torchrun` (RANK, WORLD_SIZE and LOCAL_RANK in the environment) the trainer joins a
process group: NCCL on CUDA, gloo on CPU. Every process builds the same model from the same seed,
then `wrap` turns it into a data-parallel one:

    DDP    the training objective is wrapped in DistributedDataParallel, then compiled inside it
           (Dynamo's DDP optimizer splits the graph at the gradient buckets so that their
           all-reduces overlap the backward); gradients are averaged over processes.
    FSDP2  `fully_shard` on each Mamba block and on the language model (parameters sharded over
           processes, gathered block by block); each block is compiled on its own, as torchtitan
           does, so that FSDP's hooks stay outside the compiled graphs.

Without torchrun nothing is initialized and the objective is compiled as one graph (fullgraph).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized: bool  # whether this process joined a process group (launched by torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """ "auto" is CUDA when a GPU is visible, else CPU; "cuda" without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible (torch {torch.__version__})")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    return device


def init(device: str = "auto") -> DistEnv:
    """Join torchrun's process group if launched by torchrun; otherwise a single process."""
    base = resolve_device(device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv(0, 1, 0, base, initialized=False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if base.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                "visible; launch at most that many processes per node (--nproc-per-node)"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("gloo")
    return DistEnv(rank, world, local_rank, dev, initialized=True)


def shutdown(env: DistEnv) -> None:
    if env.initialized and dist.is_initialized():
        # every rank done with its collectives first: a rank tearing gloo down while another
        # still talks to it aborted now and then ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.initialized:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum over processes, in place; returns `t`."""
    if env.initialized and env.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_process(flag: bool, env: DistEnv) -> bool:
    """True on every process when `flag` is true on any (e.g. a time limit seen by rank 0)."""
    if not (env.initialized and env.world_size > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def wrap(
    objective: nn.Module,
    env: DistEnv,
    fsdp: bool,
    compile: bool,
    bucket_cap_mb: float | None = None,
) -> nn.Module:
    """Compile and parallelize `objective`, whose language model is `objective.model`.

    Returns the module to call for training; its parameters are the ones to optimize.
    `bucket_cap_mb`: DDP's gradient bucket size in MiB. None: one bucket for every gradient
    when compiled, DDP's default (25) otherwise. Compiled inside DDP, Dynamo's DDP optimizer
    splits the graph at every bucket boundary, and on two H200s the splits cost more than the
    overlap they buy (sixteenth session, 130M at 8 x 2048 per GPU, against one GPU: 25 MB
    1.32x, 100 MB 1.50x, 200 MB 1.75x, one bucket 1.92x).
    """
    if fsdp:
        if not env.initialized:
            raise ValueError("--fsdp needs a process group: launch with torchrun")
        from torch.distributed.fsdp import fully_shard

        blocks = objective.model.backbone.layers
        for i, block in enumerate(blocks):
            if compile:
                block = torch.compile(block, fullgraph=True)
                blocks[i] = block
            fully_shard(block)
        fully_shard(objective.model)  # the rest: embedding (tied to the LM head), final norm
        return objective
    if env.initialized and env.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [env.device.index] if env.device.type == "cuda" else None
        # gradients live in the communication buckets: no copy into them before each all-reduce
        if bucket_cap_mb is None and compile:  # one bucket: no graph splits (see above)
            grad_bytes = sum(p.numel() * p.element_size() for p in objective.parameters())
            bucket_cap_mb = grad_bytes / 2**20 + 1
        buckets = {} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb}
        ddp = DDP(objective, device_ids=device_ids, gradient_as_bucket_view=True, **buckets)
        if compile:
            # Compiled inside DDP: Dynamo's DDP optimizer splits the objective's graph at the
            # gradient buckets, so that each bucket's all-reduce overlaps the rest of the
            # backward (compiled outside DDP, all gradients arrive at the end of one backward:
            # 1.83x on 2 H200s). Not fullgraph: Dynamo never traces DDP's own forward wrapper
            # (it skips `_inside_ddp_forward` by design). The objective itself compiles with
            # fullgraph=True in one process (the path below, and the tests).
            ddp.compile()
        return ddp
    if compile:
        objective.compile(fullgraph=True)
    return objective


def reshard(module: nn.Module) -> None:
    """Free FSDP2's gathered parameters after a forward without backward (evaluation): the root
    keeps its parameters gathered after forward, expecting the backward that eval never runs."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def gradient_sync(module: nn.Module, sync: bool):
    """A context in which backward does (sync=True) or skips (gradient accumulation) the
    cross-process gradient reduction."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(module, DDP):
        return contextlib.nullcontext() if sync else module.no_sync()
    for m in module.modules():  # the outermost FSDP2 module; the setting applies to those inside
        if hasattr(m, "set_requires_gradient_sync"):
            m.set_requires_gradient_sync(sync)
            break
    return contextlib.nullcontext()
