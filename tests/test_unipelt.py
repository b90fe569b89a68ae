"""UniPELT: one block's gated attention and gated adapter against the formulas written out by
hand, gates forced shut (= the base model) and open (= LoRA + prefix tuning + Pfeiffer composed
from the single methods with the same tensors), the gate readout, gradients, save/load,
disable, padding, generation with the cache, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import make_bert, make_cnn, make_gpt2, make_llama, text_inputs
from deltatune.kv_prefix import find_prefix_layer
from deltatune.methods.lora import LoraLinear
from deltatune.methods.unipelt import (
    UniPELTAdapterLayer,
    UniPELTAttention,
    UniPELTConfig,
    gate_values,
)

MAKERS = {"bert": make_bert, "gpt2": make_gpt2, "llama": make_llama}
N = 3  # prefix length in these tests


def uni_cfg(**kw: Any) -> dt.MethodConfig:
    return dt.config_from_dict(
        {"name": "unipelt", "r": 4, "num_virtual_tokens": N, "prefix_projection": False, **kw}
    )


def logits(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(**x).logits
    return out


def perturb(model: nn.Module, name: str = "default", seed: int = 0) -> None:
    """Move every adapter tensor (LoRA B and the adapter's up start at zero) and the gates."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in dt.adapter_state_dict(model, name).values():
            t.add_(0.3 * torch.randn(t.shape, generator=gen, dtype=t.dtype))


def attention_layers(model: nn.Module) -> list[UniPELTAttention]:
    return [m for m in model.modules() if isinstance(m, UniPELTAttention)]


def adapter_layers(model: nn.Module) -> list[UniPELTAdapterLayer]:
    return [m for m in model.modules() if isinstance(m, UniPELTAdapterLayer)]


def set_gate_bias(
    model: nn.Module, value: float, parts: tuple[str, ...] = ("lora", "prefix")
) -> None:
    """Force gates: bias ``value`` and zero weights, so every token's gate is sigmoid(value)."""
    with torch.no_grad():
        for layer in attention_layers(model):
            for part in parts:
                if part in ("lora", "prefix"):
                    gate = getattr(layer, f"gate_{part}")["default"]
                    gate.weight.zero_()
                    gate.bias.fill_(value)
        if "adapter" in parts:
            for ad in adapter_layers(model):
                ad.gate_adapter["default"].weight.zero_()
                ad.gate_adapter["default"].bias.fill_(value)


def capture(module: nn.Module, model: nn.Module, x: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The inputs (kwargs included) and output of ``module`` during one forward of ``model``."""
    seen: dict[str, Any] = {}

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        seen.update(args=args, kwargs=kwargs, out=out)

    handle = module.register_forward_hook(hook, with_kwargs=True)
    logits(model, x)
    handle.remove()
    return seen


# --- the formulas, written out --------------------------------------------------------------


@pytest.mark.parametrize("layer_index", [0, 1])
def test_bert_attention_is_the_gated_formula(layer_index: int) -> None:
    """BERT self-attention of one layer, by hand (2 heads of 16, padded row included):

    q = W_q x + b_q + G_L s B_q A_q x,  v = W_v x + b_v + G_L s B_v A_v x,  k = W_k x + b_k
    a_ij ∝ G_P,i e^{s_ij} (prefix j),  e^{s_ij} (real j, unmasked),  s_ij = q_i·k_j / sqrt(16)
    out_i = Σ_j a_ij [P_v ; V]_j,    G = sigmoid(w·x + b)."""
    model = make_bert()
    dt.inject(model, uni_cfg(lora_alpha=8))
    perturb(model)
    layer = attention_layers(model)[layer_index]
    host = find_prefix_layer(model)
    assert host is attention_layers(model)[0]
    x_in = text_inputs()
    seen = capture(layer, model, x_in)
    x = seen["args"][0] if seen["args"] else seen["kwargs"]["hidden_states"]
    out = seen["out"][0]
    att = layer.base_layer
    s = 8 / 4
    with torch.no_grad():
        gl = torch.sigmoid(
            x @ layer.gate_lora["default"].weight.T + layer.gate_lora["default"].bias
        )
        gp = torch.sigmoid(
            x @ layer.gate_prefix["default"].weight.T + layer.gate_prefix["default"].bias
        )

        def lora(key: str) -> torch.Tensor:
            a = layer.lora_A["default"][key].weight
            b = layer.lora_B["default"][key].weight
            return gl * s * (x @ a.T @ b.T)

        q = x @ att.query.weight.T + att.query.bias + lora("q")
        k = x @ att.key.weight.T + att.key.bias
        v = x @ att.value.weight.T + att.value.bias + lora("v")
        batch, seq, heads, hd = x.shape[0], x.shape[1], 2, 16
        p = host.prompt_embeddings["default"].view(N, 2, 2, heads, hd)  # (n, layers, k/v, H, d)
        pk, pv = p[:, layer_index, 0], p[:, layer_index, 1]  # (n, H, d)
        want = torch.empty(batch, seq, heads * hd)
        mask = x_in["attention_mask"].bool()
        for bi in range(batch):
            for h in range(heads):
                qh = q[bi, :, h * hd : (h + 1) * hd]
                keys = torch.cat([pk[:, h], k[bi, :, h * hd : (h + 1) * hd]])
                values = torch.cat([pv[:, h], v[bi, :, h * hd : (h + 1) * hd]])
                weights = torch.exp(qh @ keys.T / math.sqrt(hd))  # (seq, n + seq)
                weights[:, :N] *= gp[bi]  # the gate scales each query's prefix weights
                weights[:, N:] *= mask[bi].float()  # padded keys take no weight
                weights = weights / weights.sum(-1, keepdim=True)
                want[bi, :, h * hd : (h + 1) * hd] = weights @ values
    assert (out - want).abs().max().item() <= 1e-5


def test_adapter_is_the_gated_formula() -> None:
    """LLaMA down_proj output h' = h + sigmoid(h w + b) (relu(h W_down + b_down) W_up + b_up)."""
    model = make_llama()
    dt.inject(model, uni_cfg(bottleneck_size=4))
    perturb(model)
    layer = adapter_layers(model)[1]
    seen = capture(layer, model, text_inputs())
    with torch.no_grad():
        h = layer.base_layer(*seen["args"])
        ad, gate = layer.adapter["default"], layer.gate_adapter["default"]
        g = torch.sigmoid(h @ gate.weight.T + gate.bias)
        want = h + g * (
            torch.relu(h @ ad.down.weight.T + ad.down.bias) @ ad.up.weight.T + ad.up.bias
        )
    assert (seen["out"] - want).abs().max().item() <= 1e-6
    assert layer.last_gates["default"]["adapter"].shape == h.shape[:2]


# --- gates shut and open --------------------------------------------------------------------


def test_gates_shut_give_the_base_model() -> None:
    """All gates at sigmoid(-1e4) = 0: LLaMA computes its base (RoPE: the prefix's position shift
    does not change relative positions); BERT computes its base with positions n + i (absolute
    position embeddings: the prefix still occupies positions 0 .. n-1)."""
    x = text_inputs()
    model = make_llama()
    dt.inject(model, uni_cfg())
    perturb(model)
    base = logits(make_llama(), x)
    assert (logits(model, x) - base).abs().max().item() > 1e-3
    set_gate_bias(model, -1e4, ("lora", "prefix", "adapter"))
    assert (logits(model, x) - base).abs().max().item() <= 1e-5
    for row in gate_values(model, x).values():
        assert row == {"lora": 0.0, "prefix": 0.0, "adapter": 0.0}

    bert = make_bert()
    dt.inject(bert, uni_cfg())
    perturb(bert)
    set_gate_bias(bert, -1e4, ("lora", "prefix", "adapter"))
    seq = x["input_ids"].shape[1]
    shifted = logits(make_bert(), {**x, "position_ids": (torch.arange(seq) + N).unsqueeze(0)})
    assert (logits(bert, x) - shifted).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_gates_open_give_lora_plus_prefix_plus_pfeiffer(kind: str) -> None:
    """All gates at sigmoid(1e4) = 1: the single methods (LoRA on q/v, prefix tuning, Pfeiffer)
    active together, given UniPELT's tensors, compute the same outputs."""
    x = text_inputs()
    q, v = ("query", "value") if kind == "bert" else ("q_proj", "v_proj")
    model = MAKERS[kind]()
    dt.inject(model, uni_cfg(bottleneck_size=8, lora_alpha=8))
    perturb(model)
    set_gate_bias(model, 1e4, ("lora", "prefix", "adapter"))
    ref = MAKERS[kind]()
    # LoRA first: injected after prefix tuning, LoRA skips the first block's projections (they
    # sit inside the PrefixLayer that wraps that block's attention).
    dt.inject(ref, dt.LoraConfig(r=4, lora_alpha=8, target_modules=[q, v]), "l")
    dt.inject(
        ref,
        dt.config_from_dict(
            {"name": "prefix_tuning", "num_virtual_tokens": N, "prefix_projection": False}
        ),
        "p",
    )
    dt.inject(ref, dt.PfeifferConfig(bottleneck_size=8), "a")
    with torch.no_grad():
        find_prefix_layer(ref).prompt_embeddings["p"].copy_(  # type: ignore[union-attr]
            find_prefix_layer(model).prompt_embeddings["default"]  # type: ignore[union-attr]
        )
        # LoRA layers in module order: layer 0 query, layer 0 value, layer 1 query, ...
        loras = iter(m for m in ref.modules() if isinstance(m, LoraLinear))
        for layer in attention_layers(model):
            for key in ("q", "v"):
                target = next(loras)
                assert isinstance(target, LoraLinear)
                target.lora_A["l"].weight.copy_(layer.lora_A["default"][key].weight)
                target.lora_B["l"].weight.copy_(layer.lora_B["default"][key].weight)
        for mine_ad, theirs in zip(
            adapter_layers(model),
            [m for m in ref.modules() if type(m).__name__ == "SerialAdapterLayer"],
            strict=True,
        ):
            for p_mine, p_theirs in zip(
                mine_ad.adapter["default"].parameters(),
                theirs.adapter["a"].parameters(),
                strict=True,
            ):
                p_theirs.copy_(p_mine)
    dt.set_active(ref, ["p", "l", "a"])
    out, want = logits(model, x), logits(ref, x)
    assert (out - want).abs().max().item() <= 1e-5
    for row in gate_values(model, x).values():
        assert row == {"lora": 1.0, "prefix": 1.0, "adapter": 1.0}


# --- the readout ----------------------------------------------------------------------------


def test_gate_values_are_masked_means_per_layer() -> None:
    model = make_bert()
    dt.inject(model, uni_cfg())
    perturb(model)
    with pytest.raises(dt.DeltatuneError, match="no gate values yet"):
        gate_values(model)
    x = text_inputs()  # row 0 has two pads
    values = gate_values(model, x)
    assert sorted(values) == [0, 1]
    mask = x["attention_mask"].bool()
    for layer, ad in zip(attention_layers(model), adapter_layers(model), strict=True):
        i = layer.layer_index
        assert set(values[i]) == {"lora", "prefix", "adapter"}
        for gate, record in (
            ("lora", layer.last_gates["default"]),
            ("prefix", layer.last_gates["default"]),
            ("adapter", ad.last_gates["default"]),
        ):
            assert values[i][gate] == pytest.approx(record[gate][mask].mean().item(), abs=1e-6)
            assert 0.0 < values[i][gate] < 1.0
    # Without inputs: the last forward's mean over every token (pads too).
    unmasked = gate_values(model)
    assert unmasked[0]["lora"] == pytest.approx(
        attention_layers(model)[0].last_gates["default"]["lora"].mean().item(), abs=1e-6
    )
    dt.set_active(model, [])
    with pytest.raises(dt.DeltatuneError, match="no UniPELT adapter is active"):
        gate_values(model)


# --- training, saving, switching ------------------------------------------------------------


def test_gradients_reach_every_part_and_never_the_base() -> None:
    model = make_bert()
    dt.inject(
        model,
        dt.config_from_dict({"name": "unipelt", "task_type": "SEQ_CLS", "bottleneck_size": 8}),
    )
    perturb(model)  # B and up away from zero, so every factor gets a gradient
    model.train()
    loss = model(**text_inputs(), labels=torch.tensor([0, 1, 2])).loss
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    for part in (
        "gate_lora.default",
        "gate_prefix.default",
        "gate_adapter.default",
        "lora_A.default.q",
        "lora_B.default.v",
        "prefix_encoder.default",
        "adapter.default.down",
        "adapter.default.up",
    ):
        grads = [p.grad for n, p in model.named_parameters() if part in n]
        assert grads, part
        assert all(g is not None and g.abs().sum() > 0 for g in grads), part
    assert all(
        any(k in n for k in ("gate_", "lora_", "prefix_encoder", ".adapter.", "classifier"))
        for n in with_grad
    )


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    """Trained through the prefix MLP, saved (folded P) as DELTATUNE_UNIPELT, loaded exactly."""
    x = text_inputs()
    model = make_llama()
    dt.inject(model, dt.config_from_dict({"name": "unipelt", "num_virtual_tokens": N}))
    perturb(model)
    out = logits(model, x)
    dt.save_adapter(model, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "DELTATUNE_UNIPELT"
    assert raw["inference_mode"] is True and raw["prefix_projection"] is True
    keys = set(dt.adapter_state_dict(model))
    assert "base_model.model.model.layers.0.self_attn.prompt_embeddings" in keys
    assert "base_model.model.model.layers.1.self_attn.gate_prefix.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.gate_adapter.bias" in keys
    fresh = make_llama()
    dt.load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, x), out)
    assert gate_values(fresh, x) == gate_values(model, x)
    assert not any(p.requires_grad for p in fresh.parameters())


def test_disable_gives_exactly_the_base_and_delete_removes_everything() -> None:
    x = text_inputs()
    model = make_gpt2()
    base = logits(model, x)
    dt.inject(model, uni_cfg())
    perturb(model)
    assert (logits(model, x) - base).abs().max().item() > 1e-3
    with dt.disabled(model):
        assert torch.equal(logits(model, x), base)
    dt.delete(model, "default")
    assert not list(dt.adapter_layers(model))
    assert find_prefix_layer(model) is None
    assert torch.equal(logits(model, x), base)


def test_merge_is_refused_clearly() -> None:
    model = make_bert()
    dt.inject(model, uni_cfg())
    with pytest.raises(dt.DeltatuneError, match=r"unipelt\) cannot be merged"):
        dt.merge(model)


def test_paper_defaults_counted_by_hand() -> None:
    """r = 8, n = 10 through the MLP, m = hidden / 16 on the tiny BERT (hidden 32, 2 layers,
    token_dim 32): per layer LoRA q, v 2 * 8 * (32 + 32) = 1024, gates 3 * 33 = 99, adapter
    m = 2: 32*2 + 2 + 2*32 + 32 = 162; prefix MLP E 10*32 + W1 32*32 + 32 + W2 32*128 + 128;
    saved, the prefix is 10 * 128."""
    cfg = dt.config_from_dict({"name": "unipelt"})
    assert isinstance(cfg, UniPELTConfig)
    assert (cfg.r, cfg.num_virtual_tokens, cfg.reduction_factor) == (8, 10, None)
    model = make_bert()
    dt.inject(model, cfg)
    per_layer = 1024 + 99 + 162
    mlp = 10 * 32 + (32 * 32 + 32) + (32 * 128 + 128)
    assert dt.trainable_report(model).trainable == 2 * per_layer + mlp
    saved = dt.adapter_state_dict(model)
    assert sum(t.numel() for t in saved.values()) == 2 * per_layer + 10 * 128


def test_two_adapters_gate_their_own_prefix_columns() -> None:
    """Two active UniPELT adapters: each adapter's G_P scales its own prefix columns only;
    shutting the second's gates and zeroing its LoRA/adapter leaves the first alone."""
    x = text_inputs()
    model = make_llama()
    dt.inject(model, uni_cfg(), "a")
    perturb(model, "a")
    # With "b" active too, the real tokens sit after 3 + 2 prefix positions: give "a" alone
    # the same positions (RoPE rotates the queries that meet the position-free prefix keys).
    seq = x["input_ids"].shape[1]
    alone = logits(model, {**x, "position_ids": (torch.arange(seq) + 2).unsqueeze(0)})
    dt.inject(model, uni_cfg(num_virtual_tokens=2), "b")
    perturb(model, "b", seed=3)
    dt.set_active(model, ["a", "b"])
    both = logits(model, x)
    assert (both - alone).abs().max().item() > 1e-3
    with torch.no_grad():
        for layer in attention_layers(model):
            for gate in (layer.gate_lora["b"], layer.gate_prefix["b"]):
                gate.weight.zero_()
                gate.bias.fill_(-1e4)
        for ad in adapter_layers(model):
            ad.gate_adapter["b"].weight.zero_()
            ad.gate_adapter["b"].bias.fill_(-1e4)
    assert (logits(model, x) - alone).abs().max().item() <= 1e-5


# --- padding and generation -----------------------------------------------------------------


def _pad(rows: list[torch.Tensor], side: str) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl] = r
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_padded_batch_equals_single_examples(kind: str, side: str) -> None:
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, 100, (k,), generator=gen) for k in (6, 3, 5)]
    model = MAKERS[kind]()
    dt.inject(model, uni_cfg())
    perturb(model)
    batch = logits(model, _pad(rows, side))
    width = batch.shape[1]
    for i, r in enumerate(rows):
        single = logits(model, {"input_ids": r[None]})[0]
        got = batch[i, width - len(r) :] if side == "left" else batch[i, : len(r)]
        assert (got - single).abs().max().item() <= 1e-5, (i, side)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generation_with_cache_equals_without(kind: str) -> None:
    """Per-token gates depend only on their own token, so the key/value cache reproduces the
    uncached computation step by step (greedy, left-padded batch)."""
    gen = torch.Generator().manual_seed(7)
    rows = [torch.randint(1, 100, (k,), generator=gen) for k in (5, 2, 4)]
    model = MAKERS[kind]()
    torch.manual_seed(0)
    dt.inject(model, uni_cfg(prefix_projection=True))
    perturb(model)
    batch = _pad(rows, "left")
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with_cache = model.generate(**batch, use_cache=True, **settings)
    without = model.generate(**batch, use_cache=False, **settings)
    assert torch.equal(with_cache, without)
    base = MAKERS[kind]().generate(**batch, use_cache=True, **settings)
    assert not torch.equal(base, with_cache)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"r": 0}, "r"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"lora_alpha": float("inf")}, "lora_alpha"),
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"reduction_factor": 4, "bottleneck_size": 8}, "reduction_factor"),
        ({"dropout": 1.5}, "dropout"),
        ({"encoder_hidden_size": -1}, "encoder_hidden_size"),
        ({"prefix_init": "ones"}, "prefix_init"),
    ],
)
def test_bad_config_names_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(dt.ConfigError, match=field):
        uni_cfg(**options)


