"""LLaMA-Adapter v1: exact base at initialisation, the gated prompt attention written out,
Hugging Face PEFT (adaption prompt) interop both ways, padding and generation with the cache."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import make_bert, make_gpt2, make_llama, text_inputs
from deltatune.methods.llama_adapter import AdaptionPromptLayer


def cfg(**kw: Any) -> dt.MethodConfig:
    return dt.config_from_dict(
        {"name": "llama_adapter", "adapter_len": 3, "adapter_layers": 1, **kw}
    )


def logits(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(**x).logits
    return out


def open_gates(model: nn.Module, value: float = 0.7) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaption_gate" in name:
                p.fill_(value)


def test_starts_exactly_at_the_base() -> None:
    base = make_llama()
    model = make_llama()
    dt.inject(model, cfg(adapter_layers=2, adapter_len=5))
    gen = torch.Generator().manual_seed(4)
    for x in (text_inputs(), {"input_ids": torch.randint(0, 100, (2, 9), generator=gen)}):
        assert torch.equal(logits(model, x), logits(base, x))
    # ... and the zero gate is the only thing that holds it there.
    open_gates(model)
    assert (logits(model, text_inputs()) - logits(base, text_inputs())).abs().max() > 1e-3


def test_only_the_top_layers_are_adapted_with_peft_names() -> None:
    model = make_llama()
    dt.inject(model, cfg())
    wrapped = [n for n, m in model.named_modules() if isinstance(m, AdaptionPromptLayer)]
    assert wrapped == ["model.layers.1.self_attn"]
    assert sorted(dt.adapter_state_dict(model)) == [
        "base_model.model.model.layers.1.self_attn.adaption_gate",
        "base_model.model.model.layers.1.self_attn.adaption_prompt",
    ]


def rope(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = q.shape[-1] // 2
    rotated = torch.cat([-q[..., half:], q[..., :half]], dim=-1)
    return q * cos[:, None] + rotated * sin[:, None]


def test_output_equals_the_formula_written_out() -> None:
    """y = attention(x) + W_o concat_h[ g softmax(RoPE(q_h) k_h^T / sqrt(d)) v_h ],
    k = A W_k, v = A W_v shared by the 2 query heads of the one key/value head (GQA)."""
    model = make_llama()
    torch.manual_seed(0)
    dt.inject(model, cfg(adapter_len=4))
    open_gates(model, 0.6)
    layer = model.model.layers[1].self_attn
    assert isinstance(layer, AdaptionPromptLayer)
    attn = layer.base_layer
    seen: dict[str, Any] = {}

    def grab_in(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["h"], seen["rope"] = kwargs["hidden_states"], kwargs["position_embeddings"]

    def grab_out(module: nn.Module, args: Any, out: Any) -> None:
        seen["base"] = out[0]

    def grab_final(module: nn.Module, args: Any, out: Any) -> None:
        seen["final"] = out[0]

    hooks = [
        attn.register_forward_pre_hook(grab_in, with_kwargs=True),
        attn.register_forward_hook(grab_out),
        layer.register_forward_hook(grab_final),
    ]
    logits(model, text_inputs())
    for h in hooks:
        h.remove()
    h, (cos, sin) = seen["h"], seen["rope"]
    b, s, _ = h.shape
    A = layer.adaption_prompt["default"][0]  # (4, 32)
    g = layer.adaption_gate["default"]
    with torch.no_grad():
        q = rope(attn.q_proj(h).view(b, s, 2, 16).transpose(1, 2), cos, sin)  # (b, 2, s, 16)
        k = attn.k_proj(A).view(4, 16)  # one key/value head
        v = attn.v_proj(A).view(4, 16)
        heads = [g * torch.softmax(q[:, i] @ k.T / math.sqrt(16), dim=-1) @ v for i in range(2)]
        ref = seen["base"] + torch.cat(heads, dim=-1) @ attn.o_proj.weight.T
    assert (seen["final"] - ref).abs().max().item() <= 1e-5


def test_peft_loads_ours_with_the_same_outputs(tmp_path: Path) -> None:
    from peft import PeftModel

    x = text_inputs()
    model = make_llama()
    torch.manual_seed(0)
    dt.inject(model, cfg(adapter_layers=2, task_type="CAUSAL_LM"))
    open_gates(model)
    ours = logits(model, x)
    dt.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(make_llama(), tmp_path).eval()
    assert (logits(theirs, x) - ours).abs().max().item() <= 1e-5


def test_we_load_peft_adapters_with_the_same_outputs(tmp_path: Path) -> None:
    from peft import AdaptionPromptConfig, get_peft_model

    x = text_inputs()
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            make_llama(),
            AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=5, adapter_layers=2),
        ).eval()
        open_gates(peft_model, -0.4)
        theirs = logits(peft_model, x)
        peft_model.save_pretrained(tmp_path)
    model = make_llama()
    dt.load_adapter(model, tmp_path)
    assert (logits(model, x) - theirs).abs().max().item() <= 1e-5
    assert (logits(model, x) - logits(make_llama(), x)).abs().max().item() > 1e-3


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
def test_padded_batch_equals_single_examples(side: str) -> None:
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, 100, (k,), generator=gen) for k in (6, 3, 5)]
    model = make_llama()
    dt.inject(model, cfg(adapter_layers=2))
    open_gates(model)
    batch = logits(model, _pad(rows, side))
    width = batch.shape[1]
    for i, r in enumerate(rows):
        single = logits(model, {"input_ids": r[None]})[0]
        got = batch[i, width - len(r) :] if side == "left" else batch[i, : len(r)]
        assert (got - single).abs().max().item() <= 1e-5


def test_generation_with_cache_equals_without_and_single() -> None:
    gen = torch.Generator().manual_seed(7)
    rows = [torch.randint(1, 100, (k,), generator=gen) for k in (5, 2, 4)]
    model = make_llama()
    torch.manual_seed(0)
    dt.inject(model, cfg(adapter_layers=2))
    open_gates(model, 1.5)
    batch = _pad(rows, "left")
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with_cache = model.generate(**batch, use_cache=True, **settings)
    assert torch.equal(with_cache, model.generate(**batch, use_cache=False, **settings))
    for i, r in enumerate(rows):
        alone = model.generate(input_ids=r[None], use_cache=True, **settings)
        assert torch.equal(with_cache[i, -6:], alone[0, -6:])
    assert not torch.equal(make_llama().generate(**batch, use_cache=True, **settings), with_cache)


def test_two_active_adapters_add_up() -> None:
    x = text_inputs()
    base = logits(make_llama(), x)
    model = make_llama()
    torch.manual_seed(0)
    dt.inject(model, cfg(), "a")
    dt.inject(model, cfg(adapter_len=2), "b")
    open_gates(model)
    deltas = {}
    for name in ("a", "b"):
        dt.set_active(model, name)
        deltas[name] = logits(model, x)
    dt.set_active(model, ["a", "b"])
    both = logits(model, x)
    # Same layer: the two gated terms add inside the attention (before the non-linear rest),
    # so compare the layer output rather than the logits.
    layer = model.model.layers[1].self_attn
    h = torch.randn(1, 4, 32)
    pos = torch.arange(4).unsqueeze(0)
    rope_emb = model.model.rotary_emb(h, pos)
    with torch.no_grad():
        outs = {}
        for active in (["a"], ["b"], ["a", "b"], []):
            layer.set_active(active)
            outs[tuple(active)] = layer(
                hidden_states=h, position_embeddings=rope_emb, attention_mask=None
            )[0]
    total = outs[("a",)] + outs[("b",)] - outs[()]
    assert (outs[("a", "b")] - total).abs().max().item() <= 1e-5
    assert (both - base).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (make_gpt2, r"has no q, k, v"),
        (make_bert, r"arch\.attn_out='attention\.output\.dense' must lie inside"),
    ],
    ids=["gpt2", "bert"],
)
def test_non_llama_models_get_a_clear_error(make: Any, match: str) -> None:
    with pytest.raises(dt.ConfigError, match=match):
        dt.inject(make(), cfg())


def test_bad_values_raise_config_errors() -> None:
    with pytest.raises(dt.ConfigError, match="adapter_len=0"):
        cfg(adapter_len=0)
    with pytest.raises(dt.ConfigError, match="adapter_layers=0"):
        cfg(adapter_layers=0)
    with pytest.raises(dt.ConfigError, match="adapter_layers=3 is more than the model's 2 blocks"):
        dt.inject(make_llama(), cfg(adapter_layers=3))
    with pytest.raises(dt.ConfigError, match=r"must lie inside the attention module .attn."):
        dt.inject(make_llama(), cfg(target_modules="attn"))
