"""AdapterFusion: the formula written out by hand, fusion over one adapter, the uniform-attention
mean, the attention readout, gradients, save/load, regularisation and errors.

The generic matrix (test_matrix.py) covers inject / train / save / disable / switch / unload.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from conftest import make_bert, make_llama, run, text_inputs
from deltatune.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_tensors
from deltatune.methods.fusion import FusionLayer, FusionRegularizedTask


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def perturb(model: nn.Module, name: str, seed: int, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in dt.adapter_state_dict(model, name).values():
            t.add_(scale * torch.randn(t.shape, generator=gen))


def task_adapters(
    make: object = make_bert, method: str = "pfeiffer", n: int = 3, **options: object
) -> nn.Module:
    """A base model with ``n`` trained-looking (perturbed) task adapters t0 … t{n-1}."""
    model = make()  # type: ignore[operator]
    for i in range(n):
        opts = {"bottleneck_size": 4, "non_linearity": ["relu", "gelu", "tanh"][i % 3], **options}
        dt.inject(model, dt.config_from_dict({"name": method, **opts}), f"t{i}")
        perturb(model, f"t{i}", seed=i)
    return model


def fused_layer(model: nn.Module) -> dt.AdapterLayer:
    return model.bert.encoder.layer[1].output.dense  # type: ignore[no-any-return]


def by_hand(h: torch.Tensor, layer: dt.AdapterLayer, fusion: FusionLayer) -> torch.Tensor:
    """``h + V Σ_n softmax_n((Q h + b_Q)·(K Δ_n + b_K)) Δ_n`` with ``Δ_n = A_n(h) − h``."""
    deltas = torch.stack([layer.adapter[n].serial(h) - h for n in fusion.adapters], dim=-2)
    q = F.linear(h, fusion.query.weight, fusion.query.bias)
    k = F.linear(deltas, fusion.key.weight, fusion.key.bias)
    s = torch.softmax(torch.einsum("btd,btnd->btn", q, k), dim=-1)
    mixed = torch.einsum("btn,btnd->btd", s, deltas)
    return h + F.linear(mixed, fusion.value.weight)


# --- the formula ----------------------------------------------------------------------------------


def test_fusion_layer_computes_the_written_out_formula() -> None:
    model = task_adapters()
    dt.inject(model, dt.FusionConfig(adapter_names=["t0", "t1", "t2"]), "f")
    perturb(model, "f", seed=5)  # Q, K, V away from their start
    layer = fused_layer(model)
    fusion = layer.fusion["f"]
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        h = layer.base_layer(x)
        assert maxdiff(layer(x), by_hand(h, layer, fusion)) <= 1e-5
        w = fusion.last_weights
        assert w is not None and w.shape == (2, 5, 3)
        assert maxdiff(w.sum(-1), torch.ones(2, 5)) <= 1e-6
        assert w.std() > 1e-3  # not uniform: the check above is not vacuous


def test_fusion_over_one_adapter_gives_that_adapter_exactly() -> None:
    model = task_adapters(n=2)
    x = text_inputs()
    dt.set_active(model, "t1")
    with torch.no_grad():
        single = run(model, x)
    dt.inject(model, dt.FusionConfig(adapter_names=["t1"]), "f")
    perturb(model, "f", seed=3, scale=1.0)  # Q and K do not matter over one adapter ...
    with torch.no_grad():
        for _, layer in dt.adapter_layers(model):
            if "f" in getattr(layer, "fusion", {}):
                layer.fusion["f"].value.weight.copy_(torch.eye(32))  # ... V = I does
        assert torch.equal(run(model, x), single)
    # with ln_after (the adapter's output is LN(h + Δ)) up to rounding
    houlsby = task_adapters(make_llama, "houlsby", n=1, ln_after=True)
    dt.set_active(houlsby, "t0")
    with torch.no_grad():
        single = run(houlsby, x)
    dt.inject(houlsby, dt.FusionConfig(adapter_names=["t0"]), "f")
    with torch.no_grad():
        assert maxdiff(run(houlsby, x), single) <= 1e-5


def test_identity_value_and_uniform_attention_give_the_mean_of_the_adapters() -> None:
    model = task_adapters()
    dt.inject(model, dt.FusionConfig(adapter_names=["t0", "t1", "t2"]), "f")
    layer = fused_layer(model)
    fusion = layer.fusion["f"]
    with torch.no_grad():
        fusion.query.weight.zero_()  # q = 0: every adapter scores 0, softmax is uniform
        fusion.query.bias.zero_()
    assert torch.equal(fusion.value.weight, torch.eye(32))  # V starts as the identity
    x = torch.randn(2, 4, 64)
    with torch.no_grad():
        h = F.linear(x, layer.base_layer.weight, layer.base_layer.bias)
        outputs = []
        for name, act in (("t0", F.relu), ("t1", F.gelu), ("t2", torch.tanh)):
            a = layer.adapter[name]
            z = F.linear(act(F.linear(h, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
            outputs.append(h + z)  # adapter n's output A_n(h)
        mean = (outputs[0] + outputs[1] + outputs[2]) / 3
        assert maxdiff(layer(x), mean) <= 1e-5
        assert maxdiff(outputs[0], mean) > 1e-2
        assert maxdiff(fusion.last_weights, torch.full((2, 4, 3), 1 / 3)) <= 1e-7


# --- readout ----------------------------------------------------------------------------------------


def test_fusion_weights_per_layer() -> None:
    model = task_adapters(n=2)
    dt.inject(
        model,
        dt.config_from_dict({"name": "pfeiffer", "bottleneck_size": 4, "layers_to_transform": [1]}),
        "late",
    )
    perturb(model, "late", seed=9)
    dt.inject(model, dt.FusionConfig(adapter_names=["t0", "late", "t1"]), "f")
    perturb(model, "f", seed=4)
    x = text_inputs()
    with torch.no_grad():
        run(model, x)
    weights = dt.fusion_weights(model)
    assert list(weights) == [
        "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.1.output.dense",
    ]
    for w in weights.values():
        assert w.shape == (3,)
        assert abs(w.sum().item() - 1.0) <= 1e-5
    assert weights["bert.encoder.layer.0.output.dense"][1] == 0  # 'late' is not in block 0
    assert weights["bert.encoder.layer.1.output.dense"][1] > 0
    # padding left out: the same as averaging the unpadded tokens by hand
    masked = dt.fusion_weights(model, "f", attention_mask=x["attention_mask"])
    last = fused_layer(model).fusion["f"].last_weights
    keep = x["attention_mask"].bool()
    assert maxdiff(masked["bert.encoder.layer.1.output.dense"], last[keep].mean(0)) <= 1e-6
    with pytest.raises(dt.ConfigError, match="'t0' is not a fusion adapter"):
        dt.fusion_weights(model, "t0")
    dt.inject(model, dt.FusionConfig(adapter_names=["t0", "t1"]), "g")
    dt.set_active(model, ["t0"])
    with pytest.raises(dt.ConfigError, match=r"2 fusion adapters .*adapter_name="):
        dt.fusion_weights(model)


# --- training, saving ---------------------------------------------------------------------------


def test_only_fusion_parameters_train_and_save(tmp_path: Path) -> None:
    model = task_adapters(make_llama, "houlsby", n=2)
    dt.inject(model, dt.FusionConfig(adapter_names=["t0", "t1"]), "f")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".fusion.f." in n for n in trainable)
    assert len(trainable) == 4 * 5  # 4 places (Houlsby) x query w/b, key w/b, value w
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(dt.trainable_parameters(model), lr=0.5)
    for _ in range(2):
        run(model, text_inputs()).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n
    # only the fusion tensors are saved
    dt.save_adapter(model, tmp_path / "f", "f")
    keys = list(read_tensors(tmp_path / "f" / WEIGHTS_NAME))
    assert len(keys) == 20 and all(".fusion." in k and ".f." not in k for k in keys)
    saved = json.loads((tmp_path / "f" / CONFIG_NAME).read_text())
    assert saved["peft_type"] == "DELTATUNE_FUSION" and saved["adapter_names"] == ["t0", "t1"]


def test_save_load_round_trips_and_orders_dependencies(tmp_path: Path) -> None:
    model = task_adapters(n=2)
    dt.inject(model, dt.FusionConfig(adapter_names=["t0", "t1"]), "default")
    perturb(model, "default", seed=8)
    x = text_inputs()
    with torch.no_grad():
        out = run(model, x)
    dt.save_adapters(model, tmp_path / "all")
    fresh = make_bert()
    # the fusion at the root loads after the adapters it fuses
    assert dt.load_adapters(fresh, tmp_path / "all") == ["t0", "t1", "default"]
    assert dt.active_adapters(fresh) == ["default"]
    with torch.no_grad():
        assert torch.equal(run(fresh, x), out)
    # the fusion alone needs its adapters on the model ...
    with pytest.raises(
        dt.CheckpointError, match=r"adapter 't0' is not on this model .*adapter_paths"
    ):
        dt.load_adapter(make_bert(), tmp_path / "all")
    # ... or adapter_paths saying where they are (as for `deltatune train` with method: fusion)
    config = dt.FusionConfig(
        adapter_names=["t0", "t1"],
        adapter_paths={"t0": str(tmp_path / "all" / "t0"), "t1": str(tmp_path / "all" / "t1")},
    )
    other = make_bert()
    dt.inject(other, config, "f")
    assert dt.adapter_names(other) == ["t0", "t1", "f"]
    assert {n for n, p in other.named_parameters() if p.requires_grad} == {
        n for n, _ in other.named_parameters() if ".fusion.f." in n
    }
    dt.save_adapter(model, tmp_path / "fusion_only")
    third = make_bert()
    for name in ("t0", "t1"):
        dt.load_adapter(third, tmp_path / "all" / name, name)
    dt.load_adapter(third, tmp_path / "fusion_only", "fusion")
    with torch.no_grad():
        assert torch.equal(run(third, x), out)


# --- regularisation -------------------------------------------------------------------------------


def test_fusion_regularization() -> None:
    model = task_adapters(n=2)
    dt.inject(model, dt.FusionConfig(adapter_names=["t0", "t1"], regularization=0.5), "f")
    assert dt.fusion_regularization(model).detach().item() == 0.0  # V = I
    perturb(model, "f", seed=2)
    expected = sum(
        0.5 * (torch.eye(32) - layer.fusion["f"].value.weight.detach()).pow(2).sum().item()
        for _, layer in dt.adapter_layers(model)
        if "f" in layer.fusion
    )
    assert abs(dt.fusion_regularization(model).detach().item() - float(expected)) <= 1e-4
    dt.set_active(model, [])  # V frozen: not counted unless named
    assert dt.fusion_regularization(model).detach().item() == 0.0
    assert dt.fusion_regularization(model, "f").detach().item() > 0

    class Plain:
        metric_names = ("accuracy",)

        def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.tensor(1.0)

    dt.set_active(model, "f")
    task = FusionRegularizedTask(Plain())
    assert abs(task.loss(model, {}).detach().item() - (1.0 + float(expected))) <= 1e-4
    assert task.metric_names == ("accuracy",)
    static = task_adapters(n=2)
    dt.inject(static, dt.FusionConfig(adapter_names=["t0", "t1"], value=False), "s")
    assert fused_layer(static).fusion["s"].value is None
    assert dt.fusion_regularization(static).item() == 0.0


def test_fit_applies_the_regularizer_through_the_training_hook() -> None:
    from deltatune.train.trainer import TrainerConfig, fit, training_hooks

    class ZeroLoss:
        """A task with no loss of its own: only the hook's λ‖I − V‖² moves V."""

        metric_names = ("accuracy",)

        def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return sum(p.sum() * 0 for p in model.parameters() if p.requires_grad)  # type: ignore[return-value]

        def evaluate(self, model: nn.Module, loader: object) -> dict[str, float]:
            return {"accuracy": 0.0}

    def trained_v(regularization: float) -> torch.Tensor:
        model = task_adapters(n=2)
        dt.inject(
            model, dt.FusionConfig(adapter_names=["t0", "t1"], regularization=regularization), "f"
        )
        v = fused_layer(model).fusion["f"].value
        with torch.no_grad():
            v.weight.add_(0.1)  # move V off the identity so the regulariser has a gradient
        start = v.weight.detach().clone()
        (hook,) = [h for h in training_hooks(model) if hasattr(h, "extra_loss")]
        assert (
            abs(hook.extra_loss(model).item() - dt.fusion_regularization(model, "f").item()) < 1e-6
        )
        cfg = TrainerConfig(epochs=1, batch_size=1, learning_rate=1e-2, weight_decay=0.0)
        fit(model, ZeroLoss(), [{"x": torch.zeros(1)}] * 2, None, cfg, collate_fn=lambda b: b[0])
        return (v.weight.detach() - start).norm()

    assert trained_v(0.0).item() == 0.0
    assert trained_v(10.0).item() > 1e-3

    model = task_adapters(n=2)
    dt.inject(model, dt.FusionConfig(adapter_names=["t0", "t1"]), "f")
    (hook,) = [h for h in training_hooks(model) if hasattr(h, "extra_loss")]
    dt.set_active(model, [])  # V frozen: the hook adds nothing
    assert hook.extra_loss(model).item() == 0.0


