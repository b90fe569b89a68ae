"""Per-example adapter routing (``deltatune.route``): one batch, one adapter per example, the
same results as running the examples one adapter at a time; errors; state restored; gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import make_bert, make_llama, run, text_inputs
from deltatune.methods._bottleneck import ParallelAdapterLayer

Names = list[Any]


def padded_inputs(batch: int = 6, seq: int = 7, seed: int = 3) -> dict[str, torch.Tensor]:
    x = text_inputs(batch=batch, seq=seq, seed=seed)
    x["attention_mask"][min(2, batch - 1), -4:] = 0  # more padded rows, of different lengths
    x["attention_mask"][batch - 1, -1:] = 0
    return x


def rows(x: dict[str, torch.Tensor], idx: list[int]) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in x.items()}


def one_at_a_time(model: nn.Module, x: dict[str, torch.Tensor], names: Names) -> torch.Tensor:
    """Each group of examples run on its own with its adapter as the only active one."""
    before = dt.active_adapters(model)
    parts: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for name in dict.fromkeys(names):
            idx = [i for i, n in enumerate(names) if n == name]
            if name is None:
                dt.set_active(model, [])
            else:
                dt.set_active(model, name)
            out = run(model, rows(x, idx))
            parts.update({i: out[j] for j, i in enumerate(idx)})
    dt.set_active(model, before)
    return torch.stack([parts[i] for i in range(len(names))])


def routed(model: nn.Module, x: dict[str, torch.Tensor], names: Names) -> torch.Tensor:
    with torch.no_grad(), dt.route(model, names):
        return run(model, x)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def perturb(model: nn.Module, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in dt.adapter_state_dict(model, name).values():
            t.add_(0.3 * torch.randn(t.shape, generator=gen))


def two_adapters(make: Callable[[], nn.Module], method: str) -> nn.Module:
    model = make()
    for i, name in enumerate(("a", "b")):
        if method == "lora":
            torch.manual_seed(i)
            cfg: dt.MethodConfig = dt.LoraConfig(
                r=4, target_modules="all-linear", init_lora_weights=False
            )
        else:
            cfg = dt.config_from_dict({"name": method, "bottleneck_size": 4})
        dt.inject(model, cfg, name)
        if method != "lora":
            perturb(model, name, seed=10 + i)
    return model


NAMES = ["a", "b", None, "b", "a", "__base__"]


@pytest.mark.parametrize("method", ["lora", "houlsby"])
@pytest.mark.parametrize("make", [make_bert, make_llama], ids=["bert", "llama"])
def test_route_equals_one_adapter_at_a_time(make: Callable[[], nn.Module], method: str) -> None:
    model = two_adapters(make, method)
    x = padded_inputs()
    names = [None if n == "__base__" else n for n in NAMES]
    expected = one_at_a_time(model, x, names)
    out = routed(model, x, NAMES)
    assert out.shape == expected.shape
    assert maxdiff(out, expected) <= 1e-6
    # the rows really differ between adapters (so the check is not vacuous)
    assert maxdiff(out[0], one_at_a_time(model, rows(x, [0]), ["b"])[0]) > 1e-3
    with torch.no_grad():
        base = run(make(), x)
    assert maxdiff(out[[2, 5]], base[[2, 5]]) <= 1e-6
    # one name for every example: the same as set_active
    dt.set_active(model, "b")
    with torch.no_grad():
        whole = run(model, x)
    assert torch.equal(routed(model, x, ["b"] * 6), whole)


def test_route_mixed_methods_heads_and_compositions() -> None:
    """LoRA, Houlsby, a parallel adapter and per-adapter heads in one model; Stack entries."""
    model = make_bert()
    torch.manual_seed(0)
    dt.inject(
        model, dt.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False), "l"
    )
    dt.inject(
        model,
        dt.config_from_dict({"name": "houlsby", "bottleneck_size": 4, "task_type": "SEQ_CLS"}),
        "h",
    )
    dt.inject(model, dt.config_from_dict({"name": "parallel_adapter", "bottleneck_size": 4}), "p")
    for i, name in enumerate(("h", "p")):
        perturb(model, name, seed=i)
    x = padded_inputs(batch=5)
    names: Names = ["h", dt.Stack("h", "l"), "p", None, "l"]
    expected = []
    with torch.no_grad():
        for i, name in enumerate(names):
            setup = [] if name is None else (["h", "l"] if isinstance(name, dt.Stack) else name)
            dt.set_active(model, setup)
            expected.append(run(model, rows(x, [i]))[0])
    out = routed(model, x, names)
    assert maxdiff(out, torch.stack(expected)) <= 1e-6
    assert dt.active_adapters(model) == ["l"]  # route left the active set alone


def test_keyword_inputs_are_split_too() -> None:
    """BERT's output(hidden, input_tensor=x) wrapped by a parallel adapter, called by keyword."""
    model = two_adapters(make_bert, "parallel_adapter")
    layer = model.bert.encoder.layer[0].output
    assert isinstance(layer, ParallelAdapterLayer)
    hidden, resid = torch.randn(3, 4, 64), torch.randn(3, 4, 32)
    expected = []
    with torch.no_grad():
        for i, name in enumerate(["b", "a", "b"]):
            dt.set_active(model, name)
            expected.append(layer(hidden[i : i + 1], input_tensor=resid[i : i + 1]))
        with dt.route(model, ["b", "a", "b"]):
            out = layer(hidden, input_tensor=resid)
    assert maxdiff(out, torch.cat(expected)) <= 1e-6


