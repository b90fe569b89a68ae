"""Prefix tuning (and the shared key/value prefix machinery): the attention formula written
out, Hugging Face PEFT interop both ways, folding the MLP, padding, generation with the cache."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import make_bert, make_cnn, make_gpt2, make_llama, text_inputs
from deltatune.kv_prefix import PrefixLayer, find_prefix_layer
from deltatune.methods.prefix_tuning import fold_prefix

MAKERS = {"bert": make_bert, "gpt2": make_gpt2, "llama": make_llama}
TASKS = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM"}


def prefix_cfg(**kw: Any) -> dt.MethodConfig:
    return dt.config_from_dict({"name": "prefix_tuning", "num_virtual_tokens": 3, **kw})


def logits(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(**x).logits
    return out


def layer_of(model: nn.Module) -> PrefixLayer:
    layer = find_prefix_layer(model)
    assert layer is not None
    return layer


# --- the formula ----------------------------------------------------------------------------


def test_bert_attention_equals_the_formula_written_out() -> None:
    """head_h = softmax(q_h [P_k ; K_h]^T / sqrt(d) + pad mask) [P_v ; V_h], real tokens at
    positions n + i, with P in PEFT's (n, layers * 2 * token_dim) layout."""
    n, d, heads = 3, 16, 2
    model = make_bert()
    dt.inject(model, prefix_cfg(prefix_projection=False))
    layer = layer_of(model)
    x = text_inputs()
    captured: dict[str, Any] = {}

    def grab(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        captured["h"] = args[0] if args else kwargs["hidden_states"]
        captured["out"] = out[0]

    handle = layer.base_layer.register_forward_hook(grab, with_kwargs=True)
    logits(model, x)
    handle.remove()
    h, out = captured["h"], captured["out"]
    # The layer's input: embeddings at the shifted positions n, n+1, ...
    seq = x["input_ids"].shape[1]
    with torch.no_grad():
        emb = model.bert.embeddings(
            input_ids=x["input_ids"], position_ids=torch.arange(n, n + seq).unsqueeze(0)
        )
    assert torch.allclose(h, emb, atol=1e-6)
    attn = layer.base_layer
    P = layer.prompt_embeddings["default"].detach()
    pk = P[:, 0:32].view(n, heads, d).transpose(0, 1)  # layer 0 keys   (heads, n, d)
    pv = P[:, 32:64].view(n, heads, d).transpose(0, 1)  # layer 0 values
    b = h.shape[0]
    with torch.no_grad():
        q = attn.query(h).view(b, seq, heads, d).transpose(1, 2)
        k = attn.key(h).view(b, seq, heads, d).transpose(1, 2)
        v = attn.value(h).view(b, seq, heads, d).transpose(1, 2)
        keys = torch.cat([pk.expand(b, -1, -1, -1), k], dim=2)
        values = torch.cat([pv.expand(b, -1, -1, -1), v], dim=2)
        scores = q @ keys.transpose(2, 3) / math.sqrt(d)
        visible = torch.cat([torch.ones(b, n), x["attention_mask"].float()], dim=1).bool()
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        ref = (scores.softmax(-1) @ values).transpose(1, 2).reshape(b, seq, heads * d)
    assert (out - ref).abs().max().item() <= 1e-5


def test_prefix_is_visible_to_every_token_and_causality_is_kept() -> None:
    """GPT-2: changing a later token leaves earlier outputs unchanged; changing P moves the
    first token's output (it attends to the prefix)."""
    model = make_gpt2()
    dt.inject(model, prefix_cfg(prefix_projection=False))
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(3))
    out = logits(model, {"input_ids": ids})
    later = ids.clone()
    later[0, 4] = (later[0, 4] + 1) % 100
    assert torch.allclose(logits(model, {"input_ids": later})[:, :4], out[:, :4], atol=1e-6)
    with torch.no_grad():
        layer_of(model).prompt_embeddings["default"].add_(0.5)
    assert (logits(model, {"input_ids": ids})[:, 0] - out[:, 0]).abs().max() > 1e-3


