"""Generation: cache, prefill, decode, sampling, EOS, padding, streaming, bad arguments."""

import argparse
import json

import pytest
import torch

from mamba_compiled import generation
from mamba_compiled.generation import (
    MambaCache,
    MambaGenerator,
    SamplingParams,
    process_logits,
    sample,
)
from mamba_compiled.models import MambaConfig, MambaLMHeadModel

VOCAB = 40


def perturb_(model, scale=0.3):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


@pytest.fixture
def model():
    """Tiny, with weights far from init so that its greedy outputs are not constant."""
    return perturb_(
        MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=VOCAB, d_state=8))
    ).eval()


def greedy(model_or_gen, ids, n, **kw):
    return model_or_gen.generate(ids, max_new_tokens=n, temperature=0.0, **kw)


# ---- cache, prefill, decode --------------------------------------------------------------------


def test_cache_is_buffers_updated_in_place(model):
    cache = MambaCache(model.config, max_batch_size=3)
    buffers = dict(cache.named_buffers())
    assert buffers["layers.0.conv_state"].shape == (3, 64, 4)
    assert buffers["layers.1.ssm_state"].shape == (3, 64, 8)
    assert buffers["layers.1.ssm_state"].dtype == torch.float32
    assert cache.state_dict() == {}  # not persistent: never part of a checkpoint
    assert torch.isnan(cache.layers[0].A).all()  # until reset(model) copies the constants in
    cache.reset(model)
    torch.testing.assert_close(cache.layers[1].A, -torch.exp(model.backbone.layers[1].mixer.A_log))
    ptrs = [b.data_ptr() for b in buffers.values()]
    with torch.no_grad():
        generation.prefill(model, cache, torch.randint(0, VOCAB, (2, 6)), None)
        generation.decode_step(model, cache, torch.randint(0, VOCAB, (2,)))
    assert [b.data_ptr() for b in cache.buffers()] == ptrs
    assert (
        cache.layers[0].ssm_state[:2].abs().sum() > 0
        and cache.layers[0].ssm_state[2].abs().sum() == 0
    )