def test_generate_inside_route_matches_per_adapter_generate() -> None:
    model = two_adapters(make_llama, "lora")
    ids = torch.randint(1, 100, (3, 5), generator=torch.Generator().manual_seed(0))
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), dt.route(model, ["a", "b", "a"]):
        out = model.generate(ids, **kwargs)
    for i, name in enumerate(["a", "b", "a"]):
        dt.set_active(model, name)
        with torch.no_grad():
            single = model.generate(ids[i : i + 1], **kwargs)
        assert torch.equal(out[i : i + 1], single)


# --- errors and state ---------------------------------------------------------------------------


def test_unknown_names_and_wrong_batch_length_are_clear() -> None:
    model = two_adapters(make_bert, "lora")
    x = padded_inputs(batch=3)
    with pytest.raises(dt.ConfigError, match=r"example 1: no adapter named 'c' .*adapters: a, b"):
        routed(model, x, ["a", "c", "b"])
    with pytest.raises(
        dt.DeltatuneError, match=r"4 adapter names were given but module 'bert\."
    ) as err:
        routed(model, x, ["a", "b", "a", "b"])
    assert "batch of 3 examples" in str(err.value)
    with pytest.raises(dt.ConfigError, match="one adapter name per example, got 'a'"):
        routed(model, x, "a")  # type: ignore[arg-type]
    with pytest.raises(dt.ConfigError, match="the list is empty"):
        routed(model, x, [])
    with pytest.raises(dt.ConfigError, match="Parallel goes at the top"):
        routed(model, x, ["a", dt.Parallel("a", "b"), "b"])
    with pytest.raises(dt.ConfigError, match="has no adapters"):
        routed(make_bert(), x, [None, None, None])
    # the failed calls left nothing behind
    assert all(layer.routing is None for _, layer in dt.adapter_layers(model))
    assert dt.active_adapters(model) == ["b"]


def test_merged_adapters_are_refused() -> None:
    model = two_adapters(make_llama, "lora")
    dt.merge(model, ["a"])
    with pytest.raises(dt.DeltatuneError, match=r"\['a'\] are merged .*unmerge"):
        routed(model, padded_inputs(batch=2), ["a", "b"])
    dt.unmerge(model)
    routed(model, padded_inputs(batch=2), ["a", "b"])


def test_state_is_restored_after_the_block_even_on_error() -> None:
    model = two_adapters(make_bert, "houlsby")
    dt.set_active(model, "a")
    actives = {n: list(layer.active_adapters) for n, layer in dt.adapter_layers(model)}
    with pytest.raises(RuntimeError, match="boom"), dt.route(model, ["b", "a"]):
        assert all(layer.routing is not None for _, layer in dt.adapter_layers(model))
        raise RuntimeError("boom")
    assert all(layer.routing is None for _, layer in dt.adapter_layers(model))
    assert {n: layer.active_adapters for n, layer in dt.adapter_layers(model)} == actives
    assert dt.active_adapters(model) == ["a"]


def test_disabled_model_routes_to_the_base() -> None:
    model = two_adapters(make_bert, "lora")
    x = padded_inputs(batch=2)
    with torch.no_grad():
        base = run(make_bert(), x)
    with dt.disabled(model):
        assert torch.equal(routed(model, x, ["a", "b"]), base)


# --- training through routing ------------------------------------------------------------------


def test_each_adapter_gets_gradients_from_its_own_examples() -> None:
    model = two_adapters(make_llama, "houlsby")
    dt.set_active(model, ["a", "b"])  # both trainable
    x = padded_inputs(batch=4)
    names = ["a", "b", "b", "a"]
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1)
    with dt.route(model, names):
        (run(model, x).pow(2) * weights).mean().backward()
    routed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert routed_grads and all(".a." in n or ".b." in n for n in routed_grads)
    model.zero_grad(set_to_none=True)
    # reference: each group on its own, with the same per-example loss weights (same mean)
    for name in ("a", "b"):
        idx = [i for i, n in enumerate(names) if n == name]
        dt.set_active(model, name)
        for p in dt.adapter_state_dict(model, "a" if name == "b" else "b").values():
            p.requires_grad_(False)
        out = run(model, rows(x, idx))
        (out.pow(2) * weights[idx]).sum().div(out.numel() * 2).backward()
    for n, g in routed_grads.items():
        p = dict(model.named_parameters())[n]
        assert p.grad is not None, n
        assert maxdiff(g, p.grad) <= 1e-6, n