# --- PEFT interop -----------------------------------------------------------------------------


@pytest.mark.parametrize("projection", [False, True], ids=["direct", "mlp"])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_peft_loads_ours_with_the_same_outputs(kind: str, projection: bool, tmp_path: Path) -> None:
    from peft import PeftModel

    x = text_inputs()
    model = MAKERS[kind]()
    torch.manual_seed(0)
    dt.inject(model, prefix_cfg(prefix_projection=projection, task_type=TASKS[kind]))
    ours = logits(model, x)
    dt.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(MAKERS[kind](), tmp_path).eval()
    assert (logits(theirs, x) - ours).abs().max().item() <= 1e-5
    assert (ours - logits(MAKERS[kind](), x)).abs().max().item() > 1e-3


@pytest.mark.parametrize("projection", [False, True], ids=["direct", "mlp"])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_we_load_peft_adapters_with_the_same_outputs(
    kind: str, projection: bool, tmp_path: Path
) -> None:
    from peft import PrefixTuningConfig, get_peft_model

    x = text_inputs()
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            MAKERS[kind](),
            PrefixTuningConfig(
                task_type=TASKS[kind], num_virtual_tokens=3, prefix_projection=projection
            ),
        ).eval()
        with torch.no_grad():  # move PEFT's head copy too, so that the head is checked
            for name, p in peft_model.named_parameters():
                if "modules_to_save" in name:
                    p.add_(0.1 * torch.randn_like(p))
        theirs = logits(peft_model, x)
        peft_model.save_pretrained(tmp_path)
    model = MAKERS[kind]()
    dt.load_adapter(model, tmp_path)
    assert (logits(model, x) - theirs).abs().max().item() <= 1e-5
    # A loaded adapter is a plain prefix (PEFT's inference mode), whatever prefix_projection says.
    assert not layer_of(model).prefix_encoder


# --- the MLP and folding ----------------------------------------------------------------------


