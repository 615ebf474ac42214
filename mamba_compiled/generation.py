"""Generation: a recurrent cache, prefill, a compiled decode step, sampling, `generate`.

Mamba decodes with constant time and memory per token: each layer keeps a conv window
(batch, d_inner, d_conv) and an SSM state (batch, d_inner, d_state) instead of a growing KV cache.

    MambaCache        the per-layer states as module buffers, allocated once for a maximum batch
                      and updated in place (CUDA graphs may mutate buffers, not plain arguments)
    prefill           the full-sequence forward from the cache's states; writes the last states back
                      (compiled with a dynamic length; on CUDA, prompts of up to
                      PREFILL_GRAPH_TOKENS tokens also run as CUDA graphs, one per length)
    decode_step       one token through every layer (conv_x_proj: the conv's step and x_proj;
                      ssm_decode_step: x_proj's sum, the conv, dt_proj, the state update and the
                      conv shift; one kernel each on CUDA), compiled with fullgraph
                      and, on CUDA, CUDA graphs (as mode="reduce-overhead") and coordinate-descent
                      tuning of Inductor's kernels
    sample            repetition penalty, temperature, top-k, top-p, min-p, all on device
    MambaGenerator    owns a cache and the compiled functions; `generate` and `stream`
    generate          `model.generate(...)`: keeps a MambaGenerator on the model between calls

Left padding: with an attention mask, padded positions feed zeros into the conv and the scan, so
the state stays zero until a row's first token and each row generates what it would alone.
The `mamba-compiled generate` command is `add_arguments` + `run`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mamba_compiled.models import MambaConfig, MambaLMHeadModel
from mamba_compiled.ops import programmatic_dependent_launch

_EOS_CHECK_EVERY = 16  # tokens between host checks for "every row finished" (one sync each)


# ---- the cache ---------------------------------------------------------------------------------


class LayerCache(nn.Module):
    def __init__(self, config: MambaConfig, max_batch_size: int, device=None, dtype=None):
        super().__init__()
        d, n = config.d_inner, config.d_state
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        buffers = {
            "conv_state": torch.zeros(max_batch_size, d, config.d_conv, device=device, dtype=dtype),
            "ssm_state": torch.zeros(max_batch_size, d, n, device=device, dtype=acc),  # h
            # The scan's constants (mixer.scan_constants), copied from the weights by
            # `MambaCache.reset(model)`; NaN until then, so that forgetting it cannot go unseen.
            "A": torch.full((d, n), float("nan"), device=device, dtype=acc),
            "D": torch.full((d,), float("nan"), device=device, dtype=acc),
            "dt_bias": torch.full((d,), float("nan"), device=device, dtype=acc),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)


class MambaCache(nn.Module):
    """Every layer's (conv_state, ssm_state), allocated once for `max_batch_size` rows, and the
    scan constants (A = -exp(A_log), D, dt bias in float32) that `decode_step` reads.
    Call `reset(model)` before each sequence: it zeroes the states and copies the constants."""

    def __init__(self, config: MambaConfig, max_batch_size: int, device=None, dtype=None):
        super().__init__()
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.layers = nn.ModuleList(
            LayerCache(config, max_batch_size, device, dtype) for _ in range(config.n_layer)
        )

    @torch.no_grad()
    def reset(self, model: MambaLMHeadModel | None = None) -> None:
        """Zero the states; with `model`, also copy in its current scan constants."""
        for i, layer in enumerate(self.layers):
            layer.conv_state.zero_()
            layer.ssm_state.zero_()
            if model is not None:
                mixer = model.backbone.layers[i].mixer
                constants = mixer.scan_constants(layer.A.dtype)
                for buf, value in zip((layer.A, layer.D, layer.dt_bias), constants, strict=True):
                    buf.copy_(value)

    def constants(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        return [(layer.A, layer.D, layer.dt_bias) for layer in self.layers]

    def states(self, batch: int) -> list[tuple[Tensor, Tensor]]:
        """The first `batch` rows, which the model updates in place (the buffers themselves when
        the batch fills the cache, views of them otherwise)."""
        if batch == self.max_batch_size:
            return [(layer.conv_state, layer.ssm_state) for layer in self.layers]
        return [(layer.conv_state[:batch], layer.ssm_state[:batch]) for layer in self.layers]


def prefill(
    model: MambaLMHeadModel, cache: MambaCache, input_ids: Tensor, attention_mask: Tensor | None
) -> Tensor:
    """Run input_ids (b, l) from the cache's states, leave the states after it: logits (b, V)."""
    states = cache.states(input_ids.shape[0])
    out = model(input_ids, num_last_tokens=1, states=states, attention_mask=attention_mask)
    return out.logits[:, -1]


