"""Checkpoints: parity with transformers' Mamba, both formats, round trips, bad files."""

import json

import pytest
import torch

from mamba_compiled.models import MambaConfig, MambaLMHeadModel

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def perturb_(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Move every parameter off its init (A_log, D, norms, biases too) so parity is not trivial."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def hf_model(vocab, d_model, n_layer, d_state, rank="auto", tie=True, **kw):
    config = transformers.MambaConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        num_hidden_layers=n_layer,
        state_size=d_state,
        time_step_rank=rank,
        tie_word_embeddings=tie,
        **kw,
    )
    model = transformers.MambaForCausalLM(config).eval()
    perturb_(model)
    return model


@pytest.mark.parametrize(
    "vocab, d_model, n_layer, d_state, seqlen, kw",
    [
        pytest.param(40, 32, 2, 8, 33, {}, id="32x2-L33"),
        pytest.param(
            97, 48, 3, 16, 130, dict(use_bias=True, conv_kernel=3), id="48x3-L130-bias-k3"
        ),
    ],
)
def test_logits_match_transformers(tmp_path, vocab, d_model, n_layer, d_state, seqlen, kw):
    hf = hf_model(vocab, d_model, n_layer, d_state, **kw)
    hf.save_pretrained(tmp_path / "hf")
    ours = MambaLMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, vocab, (2, seqlen))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids).logits
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-4

        # The same weights through mamba_ssm's format, written by us.
        ours.save_pretrained(tmp_path / "ssm", format="mamba_ssm")
        again = MambaLMHeadModel.from_pretrained(tmp_path / "ssm").eval()
        assert (again(ids).logits - expected).abs().max() <= 1e-4


def test_untied_head_matches_transformers(tmp_path):
    hf = hf_model(24, 32, 2, 8, tie=False)
    hf.save_pretrained(tmp_path)
    ours = MambaLMHeadModel.from_pretrained(tmp_path)
    assert not ours.config.tie_embeddings
    ids = torch.randint(0, 24, (1, 17))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_our_hf_format_loads_in_transformers(tmp_path, tie):
    ours = MambaLMHeadModel(
        MambaConfig(d_model=32, n_layer=2, vocab_size=21, d_state=8, tie_embeddings=tie)
    )
    perturb_(ours)
    ours.save_pretrained(tmp_path, format="hf")
    hf = transformers.MambaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 21, (2, 20))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "fmt, safe",
    [("mamba_ssm", True), ("mamba_ssm", False), ("hf", True), ("hf", False)],
    ids=["ssm-safetensors", "ssm-bin", "hf-safetensors", "hf-bin"],
)
def test_round_trip(tmp_path, fmt, safe):
    config = MambaConfig(
        d_model=32, n_layer=2, vocab_size=21, d_state=8, conv_bias=False, bias=True
    )
    model = MambaLMHeadModel(config)
    perturb_(model)
    model.save_pretrained(tmp_path, format=fmt, safe_serialization=safe)
    assert (tmp_path / ("model.safetensors" if safe else "pytorch_model.bin")).is_file()
    loaded = MambaLMHeadModel.from_pretrained(tmp_path)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert loaded.lm_head.weight is loaded.backbone.embedding.weight
    if fmt == "mamba_ssm":
        assert loaded.config == config
    mixer = loaded.backbone.layers[0].mixer
    assert mixer.A_log._no_weight_decay and mixer.dt_proj.bias._no_reinit


def test_reads_mamba_ssm_release_layout(tmp_path):
    """The layout of state-spaces/mamba-130m: a short config.json and a torch.save'd state dict
    holding both the embedding and the (tied) lm_head."""
    model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=50))  # padded to 56
    perturb_(model)
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "d_model": 32,
                "n_layer": 2,
                "vocab_size": 50,
                "ssm_cfg": {},
                "rms_norm": True,
                "residual_in_fp32": True,
                "fused_add_norm": True,
                "pad_vocab_size_multiple": 8,
            }
        )
    )
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = MambaLMHeadModel.from_pretrained(tmp_path, dtype=torch.float16)
    assert loaded.backbone.embedding.weight.shape == (56, 32)
    assert loaded.backbone.embedding.weight.dtype == torch.float16
    assert loaded.backbone.layers[1].mixer.A_log.dtype == torch.float32
    torch.testing.assert_close(
        loaded.backbone.layers[1].mixer.A_log, model.backbone.layers[1].mixer.A_log
    )


def test_sharded_safetensors(tmp_path):
    from safetensors.torch import save_file

    model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=16))
    model.save_pretrained(tmp_path, format="hf")
    from safetensors.torch import load_file

    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, tmp_path / name, metadata={"format": "pt"})
    index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = MambaLMHeadModel.from_pretrained(tmp_path)
    assert torch.equal(loaded.backbone.norm_f.weight, model.backbone.norm_f.weight)


# ---- bad files: the error names the file and the key ------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=16))
    model.save_pretrained(tmp_path)
    return tmp_path


def _rewrite(path, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors")


def test_missing_directory_or_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        MambaLMHeadModel.from_pretrained(tmp_path / "nope")
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        MambaLMHeadModel.from_pretrained(saved)
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        MambaLMHeadModel.from_pretrained(saved)


def test_truncated_file(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors.*truncated or corrupt"):
        MambaLMHeadModel.from_pretrained(saved)


def test_truncated_bin(tmp_path):
    MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=16)).save_pretrained(
        tmp_path, safe_serialization=False
    )
    f = tmp_path / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match="pytorch_model.bin.*truncated or corrupt"):
        MambaLMHeadModel.from_pretrained(tmp_path)


def test_missing_key(saved):
    _rewrite(saved, lambda s: s.pop("backbone.layers.1.mixer.D"))
    with pytest.raises(
        ValueError, match=r"model.safetensors.*missing key 'backbone.layers.1.mixer.D'"
    ):
        MambaLMHeadModel.from_pretrained(saved)


def test_unexpected_key(saved):
    _rewrite(saved, lambda s: s.update({"backbone.layers.2.norm.weight": torch.ones(32)}))
    with pytest.raises(ValueError, match="unexpected key 'backbone.layers.2.norm.weight'"):
        MambaLMHeadModel.from_pretrained(saved)


def test_shape_mismatch(saved):
    _rewrite(saved, lambda s: s.update({"backbone.norm_f.weight": torch.ones(31)}))
    with pytest.raises(
        ValueError, match=r"model.safetensors: key 'backbone.norm_f.weight' has shape \(31,\)"
    ):
        MambaLMHeadModel.from_pretrained(saved)


def test_bad_config(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        MambaLMHeadModel.from_pretrained(saved)
    (saved / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="only Mamba-1"):
        MambaLMHeadModel.from_pretrained(saved)
    (saved / "config.json").write_text(
        json.dumps({"d_model": 32, "n_layer": 2, "ssm_cfg": {"layer": "Mamba2"}})
    )
    with pytest.raises(ValueError, match="Mamba1"):
        MambaLMHeadModel.from_pretrained(saved)


def test_save_errors(tmp_path):
    model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=16, rms_norm=False))
    with pytest.raises(ValueError, match="format"):
        model.save_pretrained(tmp_path, format="gguf")
    with pytest.raises(ValueError, match="LayerNorm"):
        model.save_pretrained(tmp_path, format="hf")
    assert not (tmp_path / "config.json").exists()
    model.save_pretrained(tmp_path)  # LayerNorm models live in mamba_ssm's format
    loaded = MambaLMHeadModel.from_pretrained(tmp_path)
    assert isinstance(loaded.backbone.norm_f, torch.nn.LayerNorm)