def _train_steps(model: nn.Module, steps: int = 3) -> list[float]:
    x = text_inputs()
    labels = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    opt = torch.optim.Adam(dt.trainable_parameters(model), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(**x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_mlp_trains_then_folds_with_equal_outputs(tmp_path: Path) -> None:
    x = text_inputs()
    model = make_llama()
    torch.manual_seed(0)
    dt.inject(model, prefix_cfg(prefix_projection=True, encoder_hidden_size=24))
    layer = layer_of(model)
    # Trainable: E (3 x 16) + W1 (16 -> 24) + W2 (24 -> 2 * 2 * 16 = 64)
    assert dt.trainable_report(model).trainable == 3 * 16 + (16 * 24 + 24) + (24 * 64 + 64)
    losses = _train_steps(model, 4)
    assert losses[-1] < losses[0]
    before = logits(model, x)
    dt.save_adapter(model, tmp_path / "unfolded")
    assert fold_prefix(model) == ["default"]
    assert fold_prefix(model) == []
    assert not layer.prefix_encoder
    assert torch.equal(logits(model, x), before)
    assert dt.trainable_report(model).trainable == 3 * 64
    assert dt.adapter_state_dict(model).keys() == {"prompt_embeddings"}
    # Saving before folding already stored only the folded prefix.
    dt.save_adapter(model, tmp_path / "folded")
    fresh, again = make_llama(), make_llama()
    dt.load_adapter(fresh, tmp_path / "unfolded")
    dt.load_adapter(again, tmp_path / "folded")
    assert torch.equal(logits(fresh, x), before)
    assert torch.equal(logits(again, x), before)
    # Folded training continues on P directly.
    assert _train_steps(model, 2)[-1] < losses[-1]


def test_zero_init_weights() -> None:
    for projection in (False, True):
        model = make_gpt2()
        dt.inject(model, prefix_cfg(prefix_projection=projection, init_weights="zero"))
        assert torch.count_nonzero(layer_of(model).prefix("default")) == 0


# --- padding, positions, generation -----------------------------------------------------------


def _pad(rows: list[torch.Tensor], side: str) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl] = r
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _real_outputs(model: nn.Module, kind: str, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        if kind == "bert":  # the pooler reads token 0, a pad under left padding: compare tokens
            out: torch.Tensor = model(**x, output_hidden_states=True).hidden_states[-1]
        else:
            out = model(**x).logits
    return out


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method", ["prefix_tuning", "p_tuning_v2"])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_padded_batch_equals_single_examples(kind: str, method: str, side: str) -> None:
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, 100, (k,), generator=gen) for k in (6, 3, 5)]
    model = MAKERS[kind]()
    options = {"prefix_projection": False} if method == "prefix_tuning" else {}
    dt.inject(model, dt.config_from_dict({"name": method, "num_virtual_tokens": 3, **options}))
    batch = _real_outputs(model, kind, _pad(rows, side))
    width = batch.shape[1]
    for i, r in enumerate(rows):
        single = _real_outputs(model, kind, {"input_ids": r[None]})[0]
        got = batch[i, width - len(r) :] if side == "left" else batch[i, : len(r)]
        assert (got - single).abs().max().item() <= 1e-5, (i, side)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generation_with_cache_equals_without_and_single(kind: str) -> None:
    gen = torch.Generator().manual_seed(7)
    rows = [torch.randint(1, 100, (k,), generator=gen) for k in (5, 2, 4)]
    model = MAKERS[kind]()
    torch.manual_seed(0)
    dt.inject(model, prefix_cfg(prefix_projection=True))
    batch = _pad(rows, "left")
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with_cache = model.generate(**batch, use_cache=True, **settings)
    without = model.generate(**batch, use_cache=False, **settings)
    assert torch.equal(with_cache, without)
    for i, r in enumerate(rows):
        alone = model.generate(input_ids=r[None], use_cache=True, **settings)
        assert torch.equal(with_cache[i, -6:], alone[0, -6:])
    # And the prefix matters: the base model generates something else for some row.
    base = MAKERS[kind]().generate(**batch, use_cache=True, **settings)
    assert not torch.equal(base, with_cache)


def test_explicit_position_ids_are_shifted_like_peft() -> None:
    x = text_inputs()
    model = make_llama()
    dt.inject(model, prefix_cfg(prefix_projection=False))
    seq = x["input_ids"].shape[1]
    given = logits(model, {**x, "position_ids": torch.arange(seq).unsqueeze(0)})
    assert torch.allclose(given, logits(model, x), atol=1e-6)


# --- several adapters, switching --------------------------------------------------------------


def test_two_active_prefixes_concatenate() -> None:
    x = text_inputs()
    model = make_gpt2()
    torch.manual_seed(0)
    dt.inject(model, prefix_cfg(prefix_projection=False), "a")
    dt.inject(model, prefix_cfg(prefix_projection=False, num_virtual_tokens=2), "b")
    dt.set_active(model, ["a", "b"])
    both = logits(model, x)
    layer = layer_of(model)
    joined = torch.cat([layer.prefix("a"), layer.prefix("b")]).detach()
    single = make_gpt2()
    dt.inject(single, prefix_cfg(prefix_projection=False, num_virtual_tokens=5))
    with torch.no_grad():
        layer_of(single).prompt_embeddings["default"].copy_(joined)
    assert torch.allclose(logits(single, x), both, atol=1e-6)


def test_delete_last_adapter_restores_the_base_exactly() -> None:
    x = text_inputs()
    base = logits(make_llama(), x)
    model = make_llama()
    dt.inject(model, prefix_cfg())
    dt.delete(model, "default")
    assert find_prefix_layer(model) is None
    assert torch.equal(logits(model, x), base)


# --- bad input --------------------------------------------------------------------------------