def decode_step(model: MambaLMHeadModel, cache: MambaCache, input_ids: Tensor) -> Tensor:
    """One token per row, input_ids (b,) -> logits (b, V); the cache advances in place.
    Uses the scan constants stored in the cache by `cache.reset(model)`."""
    return model.step(input_ids, cache.states(input_ids.shape[0]), cache.constants())


# ---- sampling ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off, 1 = greedy), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def process_logits(logits: Tensor, params: SamplingParams, seen: Tensor | None = None) -> Tensor:
    """Filtered, temperature-scaled float32 logits (b, V), Hugging Face's order and semantics:
    repetition penalty, temperature, top-k, top-p, min-p. Removed tokens get -inf."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        r = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits < 0, logits * r, logits / r), logits)
    if params.greedy:
        return logits
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (b, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - params.top_p
        drop[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        threshold = params.min_p * probs.amax(-1, keepdim=True)  # per row: any batch size works
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def sample(
    logits: Tensor,
    params: SamplingParams,
    seen: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token per row (b,), on the logits' device with no host synchronization."""
    logits = process_logits(logits, params, seen)
    if params.greedy:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race): no multinomial, no sync.
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(-1)


# ---- the generator -----------------------------------------------------------------------------


def _check_ids(input_ids, attention_mask, vocab_rows: int) -> None:
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must hold token ids as torch.long, got {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be a non-empty (batch, seqlen), got {tuple(input_ids.shape)}"
        )
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_rows:
        raise ValueError(
            f"input_ids out of range: values in [{lo}, {hi}], the vocabulary has {vocab_rows} rows"
        )
    if attention_mask is None:
        return
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}"
        )
    m = attention_mask.bool()
    if not bool(m[:, -1].all()) or bool((m[:, :-1] & ~m[:, 1:]).any()):
        raise ValueError(
            "attention_mask must be left padding: zeros, then ones, with every row's last "
            "position a token (pad prompts on the left)"
        )


# Prompts of up to this many tokens (batch x length) prefill as CUDA graphs on CUDA: there the
# compiled prefill is host-bound (130M, 1 x 100 tokens: 506 kernels, 1.6 ms of GPU work in a
# 13 ms call on the H200). Each distinct shape records a graph of its own (its first call runs
# without one; Inductor warns past `cudagraph_dynamic_shape_warn_limit` shapes, 50); longer
# prompts run the compiled prefill without graphs.
PREFILL_GRAPH_TOKENS = 8192


def _dense(t: Tensor) -> Tensor:
    """A fresh copy of t with its own strides: compiled graphs guard on a view's base and on
    strides, so a slice of a longer prompt (a chunk, a (1, n) slice, which PyTorch calls
    contiguous, or a column for the decode step) would otherwise recompile them."""
    return t.clone(memory_format=torch.contiguous_format)