def test_model_without_attention_is_refused_untouched() -> None:
    model = make_cnn()
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(dt.ConfigError, match="unipelt"):
        dt.inject(model, uni_cfg())
    assert [n for n, _ in model.named_modules()] == before


def test_other_prefix_methods_cannot_share_the_model() -> None:
    model = make_bert()
    dt.inject(model, dt.config_from_dict({"name": "prefix_tuning", "num_virtual_tokens": 2}), "p")
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(dt.ConfigError, match="already has key/value prefixes"):
        dt.inject(model, uni_cfg())
    assert [n for n, _ in model.named_modules()] == before
    other = make_bert()
    dt.inject(other, uni_cfg())
    with pytest.raises(dt.ConfigError, match="belong to a UniPELT adapter"):
        dt.inject(other, dt.config_from_dict({"name": "prefix_tuning"}), "p")
    assert dt.adapter_names(other) == ["default"]


def test_attention_without_an_additive_mask_is_refused() -> None:
    model = make_llama()
    dt.inject(model, uni_cfg())
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(dt.DeltatuneError, match="attn_implementation='sdpa'"):
        logits(model, text_inputs())


def test_token_dim_mismatch_is_refused() -> None:
    with pytest.raises(dt.ConfigError, match="token_dim"):
        dt.inject(make_bert(), uni_cfg(token_dim=48))


