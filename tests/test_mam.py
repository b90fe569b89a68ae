"""MAM Adapter: equals prefix tuning + a parallel adapter composed by hand with the same tensors,
each half against its formula written out, gradients, save/load (the MLP folded), the hand
count of the paper's default split, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import make_bert, make_cnn, make_gpt2, make_llama, text_inputs
from deltatune.kv_prefix import find_prefix_layer
from deltatune.methods._bottleneck import ParallelAdapterLayer
from deltatune.methods.mam import MAMConfig

MAKERS = {"bert": make_bert, "gpt2": make_gpt2, "llama": make_llama}


def mam_cfg(**kw: Any) -> dt.MethodConfig:
    return dt.config_from_dict({"name": "mam", "num_virtual_tokens": 3, **kw})


def logits(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(**x).logits
    return out


def perturb(model: nn.Module, name: str = "default", seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in dt.adapter_state_dict(model, name).values():
            t.add_(0.3 * torch.randn(t.shape, generator=gen, dtype=t.dtype))


def parallel_layers(model: nn.Module) -> list[ParallelAdapterLayer]:
    return [m for m in model.modules() if isinstance(m, ParallelAdapterLayer)]


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_equals_prefix_tuning_plus_parallel_adapter(kind: str) -> None:
    """MAM = the two single methods active together, given the same tensors (to 1e-6)."""
    x = text_inputs()
    opts = {"bottleneck_size": 8, "scaling": 4.0, "non_linearity": "relu"}
    mam = MAKERS[kind]()
    dt.inject(mam, mam_cfg(prefix_projection=False, **opts))
    perturb(mam)
    ref = MAKERS[kind]()
    dt.inject(
        ref,
        dt.config_from_dict(
            {"name": "prefix_tuning", "num_virtual_tokens": 3, "prefix_projection": False}
        ),
        "p",
    )
    dt.inject(ref, dt.config_from_dict({"name": "parallel_adapter", **opts}), "a")
    mine = dt.adapter_state_dict(mam)
    theirs = {**dt.adapter_state_dict(ref, "p"), **dt.adapter_state_dict(ref, "a")}
    assert sorted(mine) == sorted(theirs)
    with torch.no_grad():
        for k, v in theirs.items():
            v.copy_(mine[k])
    dt.set_active(ref, ["p", "a"])
    out, want = logits(mam, x), logits(ref, x)
    assert (out - want).abs().max().item() <= 1e-6
    base = logits(MAKERS[kind](), x)
    assert (out - base).abs().max().item() > 1e-3


def test_ffn_half_is_the_scaled_parallel_adapter_formula() -> None:
    """GPT-2 mlp output = FFN(h) + s * (relu(h W_down + b_down) W_up + b_up), written out."""
    s = 4.0
    model = make_gpt2()
    dt.inject(model, mam_cfg(prefix_projection=False, bottleneck_size=8, scaling=s))
    perturb(model)
    layer = parallel_layers(model)[0]
    seen: dict[str, torch.Tensor] = {}

    def grab(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        seen["h"], seen["y"] = args[0], out

    handle = layer.register_forward_hook(grab)
    logits(model, text_inputs())
    handle.remove()
    h, y = seen["h"], seen["y"]
    ffn = layer.base_layer
    ad = layer.adapter["default"]
    with torch.no_grad():
        want = ffn(h) + s * (
            torch.relu(h @ ad.down.weight.T + ad.down.bias) @ ad.up.weight.T + ad.up.bias
        )
    assert (y - want).abs().max().item() <= 1e-6


def test_prefix_half_is_the_models_own_cache_attention() -> None:
    """The prefix half equals handing the model P as its key/value cache by hand:
    softmax(q [P_k ; K]^T / sqrt d) [P_v ; V], real tokens at positions n + i (GPT-2)."""
    from transformers import DynamicCache

    n, layers, heads, hd = 3, 2, 2, 16
    model = make_gpt2()
    dt.inject(model, mam_cfg(prefix_projection=False, bottleneck_size=8))
    perturb(model)
    p = find_prefix_layer(model)
    assert p is not None
    prefix = p.prompt_embeddings["default"].detach().clone()  # (n, layers * 2 * heads * hd)
    x = text_inputs(batch=2, seq=5)
    out = logits(model, x)

    # The reference: the FFN half alone (prefix off) + the prefix through transformers' cache.
    ref = make_gpt2()
    dt.inject(ref, dt.config_from_dict({"name": "parallel_adapter", "bottleneck_size": 8}))
    with torch.no_grad():
        for (k, v), (k2, v2) in zip(
            sorted(dt.adapter_state_dict(ref).items()),
            sorted((k, v) for k, v in dt.adapter_state_dict(model).items() if "adapter" in k),
            strict=True,
        ):
            assert k == k2
            v.copy_(v2)
    kv = prefix.view(n, layers, 2, heads, hd)
    cache = DynamicCache()
    batch, length = x["input_ids"].shape
    for i in range(layers):
        keys = kv[:, i, 0].permute(1, 0, 2).unsqueeze(0).expand(batch, heads, n, hd)
        values = kv[:, i, 1].permute(1, 0, 2).unsqueeze(0).expand(batch, heads, n, hd)
        cache.update(keys, values, i)
    mask = torch.cat([torch.ones(batch, n, dtype=torch.long), x["attention_mask"]], dim=1)
    pos = (torch.arange(length) + n).unsqueeze(0).expand(batch, length)
    with torch.no_grad():
        want = ref(
            input_ids=x["input_ids"], attention_mask=mask, position_ids=pos, past_key_values=cache
        ).logits
    right = x["attention_mask"].bool()  # compare the real tokens (pads' logits are free)
    assert (out[right] - want[right]).abs().max().item() <= 1e-5


def test_only_mam_parameters_get_gradients_with_the_mlp() -> None:
    model = make_bert()
    dt.inject(model, mam_cfg(bottleneck_size=8, task_type="SEQ_CLS"))
    x = text_inputs()
    loss = model(**x, labels=torch.tensor([0, 1, 2])).loss
    loss.backward()
    names = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == trainable
    assert any("prefix_encoder.default" in n for n in names)
    assert any(".adapter.default.down" in n for n in names)
    assert all(
        "prefix_encoder" in n or ".adapter.default." in n or "classifier" in n for n in names
    )
    # up starts at zero, so down gets no gradient only through ReLU'(.) * 0: up itself moves.
    assert any(".adapter.default.up.weight" in n for n in names)


def test_save_load_with_the_mlp_is_exact(tmp_path: Path) -> None:
    """Trained through the MLP, saved as the folded P in DELTATUNE_MAM format, loaded exactly."""
    x = text_inputs()
    model = make_llama()
    dt.inject(model, mam_cfg(bottleneck_size=8))
    perturb(model)
    out = logits(model, x)
    dt.save_adapter(model, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "DELTATUNE_MAM"
    assert raw["inference_mode"] is True and raw["prefix_projection"] is True
    assert (tmp_path / "adapter_model.safetensors").is_file()
    keys = set(dt.adapter_state_dict(model))
    assert "prompt_embeddings" in keys
    assert dt.adapter_state_dict(model)["prompt_embeddings"].shape == (3, 2 * 2 * 16)
    fresh = make_llama()
    dt.load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, x), out)
    assert not any(p.requires_grad for p in fresh.parameters())
    # The live config keeps the MLP when changed; only what is written says "folded".
    cfg = mam_cfg()
    assert isinstance(cfg, MAMConfig)
    assert cfg.replace(scaling=2.0).inference_mode is False


def test_default_split_counted_by_hand() -> None:
    """Paper defaults (l = 30, m = hidden / 2, s = 4) on the tiny BERT (hidden 32, 2 layers,
    token_dim 32): prefix MLP E 30*32 + W1 32*32 + 32 + W2 32*128 + 128; adapter m = 16:
    2 * (32*16 + 16 + 16*32 + 32). Folded for saving, the prefix is 30 * 128."""
    model = make_bert()
    cfg = dt.config_from_dict({"name": "mam"})
    assert isinstance(cfg, MAMConfig)
    assert (cfg.num_virtual_tokens, cfg.scaling, cfg.reduction_factor) == (30, 4.0, None)
    dt.inject(model, cfg)
    mlp = 30 * 32 + (32 * 32 + 32) + (32 * 128 + 128)
    adapter = 2 * (32 * 16 + 16 + 16 * 32 + 32)
    assert dt.trainable_report(model).trainable == mlp + adapter
    saved = dt.adapter_state_dict(model)
    assert sum(t.numel() for t in saved.values()) == 30 * 128 + adapter
    # delete removes both halves
    dt.delete(model, "default")
    layer = find_prefix_layer(model)
    assert layer is None or not layer.adapter_names
    assert all(not layer.adapter_names for layer in parallel_layers(model))


def test_disable_turns_off_both_halves() -> None:
    x = text_inputs()
    model = make_gpt2()
    base = logits(model, x)
    dt.inject(model, mam_cfg(bottleneck_size=8))
    perturb(model)
    assert (logits(model, x) - base).abs().max().item() > 1e-3
    with dt.disabled(model):
        assert (logits(model, x) - base).abs().max().item() <= 1e-6


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"scaling": float("inf")}, "scaling"),
        ({"reduction_factor": 4, "bottleneck_size": 8}, "reduction_factor"),
        ({"dropout": 1.5}, "dropout"),
        ({"encoder_hidden_size": -1}, "encoder_hidden_size"),
        ({"prefix_init": "ones"}, "prefix_init"),
    ],
)
def test_bad_config_names_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(dt.ConfigError, match=field):
        mam_cfg(**options)


def test_model_without_attention_or_ffn_is_refused_untouched() -> None:
    model = make_cnn()
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(dt.ConfigError, match="mam"):
        dt.inject(model, mam_cfg())
    assert [n for n, _ in model.named_modules()] == before


def test_failing_ffn_half_leaves_no_prefix_behind() -> None:
    model = make_bert()
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(dt.ConfigError, match="layers_to_transform"):
        dt.inject(model, mam_cfg(layers_to_transform=[5]))
    assert find_prefix_layer(model) is None
    assert [n for n, _ in model.named_modules()] == before


def test_token_dim_mismatch_is_refused() -> None:
    with pytest.raises(dt.ConfigError, match="token_dim"):
        dt.inject(make_bert(), mam_cfg(token_dim=48))


@pytest.mark.slow
def test_trains_on_the_embedded_task_and_reloads_exactly(tmp_path: Path) -> None:
    """configs/mam.yaml on MiniLM + BBC News (a small subset): trains, saves the folded prefix,
    and `deltatune eval`'s loader reproduces the run's test metrics exactly."""
    from deltatune.run import evaluate_run, load_run_config, train_run

    cfg = load_run_config(
        Path(__file__).resolve().parent.parent / "configs" / "mam.yaml",
        [
            "data.max_train_examples=48",
            "data.max_eval_examples=32",
            "train.epochs=1",
            "train.progress=false",
            f"output_dir={tmp_path}",
        ],
    )
    result = train_run(cfg, echo=lambda *_a, **_k: None)
    # MiniLM: 6 layers x 2 x 384 x 30 folded prefix = 138,240; adapters 6 x (384*192*2 + 192
    # + 384) = 888,192; head 384*5 + 5 = 1,925 (trained through the MLP: more while training).
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "DELTATUNE_MAM" and saved["inference_mode"] is True
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as fh:
        total = sum(fh.get_tensor(k).numel() for k in fh.keys())  # noqa: SIM118
    assert total == 138_240 + 888_192 + 1_925
    again = evaluate_run(tmp_path, [])
    assert again["loss"] == pytest.approx(result.metrics["test"]["loss"], abs=1e-6)
    assert again["accuracy"] == result.metrics["test"]["accuracy"]