# --- errors -----------------------------------------------------------------------------------------


def test_bad_configs_and_adapters_are_named() -> None:
    with pytest.raises(dt.ConfigError, match="adapter_names is empty"):
        dt.FusionConfig()
    with pytest.raises(dt.ConfigError, match=r"names \['a'\] more than once"):
        dt.FusionConfig(adapter_names=["a", "b", "a"])
    with pytest.raises(dt.ConfigError, match=r"adapter_paths has \['c'\]"):
        dt.FusionConfig(adapter_names=["a"], adapter_paths={"c": "x"})
    with pytest.raises(dt.ConfigError, match=r"dropout=1\.0"):
        dt.FusionConfig(adapter_names=["a"], dropout=1.0)
    model = task_adapters(n=1)
    torch.manual_seed(0)
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["query"]), "lo")
    dt.inject(model, dt.config_from_dict({"name": "parallel_adapter", "bottleneck_size": 4}), "par")
    base_names = dt.adapter_names(model)
    with pytest.raises(dt.ConfigError, match=r"adapter 'zz' is not on this model"):
        dt.inject(model, dt.FusionConfig(adapter_names=["t0", "zz"]), "f")
    with pytest.raises(
        dt.ConfigError, match=r"'lo' is lora; AdapterFusion fuses serial bottleneck"
    ):
        dt.inject(model, dt.FusionConfig(adapter_names=["t0", "lo"]), "f")
    with pytest.raises(dt.ConfigError, match=r"\['par'\] are parallel adapters"):
        dt.inject(model, dt.FusionConfig(adapter_names=["t0", "par"]), "f")
    assert dt.adapter_names(model) == base_names
    assert not any(getattr(layer, "fusion", None) for _, layer in dt.adapter_layers(model))
    # a fused adapter cannot be deleted while its fusion exists
    dt.inject(model, dt.FusionConfig(adapter_names=["t0"]), "f")
    with pytest.raises(dt.DeltatuneError, match="adapter 't0' is used by 'f'; delete that first"):
        dt.delete(model, "t0")
    dt.delete(model, "f")
    dt.delete(model, "t0")
    with pytest.raises(dt.DeltatuneError, match="cannot be merged"):
        dt.merge(model, ["lo", "par"])


