"""The model: config, module tree and names, init, forward semantics, compile, bad input."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mamba_compiled.models import Mamba, MambaConfig, MambaLMHeadModel, set_recompute
from mamba_compiled.ops.reference import selective_scan_ref

TINY = dict(d_model=32, n_layer=2, vocab_size=20, d_state=8)


def tiny(**overrides) -> MambaLMHeadModel:
    return MambaLMHeadModel(MambaConfig(**{**TINY, **overrides}))


# ---- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, d_model, n_layer",
    [
        ("130m", 768, 24),
        ("370m", 1024, 48),
        ("790m", 1536, 48),
        ("1.4b", 2048, 48),
        ("2.8b", 2560, 64),
    ],
)
def test_named_sizes(name, d_model, n_layer):
    c = MambaConfig.from_name(name)
    assert (c.d_model, c.n_layer, c.vocab_size, c.padded_vocab_size) == (
        d_model,
        n_layer,
        50277,
        50280,
    )
    assert c.dt_rank == math.ceil(d_model / 16) and c.d_inner == 2 * d_model


def test_config_defaults_are_mamba_ssms():
    c = MambaConfig()
    assert (c.d_state, c.d_conv, c.expand, c.dt_min, c.dt_max, c.dt_init_floor) == (
        16,
        4,
        2,
        1e-3,
        0.1,
        1e-4,
    )
    assert c.conv_bias and not c.bias and c.rms_norm and c.residual_in_fp32 and c.tie_embeddings
    assert c.pad_vocab_size_multiple == 8


@pytest.mark.parametrize(
    "kwargs, field",
    [
        pytest.param(dict(d_model=0), "d_model", id="d_model-zero"),
        pytest.param(dict(n_layer=-1), "n_layer", id="n_layer-negative"),
        pytest.param(dict(vocab_size=2.5), "vocab_size", id="vocab-float"),
        pytest.param(dict(dt_rank="big"), "dt_rank", id="dt_rank-string"),
        pytest.param(dict(dt_min=0.2, dt_max=0.1), "dt_min", id="dt-range"),
        pytest.param(dict(dt_init="zeros"), "dt_init", id="dt_init"),
    ],
)
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MambaConfig(**{**TINY, **kwargs})


def test_from_name_unknown():
    with pytest.raises(ValueError, match="130m"):
        MambaConfig.from_name("7b")


# ---- module tree, parameter names, init --------------------------------------------------------


def test_parameter_names_and_shapes_are_mamba_ssms():
    model = tiny(vocab_size=21)  # padded to 24
    d, e, n, r = 32, 64, 8, 2
    expected = {
        "backbone.embedding.weight": (24, d),
        "backbone.norm_f.weight": (d,),
        "lm_head.weight": (24, d),
    }
    for i in range(2):
        p = f"backbone.layers.{i}."
        expected.update(
            {
                p + "norm.weight": (d,),
                p + "mixer.A_log": (e, n),
                p + "mixer.D": (e,),
                p + "mixer.in_proj.weight": (2 * e, d),
                p + "mixer.conv1d.weight": (e, 1, 4),
                p + "mixer.conv1d.bias": (e,),
                p + "mixer.x_proj.weight": (r + 2 * n, e),
                p + "mixer.dt_proj.weight": (e, r),
                p + "mixer.dt_proj.bias": (e,),
                p + "mixer.out_proj.weight": (d, e),
            }
        )
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert isinstance(model.backbone.layers[0].mixer, Mamba)
    assert model.lm_head.weight is model.backbone.embedding.weight


def test_untied_head_and_biases():
    model = tiny(tie_embeddings=False, bias=True, conv_bias=False)
    assert model.lm_head.weight is not model.backbone.embedding.weight
    mixer = model.backbone.layers[0].mixer
    assert mixer.conv1d.bias is None and mixer.in_proj.bias is not None
    assert torch.all(mixer.in_proj.bias == 0) and torch.all(mixer.out_proj.bias == 0)


def test_init_matches_mamba_ssm():
    c = MambaConfig(d_model=64, n_layer=4, vocab_size=1000, d_state=16)
    model = MambaLMHeadModel(c)
    mixer = model.backbone.layers[1].mixer
    assert torch.equal(mixer.A_log, torch.log(torch.arange(1, 17.0)).repeat(128, 1))
    assert torch.equal(mixer.D, torch.ones(128))
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= c.dt_init_floor * 0.999 and dt.max() <= c.dt_max * 1.001
    assert dt.min() < 0.01 < dt.max()  # log-uniform over two decades
    bound = c.dt_rank**-0.5
    assert mixer.dt_proj.weight.abs().max() <= bound
    # out_proj: kaiming-uniform (bound 1/sqrt(fan_in)) divided by sqrt(n_layer)
    assert mixer.out_proj.weight.abs().max() <= 1 / math.sqrt(128) / math.sqrt(4) + 1e-6
    assert mixer.out_proj.weight.abs().max() > 0.8 / math.sqrt(128) / math.sqrt(4)
    assert abs(model.backbone.embedding.weight.std().item() - 0.02) < 0.002
    assert mixer.A_log._no_weight_decay and mixer.D._no_weight_decay


def test_half_model_keeps_A_log_and_D_in_float32():
    model = MambaLMHeadModel(MambaConfig(**TINY), dtype=torch.bfloat16)
    mixer = model.backbone.layers[0].mixer
    assert mixer.A_log.dtype == torch.float32 and mixer.D.dtype == torch.float32
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    logits = model(torch.randint(0, 20, (2, 9))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


# ---- forward semantics -------------------------------------------------------------------------


def mixer_by_hand(m: Mamba, h: torch.Tensor) -> torch.Tensor:
    """The mixer written out with F.conv1d and the float64 oracle: (b, l, d_model)."""
    l = h.shape[1]
    x, z = m.in_proj(h).chunk(2, dim=-1)
    x = F.silu(m.conv1d(x.transpose(1, 2))[..., :l])  # mamba_ssm's conv: pad both sides, cut
    dt, B, C = torch.split(m.x_proj(x.transpose(1, 2)), [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = (dt @ m.dt_proj.weight.T).transpose(1, 2)
    y = selective_scan_ref(
        x.double(),
        dt.double(),
        -torch.exp(m.A_log.double()),
        B.transpose(1, 2).double(),
        C.transpose(1, 2).double(),
        m.D.double(),
        z.transpose(1, 2).double(),
        m.dt_proj.bias.double(),
        delta_softplus=True,
    )
    return m.out_proj(y.float().transpose(1, 2))


def test_mixer_matches_hand_written_mamba():
    model = tiny()
    m = model.backbone.layers[0].mixer
    h = torch.randn(3, 13, 32)
    torch.testing.assert_close(m(h), mixer_by_hand(m, h), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "seqlen,width,bias", [(9, 4, True), (1, 4, True), (2, 4, False), (7, 1, True)]
)
def test_conv_silu_backward(seqlen, width, bias):
    """The mixer's conv + SiLU (channels, batch, L) with its written-out backward: the forward
    against F.conv1d, the gradients by gradcheck in float64, also for L under the width."""
    from mamba_compiled.ops.conv import _ConvSiLU

    E, b = 5, 2
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x, w = torch.randn(E, b, seqlen, **f64), torch.randn(E, width, **f64)
    bs = torch.randn(E, **f64) if bias else None
    want = F.conv1d(x.permute(1, 0, 2), w[:, None], bs, padding=width - 1, groups=E)
    want = F.silu(want[..., :seqlen]).permute(1, 0, 2)
    torch.testing.assert_close(_ConvSiLU.apply(x, w, bs), want)
    assert torch.autograd.gradcheck(_ConvSiLU.apply, (x, w, bs))


def test_small_vocabulary_embedding_gradient_equals_the_scatters():
    """Up to SMALL_VOCAB rows the embedding's weight gradient is a one-hot matmul (no atomic
    adds); it equals nn.Embedding's. Larger vocabularies and inference keep nn.Embedding's."""
    from mamba_compiled.models.lm import SMALL_VOCAB, Embedding

    for rows in (16, SMALL_VOCAB):
        emb = Embedding(rows, 8, dtype=torch.float64)
        ids = torch.randint(0, rows, (3, 50))
        grad = torch.randn(3, 50, 8, dtype=torch.float64)
        out = emb(ids)
        assert "SmallEmbedding" in out.grad_fn.name()
        out.backward(grad)
        got, emb.weight.grad = emb.weight.grad, None
        F.embedding(ids, emb.weight).backward(grad)
        torch.testing.assert_close(got, emb.weight.grad, rtol=1e-12, atol=1e-12)
    assert Embedding(SMALL_VOCAB + 8, 8)(ids).grad_fn.name() == "EmbeddingBackward0"
    assert Embedding(16, 8, padding_idx=0)(ids % 16).grad_fn.name() == "EmbeddingBackward0"
    with torch.no_grad():
        assert emb(ids).grad_fn is None
    model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=8))
    assert isinstance(model.backbone.embedding, Embedding)  # an nn.Embedding, same names


def test_num_last_tokens_and_position_ids():
    model = tiny().eval()
    ids = torch.randint(0, 20, (2, 11))
    full = model(ids).logits
    assert full.shape == (2, 11, 24)
    torch.testing.assert_close(model(ids, num_last_tokens=3).logits, full[:, -3:])
    torch.testing.assert_close(model(ids, position_ids=torch.arange(11)[None]).logits, full)


def test_causal():
    model = tiny().eval()
    ids = torch.randint(0, 20, (1, 12))
    ids2 = ids.clone()
    ids2[0, 8:] = (ids2[0, 8:] + 1) % 20
    torch.testing.assert_close(model(ids).logits[:, :8], model(ids2).logits[:, :8])


def test_left_padding_mask_equals_unpadded():
    model = tiny().eval()
    ids = torch.randint(0, 20, (1, 9))
    padded = torch.cat([torch.full((1, 5), 7), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    out = model(padded, attention_mask=mask).logits[:, 5:]
    torch.testing.assert_close(out, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_close_to_fp32():
    model = tiny()
    ids = torch.randint(0, 20, (2, 16))
    ref = model(ids).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)


def test_float64_model_runs():
    model = tiny().double()
    assert model(torch.randint(0, 20, (1, 5))).logits.dtype == torch.float64


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ids, exc, match",
    [
        pytest.param(
            torch.tensor([[1, 2, 24]]), ValueError, "input_ids out of range", id="too-large"
        ),
        pytest.param(torch.tensor([[1, -1]]), ValueError, "input_ids out of range", id="negative"),
        pytest.param(torch.ones(1, 4), TypeError, "input_ids .*torch.long", id="float"),
        pytest.param(
            torch.zeros(0, 4, dtype=torch.long), ValueError, "input_ids is empty", id="empty-batch"
        ),
        pytest.param(
            torch.zeros(2, 0, dtype=torch.long), ValueError, "input_ids is empty", id="empty-seq"
        ),
        pytest.param(
            torch.zeros(4, dtype=torch.long),
            ValueError,
            r"input_ids must be \(batch, seqlen\)",
            id="1d",
        ),
        pytest.param([[1, 2]], TypeError, "input_ids must be a torch.Tensor", id="list"),
    ],
)
def test_bad_input_ids(ids, exc, match):
    with pytest.raises(exc, match=match):
        tiny()(ids)


def test_bad_config_type_and_mask_and_inference_params():
    with pytest.raises(TypeError, match="MambaConfig"):
        MambaLMHeadModel(dict(TINY))
    model = tiny()
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(TypeError, match="inference_params"):
        model(ids, inference_params=object())


# ---- torch.compile -----------------------------------------------------------------------------


@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
def test_compile_fullgraph_dynamic_train_step_matches_eager(recompute):
    """Forward and backward compiled once for every batch and length: no graph breaks
    (fullgraph), no recompiles, loss and gradients equal to eager (without recompute). With
    `set_recompute`, the conv and the projections run again in the backward (the partitioner's
    choice; perf/saved_activations.py --recompute shows what it keeps)."""
    torch._dynamo.reset()
    model = tiny()
    eager = copy.deepcopy(model)
    set_recompute(model, recompute)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)

    def loss_and_grads(fn, m, ids):
        m.zero_grad(set_to_none=True)
        logits = fn(ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch, seqlen in [(2, 7), (3, 19), (5, 64)]:
            ids = torch.randint(0, 20, (batch, seqlen))
            loss_c, grads_c = loss_and_grads(compiled, model, ids)
            loss_e, grads_e = loss_and_grads(eager, eager, ids)
            if recompute:  # eager with torch.utils.checkpoint, too
                loss_r, grads_r = loss_and_grads(model, model, ids)
                torch.testing.assert_close(loss_r, loss_e)
                for name in grads_e:
                    torch.testing.assert_close(grads_r[name], grads_e[name], msg=name)
            torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
            for name in grads_e:
                torch.testing.assert_close(
                    grads_c[name], grads_e[name], atol=1e-5, rtol=1e-4, msg=name
                )