# batch 10: above GEMV_MAX_BATCH (x_proj and dt_proj as tl.dot products on CUDA)
@pytest.mark.parametrize("batch", [3, 10])
def test_teacher_forced_decode_equals_full_forward(model, batch):
    ids = torch.randint(0, VOCAB, (batch, 21))
    gen = MambaGenerator(model, batch)
    with torch.no_grad():
        full = model(ids).logits
        logits = [gen.prefill(ids[:, :2])]  # shorter than d_conv: the conv window is zero-padded
        logits += [gen.step(ids[:, t]).clone() for t in range(2, 21)]
    torch.testing.assert_close(torch.stack(logits, 1), full[:, 1:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch", [2, 10])
def test_fused_decode_step_equals_plain(model, batch, monkeypatch):
    """The decode step as CUDA runs it (the norms, in_proj, out_proj, the residual adds and the LM
    head as `decode_linear`; at batch 10 the LM head's norm before it), here through the ops'
    CPU bodies: the same logits and states as the plain modules."""
    from mamba_compiled.models import lm, mamba

    ids = torch.randint(0, VOCAB, (batch, 5))
    logits, states = [], []
    for fused in (False, True):
        for module in (lm, mamba):
            monkeypatch.setattr(module, "fused_decoding", lambda x, fused=fused: fused)
        cache = MambaCache(model.config, max_batch_size=batch)
        cache.reset(model)
        with torch.no_grad():
            logits.append([generation.decode_step(model, cache, ids[:, t]) for t in range(5)])
        states.append([b.clone() for b in cache.buffers()])
    for plain, fused in zip(logits[0], logits[1], strict=True):
        torch.testing.assert_close(fused, plain)
    for plain, fused in zip(states[0], states[1], strict=True):
        torch.testing.assert_close(fused, plain)


def test_pdl_needs_a_hopper_gpu_and_leaves_cpu_alone(model):
    """pdl=True is refused off sm_90+ CUDA, and the default (None) is off there; the switch itself
    changes nothing for CPU tensors and is restored on exit, also after an error."""
    from mamba_compiled.ops import pdl

    with pytest.raises(ValueError, match="pdl=True"):
        MambaGenerator(model, 1, pdl=True)
    assert MambaGenerator(model, 1).pdl is False
    ids = torch.randint(0, VOCAB, (1, 6))
    with pytest.raises(RuntimeError, match="boom"), pdl.programmatic_dependent_launch():
        assert not pdl.use_pdl(ids.float())
        raise RuntimeError("boom")
    assert pdl._active is False


@pytest.mark.parametrize("chunk", [1, 3, 7], ids=lambda c: f"chunk{c}")
def test_chunked_prefill_equals_one_shot(model, chunk):
    ids = torch.randint(0, VOCAB, (2, 17))
    one, chunked = MambaGenerator(model, 2), MambaGenerator(model, 2)
    expected = one.prefill(ids)
    got = chunked.prefill(ids, chunk_size=chunk)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    for a, b in zip(chunked.cache.buffers(), one.cache.buffers(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_greedy_equals_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2
    )
    hf = perturb_(transformers.MambaForCausalLM(config)).eval()
    hf.save_pretrained(tmp_path)
    ours = MambaLMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    expected = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=24,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert torch.equal(greedy(ours, ids, 24), expected)


def test_left_padded_batch_equals_rows_alone(model):
    lengths = [3, 9, 14]  # one prompt shorter than the conv window
    prompts = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    alone = [greedy(model, p, 12)[:, p.shape[1] :] for p in prompts]
    width = max(lengths)
    ids = torch.stack(
        [
            torch.cat([torch.full((width - n,), 5), p[0]])
            for n, p in zip(lengths, prompts, strict=True)
        ]
    )
    mask = torch.stack([torch.cat([torch.zeros(width - n), torch.ones(n)]) for n in lengths]).long()
    batched = greedy(model, ids, 12, attention_mask=mask)[:, width:]
    assert torch.equal(batched, torch.cat(alone))


def test_max_length_is_prompt_plus_new(model):
    ids = torch.randint(0, VOCAB, (2, 5))
    assert torch.equal(model.generate(ids, max_length=12, top_k=1), greedy(model, ids, 7))
    assert greedy(model, ids, 0).shape == (2, 5)


def test_generate_reuses_the_cache_and_grows_it(model):
    greedy(model, torch.randint(0, VOCAB, (2, 5)), 2)
    gen = model._mamba_generator
    greedy(model, torch.randint(0, VOCAB, (1, 5)), 2)
    assert model._mamba_generator is gen
    greedy(model, torch.randint(0, VOCAB, (4, 5)), 2)
    assert model._mamba_generator.max_batch_size == 4


@pytest.mark.parametrize("batch", [3, 10])
def test_compiled_decode_equals_eager(model, batch):
    """CPU: prefill compiled with dynamic length, the decode step compiled without graphs."""
    torch._dynamo.reset()
    eager = MambaGenerator(model, batch, compile=False)
    compiled = MambaGenerator(model, batch, compile=True)
    for seqlen in (6, 11):
        ids = torch.randint(0, VOCAB, (batch, seqlen))
        assert torch.equal(greedy(compiled, ids, 10), greedy(eager, ids, 10))
    kw = dict(max_new_tokens=10, temperature=0.8, top_k=20, seed=3)
    assert torch.equal(compiled.generate(ids, **kw), eager.generate(ids, **kw))
    # slices of longer prompts, chunks and columns compile nothing new (the generator copies
    # views: a view's base and strides would be guards)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        longer = torch.randint(0, VOCAB, (batch, 30))
        compiled.prefill(longer[:, :9])
        compiled.prefill(longer[:, 3:17])
        compiled.prefill(longer, chunk_size=7)
        compiled.step(longer[:, 20])  # a column: a strided view


# ---- sampling ----------------------------------------------------------------------------------


def test_processors_match_transformers():
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits = torch.randn(4, 50) * 3
    ids = torch.randint(0, 50, (4, 7))
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter_(1, ids, True)
    cases = [
        (SamplingParams(temperature=0.7), [lp.TemperatureLogitsWarper(0.7)]),
        (SamplingParams(top_k=5), [lp.TopKLogitsWarper(5)]),
        (SamplingParams(top_p=0.6), [lp.TopPLogitsWarper(0.6)]),
        (SamplingParams(min_p=0.2), [lp.MinPLogitsWarper(0.2)]),
        (SamplingParams(repetition_penalty=1.3), [lp.RepetitionPenaltyLogitsProcessor(1.3)]),
        (
            SamplingParams(
                temperature=1.5, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.2
            ),
            [
                lp.RepetitionPenaltyLogitsProcessor(1.2),
                lp.TemperatureLogitsWarper(1.5),
                lp.TopKLogitsWarper(10),
                lp.TopPLogitsWarper(0.9),
                lp.MinPLogitsWarper(0.05),
            ],
        ),
    ]
    for params, hf in cases:
        expected = logits.clone()
        for proc in hf:
            expected = proc(ids, expected)
        torch.testing.assert_close(process_logits(logits, params, seen), expected, msg=str(params))


def test_min_p_is_per_row():
    """mamba_ssm reads the first row's max for every row; each row here has its own threshold."""
    logits = torch.tensor([[5.0, 4.0, 0.0, -9.0], [0.0, 0.0, 0.0, 0.0]])
    out = process_logits(logits, SamplingParams(min_p=0.3))
    assert torch.isinf(out[0]).tolist() == [False, False, True, True]
    assert not torch.isinf(out[1]).any()


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4)
    draws = sample(logits, SamplingParams(), generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / 20000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    top2 = sample(logits, SamplingParams(top_k=2), generator=torch.Generator().manual_seed(1))
    assert set(top2.tolist()) == {0, 1}


def test_seed_reproducible_and_greedy_shortcuts(model):
    ids = torch.randint(0, VOCAB, (2, 6))
    a = model.generate(ids, max_new_tokens=15, seed=1)
    assert torch.equal(a, model.generate(ids, max_new_tokens=15, seed=1))
    assert not torch.equal(a, model.generate(ids, max_new_tokens=15, seed=2))
    g = greedy(model, ids, 15)
    assert torch.equal(model.generate(ids, max_new_tokens=15, top_k=1, seed=5), g)


def test_repetition_penalty_ignores_padding(model):
    ids = torch.randint(1, VOCAB, (1, 8))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 8)], 1).long()
    kw = dict(max_new_tokens=10, temperature=0.0, repetition_penalty=2.0)
    alone = model.generate(ids, **kw)[:, 8:]
    assert torch.equal(model.generate(padded, attention_mask=mask, **kw)[:, 12:], alone)