def test_bad_config_values_raise_config_errors() -> None:
    with pytest.raises(dt.ConfigError, match="num_virtual_tokens=0"):
        prefix_cfg(num_virtual_tokens=0)
    with pytest.raises(dt.ConfigError, match="num_transformer_submodules=2"):
        prefix_cfg(num_transformer_submodules=2)
    with pytest.raises(dt.ConfigError, match="encoder_hidden_size=-1"):
        prefix_cfg(encoder_hidden_size=-1)
    with pytest.raises(dt.ConfigError, match="token_dim=32 does not fit"):
        dt.inject(make_llama(), prefix_cfg(token_dim=32))  # GQA: 1 key/value head x 16
    with pytest.raises(dt.ConfigError, match="num_layers=5 does not fit"):
        dt.inject(make_bert(), prefix_cfg(num_layers=5))


def test_model_without_architecture_entry_names_the_fields() -> None:
    with pytest.raises(dt.ConfigError, match=r"arch: \{layers: \.\.\., attention: \.\.\.\}"):
        dt.inject(make_cnn(), prefix_cfg())


def test_four_d_mask_is_refused() -> None:
    model = make_gpt2()
    dt.inject(model, prefix_cfg())
    x = text_inputs()
    mask = torch.ones(3, 1, 7, 7)
    with pytest.raises(dt.DeltatuneError, match="2-D"):
        model(input_ids=x["input_ids"], attention_mask=mask)


# --- the real decoder ---------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_prefix_and_llama_adapter_generate_and_match_peft(tmp_path: Path) -> None:
    """SmolLM2-135M (LLaMA, GQA 9/3 heads): LLaMA-Adapter starts at the base; prefix tuning's
    batched greedy generation with the cache equals it without and per prompt; PEFT agrees."""
    from peft import PeftModel

    from deltatune.lm import EMBEDDED_DECODER, generate, load_causal_lm

    torch.set_num_threads(1)
    model, tok = load_causal_lm(EMBEDDED_DECODER)
    prompts = ["What is AI?", "Say hello to my friend Bob."]
    x = tok(["What is AI?"], return_tensors="pt")
    base_logits = logits(model, x)
    base = generate(model, tok, prompts, max_new_tokens=6)

    dt.inject(model, dt.LlamaAdapterConfig(adapter_len=10, adapter_layers=4), "la")
    assert torch.equal(logits(model, x), base_logits)
    assert generate(model, tok, prompts, max_new_tokens=6) == base
    dt.delete(model, "la")

    torch.manual_seed(0)
    dt.inject(model, dt.PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"))
    cached = generate(model, tok, prompts, max_new_tokens=6)
    assert cached != base
    assert cached == generate(model, tok, prompts, max_new_tokens=6, use_cache=False)
    assert cached == [generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    ours = logits(model, x)
    dt.save_adapter(model, tmp_path)
    dt.delete(model, "default")
    assert torch.equal(logits(model, x), base_logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(model, tmp_path).eval()
    assert (logits(theirs, x) - ours).abs().max().item() <= 1e-5


def test_too_long_for_absolute_positions_is_a_clear_error() -> None:
    model = make_bert()  # 64 positions
    dt.inject(model, prefix_cfg(num_virtual_tokens=10))
    ids = torch.randint(0, 100, (1, 60), generator=torch.Generator().manual_seed(0))
    with pytest.raises(dt.DeltatuneError, match=r"max length 54\) or use fewer num_virtual_tokens"):
        model(input_ids=ids)
    model(input_ids=ids[:, :54])


def test_gradient_checkpointing_is_refused_clearly() -> None:
    model = make_llama()
    dt.inject(model, prefix_cfg())
    from deltatune.quant.paged import enable_gradient_checkpointing  # train.gradient_checkpointing

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' rename notice
        enable_gradient_checkpointing(model)
    model.train()
    with pytest.raises(dt.DeltatuneError, match="gradient_checkpointing: false"):
        model(**text_inputs())
    model.eval()  # inference is unaffected
    logits(model, text_inputs())
