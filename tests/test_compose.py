"""Composition as data: Stack (in sequence), Parallel (several task outputs from one call,
each with its own head), Fuse (resolves to the fusion adapter); validation and clean-up."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import make_bert, make_llama, run, text_inputs


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def perturb(model: nn.Module, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in dt.adapter_state_dict(model, name).values():
            t.add_(0.3 * torch.randn(t.shape, generator=gen))


def with_adapters(
    make: type | object, method: str, names: tuple[str, ...], **options: object
) -> nn.Module:
    model = make()  # type: ignore[operator]
    for i, name in enumerate(names):
        dt.inject(
            model, dt.config_from_dict({"name": method, "bottleneck_size": 4, **options}), name
        )
        perturb(model, name, seed=i)
    return model


# --- Stack ----------------------------------------------------------------------------------------


def test_stack_applies_serial_adapters_in_order() -> None:
    model = with_adapters(make_llama, "pfeiffer", ("lang", "task"))
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 3, 64)
    dt.set_active(model, dt.Stack("lang", "task"))
    assert dt.active_adapters(model) == ["lang", "task"]
    with torch.no_grad():
        h = layer.base_layer(x)
        expected = layer.adapter["task"].serial(layer.adapter["lang"].serial(h))
        assert torch.equal(layer(x), expected)
        inputs = text_inputs()
        stacked = run(model, inputs)
        dt.set_active(model, ["lang", "task"])
        assert torch.equal(run(model, inputs), stacked)  # a list is the same stack
        dt.set_active(model, dt.Stack("task", "lang"))
        assert maxdiff(run(model, inputs), stacked) > 1e-4  # order matters for serial adapters
    # nested stacks flatten
    dt.set_active(model, dt.Stack(dt.Stack("lang"), "task"))
    assert dt.active_adapters(model) == ["lang", "task"]
    assert dt.Stack(["lang", "task"]) == dt.Stack("lang", "task")


def test_stack_of_additive_adapters_sums() -> None:
    model = make_bert()
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(i)
        dt.inject(
            model, dt.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False), name
        )
    layer = model.bert.encoder.layer[0].attention.self.query
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        dt.set_active(model, "a")
        da = layer(x) - layer.base_layer(x)
        dt.set_active(model, "b")
        db = layer(x) - layer.base_layer(x)
        dt.set_active(model, dt.Stack("b", "a"))
        assert maxdiff(layer(x), layer.base_layer(x) + da + db) <= 1e-6


def test_composition_validation() -> None:
    model = with_adapters(make_bert, "houlsby", ("a", "b"))
    with pytest.raises(dt.ConfigError, match=r"Stack\(\) needs at least one adapter"):
        dt.Stack()
    with pytest.raises(
        dt.ConfigError, match=r"Stack\(\) takes adapter names and Stack, Fuse, not Parallel"
    ):
        dt.Stack("a", dt.Parallel("a", "b"))
    with pytest.raises(dt.ConfigError, match=r"Fuse\(\) takes adapter names, not Stack"):
        dt.Fuse("a", dt.Stack("b"))
    with pytest.raises(dt.ConfigError, match="names an adapter twice"):
        dt.Fuse("a", "a")
    with pytest.raises(dt.ConfigError, match="same branch twice"):
        dt.Parallel("a", "a")
    with pytest.raises(dt.ConfigError, match=r"Stack\('a', 'zz'\): no adapter named 'zz'"):
        dt.set_active(model, dt.Stack("a", "zz"))
    with pytest.raises(dt.ConfigError, match="set_active takes an adapter name"):
        dt.set_active(model, 3)  # type: ignore[arg-type]
    assert (
        repr(dt.Stack("a", dt.Fuse("b", "c", name="f"))) == "Stack('a', Fuse('b', 'c', name='f'))"
    )


# --- Parallel -------------------------------------------------------------------------------------


def test_parallel_gives_every_task_with_its_own_head_from_one_call() -> None:
    model = with_adapters(make_bert, "pfeiffer", ("sst", "nli"), task_type="SEQ_CLS")
    x = text_inputs(batch=3)
    expected = {}
    with torch.no_grad():
        for name in ("sst", "nli"):
            dt.set_active(model, name)
            expected[name] = run(model, x)
    assert maxdiff(expected["sst"], expected["nli"]) > 1e-3  # different adapters and heads
    dt.set_active(model, dt.Parallel("sst", "nli"))
    assert dt.active_adapters(model) == ["sst", "nli"]
    with torch.no_grad():
        out = model(**x)
    assert out.logits.shape == (6, 3)
    pieces = dt.split_parallel(model, out)
    assert list(pieces) == ["sst", "nli"]
    for name in ("sst", "nli"):
        assert maxdiff(pieces[name].logits, expected[name]) <= 1e-6
    # one call trains both branches (labels are replicated; the loss averages the branches)
    out = model(**x, labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    for name in ("sst", "nli"):
        grads = [t.grad for t in dt.adapter_state_dict(model, name).values()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name
    # a submodule called on its own is not silently split into branch blocks
    layer = model.bert.encoder.layer[0].output.dense
    with pytest.raises(dt.DeltatuneError, match=r"outside a call of the model .*call the model"):
        layer(torch.randn(4, 3, 64))
    # back to one adapter: no replication any more
    dt.set_active(model, "nli")
    with torch.no_grad():
        assert torch.equal(run(model, x), expected["nli"])
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_parallel_with_lora_stack_and_fuse_branches() -> None:
    model = make_llama()
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(i)
        dt.inject(
            model,
            dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
            name,
        )
    x = text_inputs(batch=2)
    setups = {"a": "a", "a+b": ["a", "b"]}
    expected = {}
    with torch.no_grad():
        for label, setup in setups.items():
            dt.set_active(model, setup)
            expected[label] = run(model, x)
        dt.set_active(model, dt.Parallel("a", dt.Stack("a", "b")))
        out = run(model, x)
    assert out.shape[0] == 4
    pieces = dt.split_parallel(model, out)
    for label in setups:
        assert maxdiff(pieces[label], expected[label]) <= 1e-6
    assert list(dt.split_parallel(2, out)) == ["0", "1"]
    # a model call that fails still ends the call: no replicated batch is left in flight
    route = model.model.layers[0].self_attn.q_proj.routing
    with pytest.raises(IndexError):
        model(input_ids=torch.full((2, 3), 1000))
    assert route is not None and route.batch is None
    # route() refuses to run while Parallel routes the batch itself
    with (
        pytest.raises(dt.DeltatuneError, match="Parallel composition is active"),
        dt.route(model, ["a", "b"]),
    ):
        pass
    # a deep copy keeps working, and its hook is removed by set_active / unload
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert maxdiff(run(twin, x), out) <= 1e-6
    dt.set_active(twin, "a")
    assert not twin._forward_pre_hooks
    assert model._forward_pre_hooks  # the original still runs in parallel
    dt.unload(model)
    assert not model._forward_pre_hooks
    with torch.no_grad():
        assert run(model, x).shape[0] == 2


def test_split_parallel_needs_a_parallel() -> None:
    model = with_adapters(make_bert, "houlsby", ("a",))
    with pytest.raises(dt.DeltatuneError, match="no active Parallel"):
        dt.split_parallel(model, torch.zeros(2, 3))


def test_deleting_a_branch_ends_the_parallel() -> None:
    model = with_adapters(make_bert, "houlsby", ("a", "b"))
    dt.set_active(model, dt.Parallel("a", "b"))
    dt.delete(model, "b")
    assert not model._forward_pre_hooks
    with torch.no_grad():
        assert run(model, text_inputs(batch=2)).shape[0] == 2


# --- Fuse -----------------------------------------------------------------------------------------


def test_fuse_resolves_to_the_fusion_adapter_and_stacks() -> None:
    model = with_adapters(make_bert, "pfeiffer", ("lang", "t1", "t2"))
    with pytest.raises(
        dt.ConfigError, match=r"no fusion of \['t1', 't2'\] on this model; add one with inject"
    ):
        dt.set_active(model, dt.Fuse("t1", "t2"))
    dt.inject(model, dt.FusionConfig(adapter_names=["t1", "t2"]), "f")
    perturb(model, "f", seed=7)
    x = text_inputs()
    with torch.no_grad():
        fused = run(model, x)
        dt.set_active(model, "lang")
        dt.set_active(model, dt.Fuse("t2", "t1"))  # the same set of adapters
        assert dt.active_adapters(model) == ["f"]
        assert torch.equal(run(model, x), fused)
        dt.set_active(model, dt.Stack("lang", dt.Fuse("t1", "t2", name="f")))
        assert dt.active_adapters(model) == ["lang", "f"]
        layer = model.bert.encoder.layer[1].output.dense
        z = torch.randn(2, 3, 64)
        expected = layer.fusion["f"](layer.adapter["lang"].serial(layer.base_layer(z)), layer)
        assert torch.equal(layer(z), expected)  # the fusion reads the language adapter's output
    dt.inject(model, dt.FusionConfig(adapter_names=["t1", "t2"]), "g")
    with pytest.raises(dt.ConfigError, match=r"several fusions fuse these adapters \(f, g\)"):
        dt.set_active(model, dt.Fuse("t1", "t2"))
    with pytest.raises(dt.ConfigError, match=r"fusion 'f' fuses \['t1', 't2'\], not \['t1'\]"):
        dt.set_active(model, dt.Fuse("t1", name="f"))
    with pytest.raises(dt.ConfigError, match="no fusion adapter named 'h'"):
        dt.set_active(model, dt.Fuse("t1", "t2", name="h"))
    # routing entries may be Fuse / Stack too
    with torch.no_grad(), dt.route(model, [dt.Fuse("t1", "t2", name="f"), "lang", None]):
        out = run(model, text_inputs())
    dt.set_active(model, "f")
    with torch.no_grad():
        assert maxdiff(out[0], run(model, text_inputs())[0]) <= 1e-6