# ---- EOS and streaming -------------------------------------------------------------------------


def test_eos_freezes_rows_and_stops(model):
    ids = torch.randint(0, VOCAB, (3, 6))
    free = greedy(model, ids, 40)[:, 6:]
    eos = int(free[0, 2])  # row 0 ends at step 2 (or earlier, if it said this token before)
    out = greedy(model, ids, 40, eos_token_id=eos, pad_token_id=VOCAB - 1)[:, 6:]
    for row in range(3):
        hits = (free[row] == eos).nonzero()
        if len(hits):
            end = int(hits[0]) + 1
            assert torch.equal(out[row, :end], free[row, :end])
            assert (out[row, end:] == VOCAB - 1).all()
        else:
            assert torch.equal(out[row], free[row, : out.shape[1]])
    if all((free[r] == eos).any() for r in range(3)):
        assert out.shape[1] == max(int((free[r] == eos).nonzero()[0]) + 1 for r in range(3))


def test_eos_all_rows_stop_early(model):
    ids = torch.randint(0, VOCAB, (1, 6))
    free = greedy(model, ids, 30)[:, 6:]
    out = greedy(model, ids, 30, eos_token_id=int(free[0, 4]))
    assert out.shape[1] <= 6 + 5


def test_streamers(model):
    ids = torch.randint(0, VOCAB, (2, 5))
    seen = []
    out = greedy(model, ids, 8, streamer=seen.append)
    assert torch.equal(torch.stack(seen, 1), out[:, 5:])

    class HFStyle:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value)

        def end(self):
            self.ended = True

    s = HFStyle()
    greedy(model, ids, 8, streamer=s)
    assert s.ended and torch.equal(s.puts[0], ids) and len(s.puts) == 9
    gen = MambaGenerator(model, 2)
    tokens = list(gen.stream(ids, max_new_tokens=8, temperature=0.0))
    assert torch.equal(torch.stack(tokens, 1), out[:, 5:])


