"""The architecture map: every entry resolves on a tiny model of its type, the three adapter
placements run on each, user fields override an entry, and bad input gets a clear error."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.arch import (
    ARCHITECTURES,
    ArchConfig,
    block_submodule,
    resolve_arch,
    transformer_blocks,
)
from deltatune.targeting import is_conv1d

SMALL = {"vocab_size": 100, "max_position_embeddings": 64}


def tiny(model_type: str) -> nn.Module:
    """A 2-block random model of this type (hidden 32), in eval mode."""
    import transformers as tf

    if model_type in ("bert", "roberta"):
        cls = tf.BertConfig if model_type == "bert" else tf.RobertaConfig
        cfg = cls(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            pad_token_id=1,
            **SMALL,
        )
    elif model_type == "distilbert":
        cfg = tf.DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=2, **SMALL)
    elif model_type == "gpt2":
        cfg = tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    else:
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[
            model_type
        ]
        cfg = cls(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            **SMALL,
        )
    torch.manual_seed(0)
    return tf.AutoModel.from_config(cfg).eval()


def inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(2, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def hidden(model: nn.Module) -> torch.Tensor:
    return model(**inputs()).last_hidden_state  # type: ignore[no-any-return]


def is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_entry_resolves_on_its_model(model_type: str) -> None:
    model = tiny(model_type)
    assert model.config.model_type == model_type
    arch = resolve_arch(model, None, ["layers"], "test")
    blocks = transformer_blocks(model, arch)
    assert len(blocks) == 2
    name, block = blocks[1]
    assert name.endswith(".1") or name == "1"
    projections = ("q", "k", "v", "qkv", "attn_out", "ffn_out")
    for field in ("attention", *projections, "ffn"):
        path = getattr(arch, field)
        if path is None:
            continue
        full, module = block_submodule(name, block, path, field)
        assert full == f"{name}.{path}"
        if field in projections:
            assert is_projection(module), (field, type(module))
    # fused or separate q/k/v, never neither
    assert (arch.qkv is not None) != (arch.q is not None)
    for field in ("q", "k", "v", "qkv"):
        path = getattr(arch, field)
        if path is not None:
            assert path.startswith(arch.attention + "."), field
    assert arch.ffn_out.startswith(arch.ffn + ".")
    # ffn_residual says how the feed-forward module is called
    _, ffn = block_submodule(name, block, arch.ffn, "ffn")
    n_args = len(inspect.signature(ffn.forward).parameters)
    assert n_args == (2 if arch.ffn_residual else 1)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
@pytest.mark.parametrize("method", ["houlsby", "pfeiffer", "parallel_adapter"])
def test_adapters_run_on_every_entry(model_type: str, method: str) -> None:
    model = tiny(model_type)
    with torch.no_grad():
        base = hidden(model)
    dt.inject(model, dt.config_from_dict({"name": method, "bottleneck_size": 4}))
    with torch.no_grad():
        assert torch.equal(hidden(model), base)
        for p in dt.trainable_parameters(model):
            p.add_(0.3 * torch.randn_like(p))
        out = hidden(model)
        assert (out - base).abs().max() > 1e-3
        with dt.disabled(model):
            assert torch.equal(hidden(model), base)


def test_bert_and_roberta_share_an_entry_llama_family_too() -> None:
    assert ARCHITECTURES["bert"] == ARCHITECTURES["roberta"]
    assert ARCHITECTURES["llama"] == ARCHITECTURES["mistral"] == ARCHITECTURES["qwen2"]


def test_user_fields_override_the_entry() -> None:
    model = tiny("llama")
    arch = resolve_arch(model, ArchConfig(ffn_out="mlp.up_proj"), ["ffn_out"], "test")
    assert arch.ffn_out == "mlp.up_proj" and arch.attn_out == "self_attn.o_proj"
    assert ARCHITECTURES["llama"].ffn_out == "mlp.down_proj"  # the entry is untouched
    empty = resolve_arch(model, ArchConfig(), ["layers"], "test")
    assert empty == ARCHITECTURES["llama"]


def test_missing_entry_and_missing_field_errors() -> None:
    custom = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(dt.ConfigError) as err:
        resolve_arch(custom, None, ["layers", "attention", "q"], "prefix")
    msg = str(err.value)
    assert msg.startswith("prefix: Sequential (model type None) has no entry")
    assert "arch: {layers: ..., attention: ..., q: ...}" in msg
    assert "q = the query projection" in msg
    gpt2 = tiny("gpt2")
    with pytest.raises(
        dt.ConfigError,
        match=r"entry for model type 'gpt2' has no q, k; .*arch: \{q: \.\.\., k: \.\.\.\}",
    ):
        resolve_arch(gpt2, None, ["layers", "q", "k"], "prefix")


@pytest.mark.parametrize("bad", ["", ".mlp", "mlp..fc", "mlp."])
def test_bad_paths_are_refused(bad: str) -> None:
    with pytest.raises(dt.ConfigError, match="is not a module path"):
        ArchConfig(ffn_out=bad).validate()


def test_longer_layers_path_is_asked_for_when_ambiguous() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Module()
            self.decoder = nn.Module()
            self.encoder.layers = nn.ModuleList([nn.Linear(2, 2)])
            self.decoder.layers = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(dt.ConfigError, match=r"matches 2 modules .*give a longer path"):
        transformer_blocks(Two(), ArchConfig(layers="layers"))
    assert len(transformer_blocks(Two(), ArchConfig(layers="decoder.layers"))) == 1