def test_fusion_in_the_method_list() -> None:
    spec = dt.get_method("fusion")
    assert (
        spec.family == "adapter" and spec.capabilities.multi_adapter and not spec.capabilities.merge
    )
    assert spec.config_cls is dt.FusionConfig and spec.config_cls.peft_type == "DELTATUNE_FUSION"


# --- the CLI: stage one twice, then stage two ----------------------------------------------------

from test_cli import csv_data, tiny_model_dir, write_config  # noqa: E402, F401 (fixtures)


def test_two_stage_training_through_the_cli(
    tiny_model_dir: Path,  # noqa: F811
    csv_data: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from deltatune.cli import main

    short = ["train.epochs=1", "train.eval_every_steps=null"]
    runs = {}
    for name in ("t1", "t2", "fusion"):
        (tmp_path / name).mkdir()
    for name, method in (("t1", "pfeiffer"), ("t2", "houlsby")):
        cfg = write_config(
            tmp_path / name, tiny_model_dir, csv_data, name=method, bottleneck_size=4
        )
        assert main(["train", str(cfg), *short]) == 0
        runs[name] = tmp_path / name / "run"
    cfg = write_config(
        tmp_path / "fusion",
        tiny_model_dir,
        csv_data,
        name="fusion",
        adapter_names=["t1", "t2"],
        adapter_paths={k: str(v) for k, v in runs.items()},
    )
    assert main(["train", str(cfg), *short]) == 0
    run_dir = tmp_path / "fusion" / "run"
    saved = json.loads((run_dir / CONFIG_NAME).read_text())
    assert saved["peft_type"] == "DELTATUNE_FUSION"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "fusion"
    # fusion layers (2 blocks x Pfeiffer place, 2 x 2 Houlsby places; t1 and t2 share ffn_out)
    # 4 places x 3136 + classifier copy (32 * 3 + 3)
    assert metrics["trainable_params"] == 4 * 3136 + 99
    keys = list(read_tensors(run_dir / WEIGHTS_NAME))
    assert all(".fusion." in k or "classifier" in k for k in keys)
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