# ---- bad arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        pytest.param(dict(max_new_tokens=-1), ValueError, "max_new_tokens", id="negative-length"),
        pytest.param(dict(), ValueError, "max_new_tokens or max_length", id="no-length"),
        pytest.param(
            dict(max_new_tokens=3, max_length=9), ValueError, "exactly one", id="both-lengths"
        ),
        pytest.param(dict(max_length=2), ValueError, "max_length", id="max_length-short"),
        pytest.param(dict(max_new_tokens=3, top_p=0.0), ValueError, "top_p", id="top_p-zero"),
        pytest.param(dict(max_new_tokens=3, top_p=1.5), ValueError, "top_p", id="top_p-big"),
        pytest.param(dict(max_new_tokens=3, top_k=-2), ValueError, "top_k", id="top_k"),
        pytest.param(
            dict(max_new_tokens=3, temperature=-1.0), ValueError, "temperature", id="temperature"
        ),
        pytest.param(dict(max_new_tokens=3, min_p=2.0), ValueError, "min_p", id="min_p"),
        pytest.param(
            dict(max_new_tokens=3, repetition_penalty=0.0),
            ValueError,
            "repetition_penalty",
            id="penalty",
        ),
        pytest.param(
            dict(max_new_tokens=3, eos_token_id=VOCAB), ValueError, "eos_token_id", id="eos-range"
        ),
        pytest.param(
            dict(max_new_tokens=3, attention_mask=torch.tensor([[1, 1, 0, 0]] * 2)),
            ValueError,
            "left padding",
            id="right-padding",
        ),
    ],
)
def test_bad_arguments(model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        model.generate(torch.randint(0, VOCAB, (2, 4)), **kwargs)


def test_bad_inputs_and_cache_size(model):
    with pytest.raises(TypeError):
        model.generate(torch.randint(0, VOCAB, (1, 4)), 10)  # mamba_ssm's positional max_length
    with pytest.raises(ValueError, match="input_ids out of range"):
        model.generate(torch.tensor([[1, 2, 99]]), max_new_tokens=2)
    with pytest.raises(TypeError, match="input_ids"):
        model.generate(torch.ones(1, 3), max_new_tokens=2)
    gen = MambaGenerator(model, max_batch_size=2)
    with pytest.raises(ValueError, match="max_batch_size 2"):
        gen.generate(torch.randint(0, VOCAB, (3, 4)), max_new_tokens=2)


# ---- the command -------------------------------------------------------------------------------


def _parse(*argv):
    parser = argparse.ArgumentParser()
    generation.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_generate_command_with_ids(model, tmp_path, capsys):
    model.save_pretrained(tmp_path)
    args = _parse(
        str(tmp_path),
        "--prompt-ids",
        "1,2,3",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0",
        "--device",
        "cpu",
    )
    assert generation.run(args) == 0
    out = capsys.readouterr().out.splitlines()
    expected = greedy(model, torch.tensor([[1, 2, 3]]), 5)[0].tolist()
    assert out[0] == " ".join(map(str, expected))
    assert "tokens/s" in out[-1]


def test_generate_command_with_tokenizer(model, tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    model.save_pretrained(tmp_path / "ckpt")
    args = _parse(
        str(tmp_path / "ckpt"),
        "--prompt",
        "w1 w2 w3",
        "--tokenizer",
        str(tmp_path),
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
        "--device",
        "cpu",
        "--stream",
    )
    assert generation.run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = greedy(model, torch.tensor([[1, 2, 3]]), 4)[0].tolist()
    assert lines[1] == tok.decode(expected)
    with pytest.raises(ValueError, match="--tokenizer"):
        generation.run(_parse(str(tmp_path / "ckpt"), "--prompt", "w1", "--device", "cpu"))
    json.loads((tmp_path / "tokenizer.json").read_text())