class MambaGenerator:
    """A cache for up to `max_batch_size` rows and the (compiled) prefill and decode functions.

    compile=None compiles on CUDA (decode step with CUDA graphs) and runs eagerly on CPU;
    compile=True on CPU compiles without graphs. On CUDA the decode step is compiled with CUDA
    graphs and Inductor's coordinate-descent tuning of its kernels' block sizes (as gpt-fast
    does: the decode projections are reductions Inductor generates, whose default blocks read
    one weight row per one-warp program), and prompts of up to PREFILL_GRAPH_TOKENS tokens
    prefill as CUDA graphs. `decode_mode` replaces the decode step's settings with a
    torch.compile mode, e.g. "reduce-overhead" (graphs only) or "max-autotune", and turns the
    prefill's graphs off. `pdl` runs the decode step's kernels with programmatic dependent
    launch (`mamba_compiled.ops.pdl`): each kernel loads its weights while the one before it
    finishes; None (default) turns it on for sm_90+ GPUs, True there only.
    """

    def __init__(
        self,
        model: MambaLMHeadModel,
        max_batch_size: int = 1,
        *,
        compile: bool | None = None,
        decode_mode: str | None = None,
        pdl: bool | None = None,
    ):
        if not isinstance(model, MambaLMHeadModel):
            raise TypeError(f"model must be a MambaLMHeadModel, got {type(model).__name__}")
        self.model = model
        weight = model.backbone.layers[0].mixer.in_proj.weight
        self.device, self.dtype = weight.device, weight.dtype
        hopper = (
            self.device.type == "cuda" and torch.cuda.get_device_capability(self.device)[0] >= 9
        )
        if pdl and not hopper:
            raise ValueError("pdl=True (programmatic dependent launch) needs an sm_90+ CUDA model")
        self.pdl = hopper if pdl is None else bool(pdl)
        self.cache = MambaCache(model.config, max_batch_size, self.device, self.dtype)
        self.compiled = self.device.type == "cuda" if compile is None else bool(compile)
        if decode_mode is not None and not self.compiled:
            raise ValueError(f"decode_mode={decode_mode!r} needs compile=True")
        self._prefill_graphs = None
        if self.compiled:
            self._prefill = torch.compile(prefill, fullgraph=True, dynamic=True)
            if decode_mode is None and self.device.type == "cuda":
                self._prefill_graphs = torch.compile(
                    prefill, fullgraph=True, dynamic=True, options={"triton.cudagraphs": True}
                )
            step = dict(fullgraph=True, dynamic=False)
            if decode_mode is not None:
                step["mode"] = decode_mode
            elif self.device.type == "cuda":  # graphs ("reduce-overhead") and tuned blocks
                step["options"] = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
            self._step = torch.compile(decode_step, **step)
        else:
            self._prefill, self._step = prefill, decode_step

    @property
    def max_batch_size(self) -> int:
        return self.cache.max_batch_size

    def matches(self, model: MambaLMHeadModel, batch: int, compile: bool | None) -> bool:
        weight = model.backbone.layers[0].mixer.in_proj.weight
        want = weight.device.type == "cuda" if compile is None else bool(compile)
        return (
            self.model is model
            and batch <= self.max_batch_size
            and want == self.compiled
            and (weight.device, weight.dtype) == (self.device, self.dtype)
        )

    @torch.no_grad()
    def prefill(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, chunk_size: int | None = None
    ) -> Tensor:
        """Reset the cache, run the prompt (in chunks of `chunk_size` if given): logits (b, V)."""
        batch, seqlen = input_ids.shape
        if batch > self.max_batch_size:
            raise ValueError(
                f"batch {batch} exceeds the cache's max_batch_size {self.max_batch_size}"
            )
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"prefill chunk_size must be >= 1, got {chunk_size}")
        self.cache.reset(self.model)
        chunk = seqlen if chunk_size is None else chunk_size
        for start in range(0, seqlen, chunk):
            ids = _dense(input_ids[:, start : start + chunk])
            mask = (
                None if attention_mask is None else _dense(attention_mask[:, start : start + chunk])
            )
            graphed = self._prefill_graphs is not None and ids.numel() <= PREFILL_GRAPH_TOKENS
            run = self._prefill_graphs if graphed else self._prefill
            logits = run(self.model, self.cache, ids, mask)
        # a graph's output is overwritten by the next replay of any graph (the decode step's
        # too): the caller gets its own copy, (batch, vocab)
        return logits.clone() if graphed else logits

    @torch.no_grad()
    def step(self, input_ids: Tensor) -> Tensor:
        """Decode one token per row, input_ids (b,) -> logits (b, V). On CUDA graphs the result is
        overwritten by the next step: use it (or clone it) before calling again."""
        if input_ids._is_view() or not input_ids.is_contiguous():
            input_ids = _dense(input_ids)  # e.g. a column of a prompt: else a recompile
        with programmatic_dependent_launch(self.pdl):
            return self._step(self.model, self.cache, input_ids)

    @torch.no_grad()
    def stream(
        self,
        input_ids: Tensor,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        attention_mask: Tensor | None = None,
        seed: int | None = None,
        prefill_chunk_size: int | None = None,
    ) -> Iterator[Tensor]:
        """Yield each step's tokens (b,) on the model's device as they are decoded.

        Rows that produced an EOS are frozen: they yield pad_token_id (default: the first EOS id).
        The iterator ends after max_new_tokens steps, or earlier once every row has finished
        (checked every few tokens, so that decoding never waits on the host per token).
        """
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
        if (
            isinstance(max_new_tokens, bool)
            or not isinstance(max_new_tokens, int)
            or max_new_tokens < 0
        ):
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        vocab = self.model.config.vocab_size
        _check_ids(input_ids, attention_mask, self.model.backbone.embedding.num_embeddings)
        batch = input_ids.shape[0]
        if batch > self.max_batch_size:
            raise ValueError(
                f"batch {batch} exceeds the cache's max_batch_size {self.max_batch_size}; "
                "make a MambaGenerator with a larger max_batch_size"
            )
        input_ids = input_ids.to(self.device, torch.long)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        eos = None
        if eos_token_id is not None:
            ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
            if not ids or any(not 0 <= i < vocab for i in ids):
                raise ValueError(
                    f"eos_token_id must be token ids in [0, {vocab}), got {eos_token_id!r}"
                )
            eos = torch.tensor(ids, device=self.device)
            fill = ids[0] if pad_token_id is None else pad_token_id
            finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(batch, vocab, dtype=torch.bool, device=self.device)
            prompt_ids = (
                input_ids
                if attention_mask is None
                else input_ids.masked_fill(attention_mask == 0, 0)
            )
            real = (
                torch.ones_like(input_ids, dtype=torch.bool)
                if attention_mask is None
                else attention_mask.bool()
            )
            seen.scatter_(1, prompt_ids.clamp(max=vocab - 1), real & (input_ids < vocab))
        if max_new_tokens == 0:
            return

        logits = self.prefill(input_ids, attention_mask, prefill_chunk_size)
        for i in range(max_new_tokens):
            token = sample(logits[:, :vocab], params, seen, generator)  # (b,)
            if eos is not None:
                token = torch.where(finished, fill, token)
                finished = finished | torch.isin(token, eos)
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
            yield token
            if i + 1 == max_new_tokens:
                break
            if eos is not None and (i + 1) % _EOS_CHECK_EVERY == 0 and bool(finished.all()):
                break
            logits = self.step(token)

    def generate(
        self,
        input_ids: Tensor,
        *,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        streamer=None,
        **kwargs,
    ) -> Tensor:
        """The prompt followed by the new tokens, (b, prompt + new). See `generate`."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a (batch, seqlen) tensor of token ids")
        n = _resolve_length(max_new_tokens, max_length, input_ids.shape[1])
        eos = kwargs.get("eos_token_id")
        if streamer is not None and hasattr(streamer, "put"):
            streamer.put(input_ids.cpu())  # Hugging Face's streamer protocol: the prompt first
        tokens = []
        for token in self.stream(input_ids, max_new_tokens=n, **kwargs):
            tokens.append(token)
            if streamer is not None:
                (streamer.put if hasattr(streamer, "put") else streamer)(token.cpu())
        if streamer is not None and hasattr(streamer, "end"):
            streamer.end()
        prompt = input_ids.to(self.device, torch.long)
        if not tokens:
            return prompt
        new = torch.stack(tokens, dim=1)  # (b, n)
        if eos is not None:
            new = _trim_finished(new, eos)
        return torch.cat([prompt, new], dim=1)


def _resolve_length(max_new_tokens, max_length, prompt_len: int) -> int:
    if (max_new_tokens is None) == (max_length is None):
        raise ValueError(
            "pass exactly one of max_new_tokens or max_length (prompt + new, as mamba_ssm)"
        )
    if max_length is not None:
        if (
            isinstance(max_length, bool)
            or not isinstance(max_length, int)
            or max_length < prompt_len
        ):
            raise ValueError(
                f"max_length must be an int >= the prompt length {prompt_len}, got {max_length!r}"
            )
        return max_length - prompt_len
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 0
    ):
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    return max_new_tokens


def _trim_finished(new: Tensor, eos) -> Tensor:
    """Cut the columns after the step at which every row had emitted an EOS (as HF stops)."""
    ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=new.device)
    hit = torch.isin(new, ids)  # (b, n)
    if not bool(hit.any(dim=1).all()):
        return new
    first = hit.int().argmax(dim=1)  # first EOS per row
    return new[:, : int(first.max()) + 1]


def generate(
    model: MambaLMHeadModel,
    input_ids: Tensor,
    *,
    max_new_tokens: int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    attention_mask: Tensor | None = None,
    streamer=None,
    seed: int | None = None,
    max_length: int | None = None,
    pad_token_id: int | None = None,
    compile: bool | None = None,
    prefill_chunk_size: int | None = None,
) -> Tensor:
    """Generate up to max_new_tokens (or up to max_length in all, mamba_ssm's argument) per row.

    input_ids (b, l) -> (b, l + new) long, on the model's device. Greedy when temperature is 0 or
    top_k is 1; otherwise sampling with temperature, top_k (0 = off), top_p (1 = off), min_p
    (0 = off) and repetition_penalty (1 = off). eos_token_id (an id or a list) ends a row, whose
    later positions hold pad_token_id (default: the EOS id); generation stops when all rows have.
    attention_mask (b, l) marks left padding with 0. streamer: a callable given each step's
    tokens (b,) on the CPU, or an object with put/end (Hugging Face's TextStreamer protocol).
    seed makes sampling reproducible. compile: see MambaGenerator. The cache and compiled
    functions are kept on the model and reused while the batch fits.
    """
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    batch = input_ids.shape[0] if input_ids.dim() == 2 else 1
    gen = model.__dict__.get("_mamba_generator")
    if gen is None or not gen.matches(model, batch, compile):
        size = max(batch, gen.max_batch_size if gen is not None else 1)
        gen = MambaGenerator(model, max(size, 1), compile=compile)
        model.__dict__["_mamba_generator"] = gen
    return gen.generate(
        input_ids,
        max_new_tokens=max_new_tokens,
        max_length=max_length,
        streamer=streamer,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        attention_mask=attention_mask,
        seed=seed,
        prefill_chunk_size=prefill_chunk_size,
    )


# ---- the `mamba-compiled generate` command -----------------------------------------------------

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Generate from a checkpoint directory; prints the tokens and tokens/s."
    parser.add_argument(
        "checkpoint", type=Path, help="checkpoint directory (mamba_ssm or HF format)"
    )
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs --tokenizer)")
    prompt.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,5,9")
    parser.add_argument(
        "--tokenizer", type=Path, help="a tokenizer.json or a directory holding one"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1, help="rows (the prompt repeated)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--eos-token-id", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="default: float16 on CUDA, float32 on CPU",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile prefill and decode (default: on CUDA only)",
    )
    parser.add_argument("--stream", action="store_true", help="print tokens as they come")


def _load_tokenizer(path: Path):
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ImportError("--tokenizer needs the tokenizers package: pip install tokenizers") from e
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no tokenizer.json there")
    return Tokenizer.from_file(str(file))


def run(args: argparse.Namespace) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; pass --device cpu")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer is not None else None
    if args.prompt is not None:
        if tokenizer is None:
            raise ValueError("--prompt is text and needs --tokenizer; or pass --prompt-ids 1,2,3")
        ids = tokenizer.encode(args.prompt).ids
    else:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError as e:
            raise ValueError(
                f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}"
            ) from e
    if not ids:
        raise ValueError("the prompt is empty")
    dtype = (
        DTYPES[args.dtype]
        if args.dtype
        else (torch.float16 if args.device.startswith("cuda") else torch.float32)
    )
    model = MambaLMHeadModel.from_pretrained(
        args.checkpoint, device=args.device, dtype=dtype
    ).eval()
    prompt = torch.tensor([ids] * args.batch, device=args.device)

    def show(tokens: Tensor) -> None:
        text = tokenizer.decode(tokens[:1].tolist()) if tokenizer else f"{int(tokens[0])} "
        print(text, end="", flush=True)

    streamer: Callable | None = show if args.stream else None
    start = time.perf_counter()
    out = model.generate(
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        eos_token_id=args.eos_token_id,
        seed=args.seed,
        compile=args.compile,
        streamer=streamer,
    )
    if out.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    new = out[:, len(ids) :]
    if args.stream:
        print()
    for row in out.tolist():
        print(tokenizer.decode(row) if tokenizer else " ".join(map(str, row)))
    n = new.numel()
    print(
        f"{n} new tokens in {seconds:.3f} s: {n / seconds:.1f} tokens/s "
        "(the first call includes compilation)"
    )
    return 0
