"""Pieces shared by the Triton kernels: math helpers, scan combiners, launch configurations.

Imports triton: only the launchers import this module, and only when a tensor reaches them.

The scan kernels work on tiles in a 4-d frame (T, N_A, BD, N_B):

    T     time steps of one chunk                 held in registers, one thread sees all of them
    N_A   state indices held by one thread         so most of the sum over the state is in-thread
    BD    channels of the program                  spread over lanes and warps
    N_B   state indices spread over lanes          N = N_A * N_B (dstate padded to a power of two)

Triton's default layout fills lanes from the last axis backwards (N_B, then BD), puts the warps
on BD and leaves N_A and T in registers. So the scan along T runs sequentially inside each
thread (no shuffles), and Σ_n needs only log2(N_B) shuffle rounds for N_A·T values.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton
from triton.language.extra import libdevice

LOG2E = tl.constexpr(1.4426950408889634)


LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def log2(x, FAST: tl.constexpr):
    """log2; FAST: libdevice's fast_log2f, the special-function unit's lg2.approx (2^-22 relative
    error), instead of the 30-instruction polynomial. (Not inline PTX: see `traced`.) The
    interpreter has no libdevice: FAST=False there."""
    if FAST:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def softplus(x, FAST: tl.constexpr):
    """softplus(x) = log(1 + e^x), = x above 20 (as mamba_ssm); e^x below -9 where log(1 + e^x)
    would lose digits to the rounding of 1 + e^x."""
    e = tl.exp2(x * LOG2E)
    return tl.where(x > 20.0, x, tl.where(x < -9.0, e, log2(1.0 + e, FAST) * LN2))


@triton.jit
def sigmoid(x):
    return tl.fdiv(1.0, 1.0 + tl.exp2(-x * LOG2E))


@triton.jit
def linear_combine(a1, b1, a2, b2):
    """(a1, b1) then (a2, b2) for h -> a·h + b: the composition is h -> a1·a2·h + (a2·b1 + b2)."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def shifted_combine(l1, p1, s1, l2, p2, s2):
    """Combiner for x_s = b_s + a_{s-1}·x_{s-1} as a forward scan over leaves (a_s, 1, b_s).

    The backward's adjoint dh_t = C_t·dy_t + Ā_{t+1}·dh_{t+1} is this recurrence on time-flipped
    tiles (tl.flip along an in-thread axis costs nothing; Triton's reverse=True scan shuffles
    every value across lanes even when the axis is in registers).
    A segment [i, j] is (L, P, S): L = a_j, P = a_i···a_{j-1}, S = Σ_s b_s·a_s···a_{j-1}.
    Joining [i, m] and [m+1, j]: L = L2, P = P1·L1·P2, S = S1·L1·P2 + S2. The shifted a_{s-1}
    comes from the neighbouring leaf's L, so no shifted load or second exp is needed; with the
    axis in registers P2 = 1 folds away and each step is one FMA.
    """
    k = l1 * p2
    return l2, p1 * k, s1 * k + s2


@triton.jit
def take_ticket(sync_ptr, n_seg, n_dblk, batch):
    """(channel block, batch element (int64), segment) of this program. With segments, programs
    take tickets from a counter (sync_ptr[0]) in the order they start, segment-major: a program
    then only waits for programs that started before it, whatever order the hardware starts
    them in. Without segments, the program id (no atomics)."""
    if n_seg > 1:
        k = tl.atomic_add(sync_ptr, 1)
    else:
        k = tl.program_id(0)
    rest = k // n_dblk
    return k % n_dblk, (rest % batch).to(tl.int64), rest // batch


@triton.jit
def wait_for(flag_ptr):
    """Spin until another program has published at flag_ptr (acquire: its writes are visible
    after this; read them with cache_modifier=".cg", the L1 is not coherent)."""
    while tl.atomic_add(flag_ptr, 0, sem="acquire") == 0:
        pass
    tl.debug_barrier()


