"""Checkpoints in local directories, in the two formats Mamba-1 weights are published in.

    mamba_ssm      config.json {"d_model", "n_layer", "ssm_cfg", ...};
                   keys backbone.embedding.weight,
                   backbone.layers.{i}.(norm|mixer).*, backbone.norm_f.weight, lm_head.weight
    hf             config.json {"model_type": "mamba", "hidden_size", ...}; keys as above but
                   backbone.embeddings.weight (transformers' MambaForCausalLM)

Weights are read from model.safetensors, pytorch_model.bin (with torch.load(weights_only=True)),
or their sharded *.index.json forms, and written as model.safetensors (or pytorch_model.bin with
safe_serialization=False, the file mamba_ssm's own from_pretrained reads). Loading checks every
key and shape before touching the model: a missing, truncated or mismatched file raises an error
naming the file and the key, never returns a half-loaded model. No hub: directories only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mamba_compiled.models.config import MambaConfig

if TYPE_CHECKING:
    from mamba_compiled.models.lm import MambaLMHeadModel

CONFIG_NAME = "config.json"
SAFE_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
_HF_EMBEDDING = "backbone.embeddings.weight"
_EMBEDDING = "backbone.embedding.weight"
_LM_HEAD = "lm_head.weight"
_FP32_PARAMS = (
    "mixer.A_log",
    "mixer.D",
)  # kept in float32 whatever the model's dtype (as mamba_ssm)


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:
        raise ImportError(
            "reading or writing .safetensors files needs the safetensors package: "
            "pip install safetensors (or pip install 'mamba-compiled[dev]')"
        ) from e
    return safetensors.torch


def read_config(path: Path) -> tuple[MambaConfig, str]:
    """The config of a checkpoint directory and its format, "mamba_ssm" or "hf"."""
    file = path / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(
            f"{file}: missing; a checkpoint directory holds config.json and weights"
        )
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    config = MambaConfig.from_json_dict(data, source=str(file))
    return config, ("hf" if "model_type" in data else "mamba_ssm")


def _load_file(file: Path) -> dict[str, Tensor]:
    try:
        if file.suffix == ".safetensors":
            return _safetensors().load_file(str(file), device="cpu")
        state = torch.load(file, map_location="cpu", weights_only=True)
    except ImportError:
        raise
    except Exception as e:  # truncated or corrupt: say which file
        raise ValueError(
            f"{file}: cannot read weights, the file is truncated or corrupt ({e})"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{file}: expected a flat dict of tensors (a state dict)")
    return state


def read_weights(path: Path) -> dict[str, tuple[Tensor, Path]]:
    """Every tensor of a checkpoint directory with the file it came from."""
    for index_name, single in (
        (SAFE_NAME + ".index.json", SAFE_NAME),
        (BIN_NAME + ".index.json", BIN_NAME),
    ):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
                raise ValueError(f"{index}: not a valid index (needs a 'weight_map' object)") from e
            files = sorted({path / name for name in weight_map.values()})
            break
        if (path / single).is_file():
            files = [path / single]
            break
    else:
        raise FileNotFoundError(
            f"{path}: no weights; expected {SAFE_NAME}, {BIN_NAME} or a sharded *.index.json"
        )
    out: dict[str, tuple[Tensor, Path]] = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing (listed in the index of {path})")
        for key, tensor in _load_file(file).items():
            out[key] = (tensor, file)
    return out


def load_pretrained(cls: type[MambaLMHeadModel], path, device=None, dtype=None) -> MambaLMHeadModel:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: not a directory; from_pretrained reads a local checkpoint directory "
            "(config.json and model.safetensors or pytorch_model.bin)"
        )
    config, fmt = read_config(path)
    weights = read_weights(path)
    if fmt == "hf":
        if not any(k.startswith("backbone.") for k in weights):  # a bare MambaModel checkpoint
            weights = {("backbone." + k if k != _LM_HEAD else k): v for k, v in weights.items()}
        if _HF_EMBEDDING in weights:
            weights[_EMBEDDING] = weights.pop(_HF_EMBEDDING)

    dtype = dtype if dtype is not None else torch.get_default_dtype()
    with torch.device("meta"):
        model = cls(config, dtype=dtype)
    expected = model.state_dict()
    if config.tie_embeddings:
        del expected[_LM_HEAD]
        if _LM_HEAD in weights and _EMBEDDING in weights:
            (head, file), (emb, _) = weights.pop(_LM_HEAD), weights[_EMBEDDING]
            if head.shape != emb.shape or not torch.equal(head, emb):
                raise ValueError(
                    f"{file}: {_LM_HEAD} differs from the embedding but the config ties them "
                    "(tie_embeddings / tie_word_embeddings is true)"
                )
    state: dict[str, Tensor] = {}
    for key, ref in expected.items():
        if key not in weights:
            files = sorted({str(f) for _, f in weights.values()})
            raise ValueError(f"{', '.join(files)}: missing key {key!r} ({fmt} format)")
        tensor, file = weights[key]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise ValueError(
                f"{file}: key {key!r} has shape {tuple(tensor.shape)}, the config "
                f"({path / CONFIG_NAME}) needs {tuple(ref.shape)}"
            )
        if not tensor.is_floating_point():
            raise ValueError(
                f"{file}: key {key!r} has dtype {tensor.dtype}, expected floating point"
            )
        state[key] = tensor.to(ref.dtype)  # A_log and D stay float32
    for key, (_, file) in weights.items():
        if key not in expected:
            raise ValueError(f"{file}: unexpected key {key!r} for this config ({fmt} format)")

    model = model.to_empty(device=device if device is not None else "cpu")
    for layer in model.backbone.layers:
        layer.mixer.tag_parameters()  # to_empty made new Parameter objects
    if config.tie_embeddings:
        model.tie_weights()
        state[_LM_HEAD] = state[_EMBEDDING]
    model.load_state_dict(state, strict=True)
    return model


def _write_atomic(file: Path, write) -> None:
    tmp = file.with_name(file.name + ".tmp")
    write(tmp)
    os.replace(tmp, file)


def save_pretrained(
    model: MambaLMHeadModel, path, format: str = "mamba_ssm", safe_serialization: bool = True
) -> None:
    if format not in ("mamba_ssm", "hf"):
        raise ValueError(f"format must be 'mamba_ssm' or 'hf', got {format!r}")
    config: MambaConfig = model.config
    config_json = config.to_mamba_ssm_dict() if format == "mamba_ssm" else config.to_hf_dict()
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if config.tie_embeddings and (safe_serialization or format == "hf"):
        del state[_LM_HEAD]  # one tensor, two names: safetensors stores it once, loaders re-tie
    if format == "hf":
        state[_HF_EMBEDDING] = state.pop(_EMBEDDING)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if safe_serialization:
        st = _safetensors()
        _write_atomic(
            path / SAFE_NAME, lambda f: st.save_file(state, str(f), metadata={"format": "pt"})
        )
    else:
        _write_atomic(path / BIN_NAME, lambda f: torch.save(state, f))
    text = json.dumps(config_json, indent=2) + "\n"
    _write_atomic(path / CONFIG_NAME, lambda f: f.write_text(text))