@pytest.mark.slow
def test_trains_on_the_embedded_task_and_reloads_exactly(tmp_path: Path) -> None:
    """configs/unipelt.yaml on MiniLM + BBC News (a small subset): trains, saves, and
    `deltatune eval`'s loader reproduces the run's test metrics exactly."""
    from deltatune.run import evaluate_run, load_run_config, train_run

    cfg = load_run_config(
        Path(__file__).resolve().parent.parent / "configs" / "unipelt.yaml",
        [
            "data.max_train_examples=48",
            "data.max_eval_examples=32",
            "train.epochs=1",
            "train.progress=false",
            f"output_dir={tmp_path}",
        ],
    )
    result = train_run(cfg, echo=lambda *_a, **_k: None)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "DELTATUNE_UNIPELT" and saved["inference_mode"] is True
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as fh:
        total = sum(fh.get_tensor(k).numel() for k in fh.keys())  # noqa: SIM118
    # MiniLM (6 layers, hidden 384): LoRA q, v 2 * 8 * 768 = 12,288; gates 3 * 385 = 1,155;
    # adapter m = 24: 384*24 + 24 + 24*384 + 384 = 18,840 -> 32,283 per layer, 193,698 in all;
    # folded prefix 10 * 6 * 2 * 384 = 46,080; head 384*5 + 5 = 1,925.
    assert total == 193_698 + 46_080 + 1_925
    again = evaluate_run(tmp_path, [])
    assert again["loss"] == pytest.approx(result.metrics["test"]["loss"], abs=1e-6)
    assert again["accuracy"] == result.metrics["test"]["accuracy"]