@triton.jit
def publish(flag_ptr):
    """Set the flag after this program's stores: a barrier (every thread's stores are ordered
    before it), then one release exchange at GPU scope, which is cumulative over them: the
    pattern of CUDA's cooperative grid sync (__syncthreads, then one thread's fence and atomic).
    No inline PTX fence: see `traced`."""
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptr, 1, sem="release")


@triton.jit
def _boundary(j, first, per):
    """Where segment j starts, in chunks counted in look-back order: segment 0 has `first`
    chunks, the others `per`."""
    return tl.minimum(j, 1) * (first + (j - 1) * per)


@triton.jit
def local_range(k, n_seg, first, per, balance):
    """(lo, mid, hi): the chunks [lo, hi) (look-back order) that the program of look-back
    position k scans from the zero state before the chain, and mid, where its own segment
    starts (lo <= mid <= hi).

    The chain needs the aggregate of everything before the last segment: chunks [0, total),
    total = the start of segment n_seg - 1. Balanced (balance = 1): the programs share it
    evenly, each about (n_seg - 1) / n_seg of a segment, program k's share straddling its own
    segment's start (the tail of segment k - 1, the head of segment k), so all of them reach
    the chain together. Otherwise program k scans segment k - 1 and program 0 nothing (the
    look-back until the seventeenth session, whose program 0 idled through the others' scans)."""
    total = _boundary(n_seg - 1, first, per)
    mid = _boundary(k, first, per)
    prev = _boundary(tl.maximum(k - 1, 0), first, per)
    nxt = tl.minimum(_boundary(k + 1, first, per), total)
    if balance != 0:
        lo = tl.minimum(tl.maximum(k * total // n_seg, prev), mid)
        hi = tl.minimum(tl.maximum((k + 1) * total // n_seg, mid), nxt)
    else:
        lo = prev
        hi = mid
    return lo, mid, hi


@triton.jit
def chain(k, first, h_a, dsum_a, h_b, dsum_b, A2_3, carry_ptr, step, smask3, flag, prev_flag):
    """The look-back's chain, after the local pass of `local_range`: h_a, h_b the end states
    of its chunks [lo, mid) and [mid, hi) from the zero state, dsum_a, dsum_b (1, BD) their ΣΔ.
    Waits for program k - 1 to publish the true state at lo (`first`, the state before
    everything, for k = 0), publishes the true state at hi for program k + 1, and returns the
    one at mid: this program's start state. States pass as exp2(A·log2e·ΣΔ)·h + h_loc.

    carry_ptr carries the program's (batch, state) offsets, step (int64) is one row of them.
    The read of another program's store goes through L2 (".cg"): the L1 is not coherent."""
    x = first
    if k > 0:
        wait_for(prev_flag)
        x = tl.load(carry_ptr + (k - 1) * step, mask=smask3, other=0.0, cache_modifier=".cg")
    start = tl.exp2(A2_3 * dsum_a[:, :, None]) * x + h_a
    end = tl.exp2(A2_3 * dsum_b[:, :, None]) * start + h_b
    tl.store(carry_ptr + k * step, end, mask=smask3)
    publish(flag)
    return start


@triton.jit
def _shfl_xor(x, M: tl.constexpr, LANE: tl.constexpr, FAST: tl.constexpr):
    """x (A0, A1, BD, N_B) as held by channel d ^ M. FAST: one butterfly shuffle with lane mask
    LANE (the lanes of a warp hold (BD, N_B) with N_B fastest, so channel bit M is lane bit
    M·N_B); else (the interpreter has no lanes) the same permutation along the channel axis."""
    if FAST:
        if LANE == 1:
            r = tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, 1, 0x1f, -1;", "=r,r", [x],
                                          dtype=tl.float32, is_pure=True, pack=1)  # fmt: skip
        elif LANE == 2:
            r = tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, 2, 0x1f, -1;", "=r,r", [x],
                                          dtype=tl.float32, is_pure=True, pack=1)  # fmt: skip
        elif LANE == 4:
            r = tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, 4, 0x1f, -1;", "=r,r", [x],
                                          dtype=tl.float32, is_pure=True, pack=1)  # fmt: skip
        elif LANE == 8:
            r = tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, 8, 0x1f, -1;", "=r,r", [x],
                                          dtype=tl.float32, is_pure=True, pack=1)  # fmt: skip
        else:
            tl.static_assert(LANE == 16)
            r = tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, 16, 0x1f, -1;", "=r,r", [x],
                                          dtype=tl.float32, is_pure=True, pack=1)  # fmt: skip
    else:
        BD: tl.constexpr = x.shape[2]
        src = tl.arange(0, BD)[None, None, None, :, None]
        dst = tl.arange(0, BD)[None, None, :, None, None]
        r = tl.sum(tl.where(src == (dst ^ M), x[:, :, None, :, :], 0.0), 3)
    return r


@triton.jit
def _rs_round(x, d, AXIS: tl.constexpr, M: tl.constexpr, LANE: tl.constexpr, FAST: tl.constexpr):
    """One round of a reduce-scatter across the channel pairs (d, d ^ M): x (A0, A1, BD, N_B) is
    halved along AXIS (0 or 1, held in registers); the channel with bit M set keeps the upper
    half, its partner the lower, and each adds the other's copy of the half it keeps."""
    A0: tl.constexpr = x.shape[0]
    A1: tl.constexpr = x.shape[1]
    BD: tl.constexpr = x.shape[2]
    NB: tl.constexpr = x.shape[3]
    if AXIS == 0:
        y = tl.permute(tl.reshape(x, (2, A0 // 2, A1, BD, NB)), (1, 2, 3, 4, 0))
    else:
        y = tl.permute(tl.reshape(x, (A0, 2, A1 // 2, BD, NB)), (0, 2, 3, 4, 1))
    lo, hi = tl.split(y)
    up = (d & M) != 0
    return tl.where(up, hi, lo) + _shfl_xor(tl.where(up, lo, hi), M, LANE, FAST)


@triton.jit
def sum_channels_scattered(x, FAST: tl.constexpr):
    """Σ_d of x (T, N_A, BD, N_B) over the BD channels of one warp, scattered over them (a
    butterfly reduce-scatter: log2(BD) rounds exchanging half of what is left, against log2(BD)
    rounds exchanging everything for tl.sum). Returns (r, t_off, na_off): r (T', N_A', BD, N_B)
    holds at (t, a, d, b) the sum for step t + t_off[d] and state index a + na_off[d] (N_A is
    halved first, then T), each (step, state) once. FAST (GPU) needs BD · N_B = 32, one warp."""
    BD: tl.constexpr = x.shape[2]
    d = tl.arange(0, BD)[None, None, :, None]
    t_off = d * 0
    na_off = d * 0
    # channel bits BD/2, BD/4, ..., 1 (BD <= 32); a bit of 0 is a stage that does nothing
    x, t_off, na_off = _rs_stage(x, d, t_off, na_off, BD // 2, FAST)
    x, t_off, na_off = _rs_stage(x, d, t_off, na_off, BD // 4, FAST)
    x, t_off, na_off = _rs_stage(x, d, t_off, na_off, BD // 8, FAST)
    x, t_off, na_off = _rs_stage(x, d, t_off, na_off, BD // 16, FAST)
    x, t_off, na_off = _rs_stage(x, d, t_off, na_off, BD // 32, FAST)
    return x, t_off, na_off


@triton.jit
def _rs_stage(x, d, t_off, na_off, M: tl.constexpr, FAST: tl.constexpr):
    NB: tl.constexpr = x.shape[3]
    if M >= 1:
        if x.shape[1] > 1:
            na_off += ((d & M) != 0).to(tl.int32) * (x.shape[1] // 2)
            x = _rs_round(x, d, 1, M, M * NB, FAST)
        else:
            t_off += ((d & M) != 0).to(tl.int32) * (x.shape[0] // 2)
            x = _rs_round(x, d, 0, M, M * NB, FAST)
    return x, t_off, na_off


def cdiv(a, b):
    """ceil(a / b) of host sizes (ints or SymInts). Launchers use this and `next_power_of_2`
    rather than triton's: those are constexpr functions, whose wrapper costs microseconds per
    call from host code (a third of scan_fwd's Python time went to nine such calls)."""
    return (a + b - 1) // b


def next_power_of_2(n):
    """The smallest power of two >= n, for host sizes (triton.next_power_of_2's arithmetic)."""
    n -= 1
    for shift in (1, 2, 4, 8, 16, 32):
        n |= n >> shift
    return n + 1


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def traced(t: Tensor) -> bool:
    """Whether a launcher is being traced (torch.compile, torch.export, AOTInductor: fake or
    functional tensors) rather than run in eager on real tensors.

    Only eager launches may use kernels with inline PTX (the backward's shuffle reduce-scatter):
    torch 2.11 cannot tell which arguments an inline-assembly kernel writes, assumes all, and
    Inductor then fails on the clones under dynamic shapes (seen on the H200). The traced variant
    computes the same sums with tl.sum.
    """
    return type(t) is not torch.Tensor


def launcher(kernel, like: Tensor):
    """`kernel` to index with a grid and call: through `wrap_triton` when traced (so that
    torch.compile, export and AOTInductor see the kernel), the JIT function itself in eager
    (the HOP and its wrapper added about 100 us of host time per call on the H200)."""
    return wrap_triton(kernel) if traced(like) else kernel


@dataclass(frozen=True)
class ScanConfig:
    """Launch configuration of one scan kernel. BD = channels per program, T = time steps per
    chunk, N_B = state lanes; num_warps and num_stages as Triton's. Segments: when batch ·
    channel blocks is under `target` programs, the sequence is cut into segments of at least
    `min_seg` steps run by separate programs (target 0: never), when target asks for at least
    `min_split` of them (3: not at 512-1023 programs for a target of 1024)."""

    BD: int
    T: int
    N_B: int
    num_warps: int
    num_stages: int = 1
    target: int = 0
    min_seg: int = 1024
    rs: bool = False  # backward: per-step dB/dC summed over channels by a reduce-scatter
    bc_f32: bool = False  # per-step B, C copied to fp32 by the launcher (see stage_bc)
    min_split: int = 2
    # registers per thread as ptxas' cap (Triton's maxnreg), in eager launches of at least
    # maxnreg_from programs per SM only: torch's wrap_triton takes num_warps and num_stages but
    # no maxnreg, so traced graphs keep the default
    maxnreg: int | None = None
    maxnreg_from: int = 0
    # forward: 1 = the next chunk's tiles loaded into registers by hand; k > 1 = Triton's
    # pipeliner copies the next k - 1 chunks' tiles into shared memory (cp.async) and reads them
    # from there in the compute layout (no register prefetch, no layout exchange per tile)
    pipe: int = 1
    # forward, N_B = 2: each state lane computes the softplus of half of a chunk's steps and the
    # two share them (scan_forward._delta_split), instead of both computing all of them
    sp_split: bool = False
    # segments: the look-back's local pass shared evenly by all of a block's programs
    # (`local_range`), instead of program k scanning segment k - 1
    balance: bool = True
    # forward, segments: the first segment head / 10 times as long as the others; its program
    # publishes its state seg_len steps before its end, during its full forward, and each other
    # program scans the seg_len steps before its own segment (`segments_with_head`). 0: the
    # look-back of `local_range`
    head: int = 0


def launch_options(cfg: ScanConfig, like: Tensor, programs: int) -> dict:
    """num_warps, num_stages and, in eager on CUDA from cfg.maxnreg_from programs per SM on,
    maxnreg for a launch of `programs` programs of `cfg` on 16-bit inputs `like` (fp32 tiles
    need the registers: 8x4096x2048 fp32 0.738 -> 1.208 ms capped at 128, fifteenth session)."""
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.maxnreg is None or traced(like) or interpreting() or like.element_size() > 2:
        return options
    if programs >= cfg.maxnreg_from * _sm_count(like.device.index or 0):
        options["maxnreg"] = cfg.maxnreg
    return options


def segments(programs, seqlen, cfg: ScanConfig, cap=None):
    """(n_seg, seg_len): the number of segments and their length in steps (a multiple of cfg.T),
    for `programs` = batch · channel blocks, at most `cap` segments when given. Integer
    arithmetic on sizes only (torch.sym_min / sym_max add no guards): batch and seqlen may be
    symbolic under torch.compile and export."""
    want = cdiv(cfg.target, programs)
    want = want * torch.sym_min(1, want // cfg.min_split)  # 0 (one segment) under min_split
    if cap is not None:
        want = torch.sym_min(want, cap)
    n_seg = torch.sym_max(1, torch.sym_min(want, cdiv(seqlen, cfg.min_seg)))
    seg_len = torch.sym_max(cdiv(cdiv(seqlen, n_seg), cfg.T) * cfg.T, cfg.T)
    return torch.sym_max(1, cdiv(seqlen, seg_len)), seg_len


def segments_with_head(programs, seqlen, cfg: ScanConfig):
    """(n_seg, seg_len, head_len, head): `segments`, and the forward's look-back with a long
    first segment (head, the kernel's HEAD) where cfg.head asks for it and there are several
    segments: head_len ≈ cfg.head / 10 · seg_len steps (multiples of cfg.T), the others
    seg_len, the last one ending at seqlen. Otherwise head_len = seg_len. Only for a number of
    segments known here: under torch.compile with a dynamic batch or seqlen (symbolic n_seg)
    the kernel takes the balanced look-back, which needs no branch on sizes."""
    n_seg, seg_len = segments(programs, seqlen, cfg)
    if not (cfg.head and isinstance(n_seg, int) and n_seg > 1):
        return n_seg, seg_len, seg_len, False
    n_chunks = cdiv(seqlen, cfg.T)
    per = min(max(1, n_chunks * 10 // (cfg.head + (n_seg - 1) * 10)), n_chunks // n_seg)
    return n_seg, per * cfg.T, (n_chunks - (n_seg - 1) * per) * cfg.T, True


# The checkpoint interval: the forward writes the state at the start of every CK steps, the
# backward walks back a chunk (CK steps, or half of them: `chunk_length`) at a time. It fixes
# the checkpoint tensor's shape, so it is a constant of the fwd/bwd contract, not a per-call
# choice. See perf/NOTES.md.
CK = 8
CK_INTERPRET = 4

_override: dict[str, object] = {}


def set_override(**kw) -> None:
    """For benchmarks sweeping configurations: fwd=ScanConfig, bwd=ScanConfig, ck=int,
    bc_atomics=bool, ck_fp32=bool, decode=(BD, num_warps) of the decode step's state
    update, conv={"fwd" | "g" | "dx": conv.ConvTiles}, bwd_resident=int (see
    `bwd_resident`). Call with no arguments to clear. Not for model code."""
    _override.clear()
    _override.update({k: v for k, v in kw.items() if v is not None})


def bc_atomics() -> bool:
    """Whether the non-deterministic backward adds per-step dB/dC with float atomics (else it
    writes per-block partial sums, like deterministic mode). See perf/NOTES.md."""
    return bool(_override.get("bc_atomics", True))


def pdl(like: Tensor, launch: bool) -> dict:
    """The decode kernels' launch options for programmatic dependent launch (PDL, sm_90+):
    {"GDC": False} without it. With it, each kernel loads its weights while the kernel before
    it finishes, then waits (`griddepcontrol.wait`) before reading anything an earlier kernel
    writes: the decode step is a chain of short, latency-bound kernels. On when the launcher is
    asked (`pdl_launch`: the opaque ops of `mamba_compiled.ops.pdl`, benchmarks); eager launches
    only (the wait is inline assembly, which traced graphs cannot take: see `traced`)."""
    if not launch or traced(like) or interpreting() or like.device.type != "cuda":
        return {"GDC": False}
    return {"GDC": True, "launch_pdl": True}


@triton.jit
def wait_for_previous_kernel(GDC: tl.constexpr):
    """With PDL (`pdl`): let the next kernel launch, and wait until the previous one has
    finished and its writes are visible. Call after the loads of weights, before any load or
    store of what kernels write."""
    if GDC:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


def override(name: str) -> object | None:
    """What a benchmark set with `set_override(name=...)`, else None."""
    return _override.get(name)


def decode_config_override() -> tuple[int, int] | None:
    """(BD, num_warps) of the state-update kernel when a benchmark sets one, else None."""
    return _override.get("decode")


def checkpoint_dtype(dtype: torch.dtype) -> torch.dtype:
    """The checkpoints' dtype for inputs of `dtype`: bfloat16 for 16-bit inputs (half the
    training memory of fp32: they are a third of a 1.4B model's activations; bfloat16, not fp16,
    for the range of a state), float32 otherwise. The backward recomputes the states of each CK
    steps in fp32 from its checkpoint; the forward passes the state between segments in fp32."""
    if _override.get("ck_fp32") or dtype not in (torch.float16, torch.bfloat16):
        return torch.float32
    return torch.bfloat16


def checkpoint_interval() -> int:
    if "ck" in _override:
        return int(_override["ck"])
    return CK_INTERPRET if interpreting() else CK


def chunk_length() -> int:
    """The scan kernels' chunk T: the default checkpoint interval, or the interval when it is
    shorter. A longer interval (`set_override(ck=2 * T)`) spans two chunks: the backward
    recomputes the second's start state from the checkpoint (half the checkpoints' memory)."""
    return min(checkpoint_interval(), CK_INTERPRET if interpreting() else CK)


def stage_bc(M, cfg: ScanConfig):
    """B or C as the kernel reads it: per-step bf16/fp16 copied to fp32 when cfg.bc_f32. These
    tensors are small (batch, groups, dstate, L), and fp32 spares the kernel Triton's choice of
    moving their tiles across lanes in 16 bits, which leaves every thread unpacking all T x N_A
    values of both tiles (about 2 instructions per state element). perf/NOTES.md, run 3."""
    if cfg.bc_f32 and M.dim() == 4 and M.dtype != torch.float32:
        return M.float()
    return M


def state_pad(dstate: int) -> int:
    """dstate padded to a power of two (dstate is a model constant; this does not touch L)."""
    return next_power_of_2(dstate)


def fwd_config(dim: int, dstate: int, groups: tuple[int, ...]) -> ScanConfig:
    """Heuristic forward config. groups: the B and C group counts (1 when shared); a block of
    channels must lie in one group of each. Looks at model constants only (dim, dstate): batch
    and seqlen are dynamic in export; segments are chosen from them by integer arithmetic.
    Measurements behind the choice: perf/NOTES.md."""
    if "fwd" in _override:
        return _override["fwd"]  # type: ignore[return-value]
    ck, T = checkpoint_interval(), chunk_length()
    n = state_pad(dstate)
    if interpreting():  # tiny blocks; segments of 2 chunks once there are under 16 programs
        return ScanConfig(BD=_block_d(4, dim, groups), T=T, N_B=min(n, 2), num_warps=1,
                          target=16, min_seg=2 * ck)  # fmt: skip
    # One warp: 16 channel lanes x 2 state lanes, 8 states per thread (third GPU run: against
    # 4 state lanes, 8-32 channels, 1-4 warps). Segments once batch x blocks is under about one
    # wave, of at least 128 steps, when the target asks for 3 or more: the 130M prefill
    # (1 x 1536 x 2048, 96 blocks) is latency-bound in 2 segments, and at 512-1023 programs (the
    # 130M training step's 768) one segment beat two (eleventh session). Seventeenth session
    # (perf/NOTES.md Run 20): the next two chunks' tiles in flight by cp.async (pipe=3), per-step
    # B and C staged in fp32, chunks of twice the checkpoint interval (16 steps: 255 registers,
    # 8 programs per SM; 9.4 instructions per state element against 10.2 for 8 steps, and twice
    # the independent work per warp). Against the sixteenth session's default (8 steps, capped
    # at 128 registers, prefetch into registers): 0.596 -> 0.477 ms at 8x4096x2048, 0.368 ->
    # 0.251 at 8x2048x2048, 0.911 -> 0.756 at 16x1536x4096, 4.53 -> 3.73 at 1x4096x65536.
    # 16 steps only up to 16 states (8 per thread), where the registers hold them.
    # Eighteenth session (Run 21): each softplus computed by one of a channel's two state lanes
    # (sp_split; 3.52 -> 3.05 ms at 1x4096x65536, 0.487 -> 0.462 at 8x4096x2048); the
    # look-back's local pass shared evenly by a block's programs (`local_range`: 3.70 -> 3.52),
    # and where the segments are known at launch a first segment 1.7 times the others whose
    # program publishes mid-way (`head`: 3.05 -> 2.84; 1.5 / 1.9 / 2.1 times: 2.94 / 2.84 / 2.97).
    return ScanConfig(BD=_block_d(16, dim, groups), T=2 * T if n <= 16 else T, N_B=min(n, 2),
                      num_warps=1, target=1024, min_seg=128, min_split=3, bc_f32=True,
                      pipe=3, sp_split=True, head=17)  # fmt: skip


def bwd_config(dim: int, dstate: int, groups: tuple[int, ...]) -> ScanConfig:
    """Heuristic backward config (T: `chunk_length`, the checkpoint interval or half of it)."""
    if "bwd" in _override:
        return _override["bwd"]  # type: ignore[return-value]
    ck, T = checkpoint_interval(), chunk_length()
    n = state_pad(dstate)
    if interpreting():
        return ScanConfig(BD=_block_d(4, dim, groups), T=T, N_B=min(n, 2), num_warps=1,
                          target=16, min_seg=2 * ck, rs=True)  # fmt: skip
    # Sums over channels (dB, dC per step) cross lanes: one warp (no cross-warp round), 8
    # channel lanes x 4 state lanes, 8 steps (first GPU run: 3.5 ms against 7.9 for 16 steps,
    # 2 warps, 8 state lanes), summed by a reduce-scatter (needs BD x N_B = 32 lanes; third run:
    # fwd+bwd 2.94 ms against 3.72 with tl.sum). Segments once batch x blocks is under 4096
    # (third run, 1x4096x65536: 16.9 ms against 17.2 / 17.6 under 2048 / 1024). perf/NOTES.md.
    bd = _block_d(8, dim, groups)
    n_b = min(n, 4)
    return ScanConfig(BD=bd, T=T, N_B=n_b, num_warps=1, target=4096, min_seg=1024,
                      rs=bd * n_b == 32)  # fmt: skip


def bwd_resident(device: torch.device) -> int:
    """About how many backward programs run at once: 8 per SM (one warp each, ~255 registers:
    8 warps of a 64K-register file), 4 for CPU tensors (the interpreter, whose tests then see
    both ways of chaining segments), or common.set_override(bwd_resident=n)."""
    if "bwd_resident" in _override:
        return int(_override["bwd_resident"])  # type: ignore[call-overload]
    if interpreting() or device.type != "cuda":
        return 4
    return 8 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _block_d(want: int, dim: int, groups: tuple[int, ...]) -> int:
    """The largest power of two <= want that divides dim // g for every g > 1 in groups (so a
    block of channels reads one B/C group and its dB/dC partial sums belong to one group)."""
    bd = want
    for g in groups:
        while g > 1 and bd > 1 and (dim // g) % bd:
            bd //= 2
    return bd
