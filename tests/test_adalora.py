"""AdaLoRA: the paper's formulas written out, the budget moving rank, PEFT interop both ways."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from conftest import make_bert, make_cnn, run, text_inputs
from deltatune.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from deltatune.methods.adalora import (
    AdaLoraLayer,
    budget_schedule,
    final_ranks,
    mask_to_budget,
    orthogonal_regularization,
    triplet_scores,
    update_and_allocate,
    update_importance,
)
from deltatune.model import state_of
from deltatune.train import ClassificationTask, TrainerConfig, add_training_hook, fit

QV = ["query", "value"]


def layers(model: nn.Module) -> dict[str, AdaLoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaLoraLayer)}


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Non-zero singular values, so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers(model).values():
            for d in (layer.lora_A, layer.lora_E, layer.lora_B):
                for p in d.values():
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen))


# --- the formulas -----------------------------------------------------------------------------


def test_forward_and_merge_follow_the_svd_form() -> None:
    model = make_bert()
    dt.inject(model, dt.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=6, target_modules=QV))
    randomize(model)
    layer = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer, AdaLoraLayer)
    x = torch.randn(5, 32)
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    a, e, b = layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]
    # y = W x + b + alpha / (r0 + 1e-5) * P diag(lambda) Q x
    expected = x @ w.T + bias + (6 / (4 + 1e-5)) * x @ (b @ torch.diag(e.view(-1)) @ a).T
    with torch.no_grad():
        assert (layer(x) - expected).abs().max().item() <= 1e-6
        before = layer(x)
        layer.merge()
        assert (layer(x) - before).abs().max().item() <= 1e-6
        layer.unmerge()


def test_budget_schedule_is_the_cubic_formula() -> None:
    cfg = dt.AdaLoraConfig(init_r=12, target_r=4, tinit=3, tfinal=5, deltaT=2, total_step=30)
    b0, bt, t_i, t_f, total = 12 * 6, 4 * 6, 3, 5, 30
    for t in range(1, total + 1):
        budget, mask = budget_schedule(t, b0, bt, cfg, total)
        if t <= t_i:
            assert (budget, mask) == (b0, False)
        elif t > total - t_f:
            assert (budget, mask) == (bt, True)
        else:
            cubic = bt + (b0 - bt) * (1 - (t - t_i) / (total - t_f - t_i)) ** 3
            assert budget == int(cubic)
            assert mask == (t % 2 == 0)
    # Monotone from b0 down to bT.
    budgets = [budget_schedule(t, b0, bt, cfg, total)[0] for t in range(1, total + 1)]
    assert budgets == sorted(budgets, reverse=True)
    assert budgets[0] == b0 and budgets[-1] == bt


def test_importance_is_smoothed_sensitivity_times_uncertainty() -> None:
    model = make_bert()
    dt.inject(model, dt.AdaLoraConfig(init_r=3, target_r=1, target_modules=["query"]))
    randomize(model)
    layer = model.bert.encoder.layer[0].attention.self.query
    beta1, beta2 = 0.7, 0.6
    ipt: dict[str, torch.Tensor] = {}
    unc: dict[str, torch.Tensor] = {}
    for step in range(3):
        for p in model.parameters():
            p.grad = None
        run(model, text_inputs(seed=step)).pow(2).sum().backward()
        update_importance(layer, "default", beta1, beta2)
        for part in "AEB":
            p = getattr(layer, f"lora_{part}")["default"]
            sens = (p * p.grad).abs()  # I = |w dL/dw|
            ipt[part] = beta1 * ipt.get(part, 0 * sens) + (1 - beta1) * sens
            unc[part] = beta2 * unc.get(part, 0 * sens) + (1 - beta2) * (sens - ipt[part]).abs()
    state = layer.state("default")
    for part in "AEB":
        assert torch.allclose(state.buffer(f"ipt_{part}"), ipt[part], rtol=1e-5, atol=1e-12)
        assert torch.allclose(state.buffer(f"unc_{part}"), unc[part], rtol=1e-5, atol=1e-12)
    s = {part: ipt[part] * unc[part] for part in "AEB"}
    # S_i = s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji)
    expected = torch.stack(
        [s["E"][i, 0] + s["A"][i].mean() + s["B"][:, i].mean() for i in range(3)]
    )
    assert torch.allclose(triplet_scores(layer, "default"), expected, rtol=1e-6)


def test_mask_to_budget_drops_the_globally_least_important_triplets() -> None:
    model = make_bert()
    dt.inject(model, dt.AdaLoraConfig(init_r=4, target_r=2, target_modules=QV))
    randomize(model)
    named = list(layers(model).items())
    gen = torch.Generator().manual_seed(3)
    for _, layer in named:  # set the statistics so that the scores are known
        st = layer.state("default")
        for buf_name, buf in st.named_buffers():
            if buf_name.startswith(("ipt_", "unc_")):
                buf.copy_(torch.rand(buf.shape, generator=gen))
    scores = torch.cat([triplet_scores(layer, "default") for _, layer in named])
    budget = 10  # of 16: drop the 6 smallest over all modules
    dropped = set(scores.argsort()[:6].tolist())
    kept = mask_to_budget(named, "default", 16, budget)
    flat = torch.cat([kept[n] for n, _ in named])
    assert flat.sum().item() == budget
    assert {i for i in range(16) if not flat[i]} == dropped
    es = torch.cat([layer.lora_E["default"].view(-1) for _, layer in named])
    assert all((es[i] == 0) == (i in dropped) for i in range(16))


def test_orthogonal_regularization_formula() -> None:
    model = make_bert()
    dt.inject(model, dt.AdaLoraConfig(init_r=3, target_r=1, orth_reg_weight=0.3, target_modules=QV))
    randomize(model)
    terms = []
    for layer in layers(model).values():
        q, p = layer.lora_A["default"], layer.lora_B["default"]
        terms.append(torch.sqrt(((q @ q.T - torch.eye(3)) ** 2).sum()))  # ||Q Q^T - I||_F
        terms.append(torch.sqrt(((p.T @ p - torch.eye(3)) ** 2).sum()))  # ||P^T P - I||_F
    expected = 0.3 * sum(terms) / len(terms)
    assert torch.allclose(orthogonal_regularization(model), expected, rtol=1e-6)
    dt.set_active(model, [])
    assert orthogonal_regularization(model).item() == 0.0


# --- the rank allocator against PEFT's own, step by step -------------------------------------


def test_allocator_matches_peft_rank_allocator() -> None:
    from peft.tuners.adalora.layer import RankAllocator

    cfg = dt.AdaLoraConfig(
        init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8, target_modules=QV
    )
    ours = make_bert().train()
    dt.inject(ours, cfg)
    randomize(ours)
    theirs = copy.deepcopy(ours)
    peft_alloc = RankAllocator(theirs, copy.deepcopy(cfg), "default")
    opt_a = torch.optim.SGD(dt.trainable_parameters(ours), lr=0.1)
    opt_b = torch.optim.SGD(dt.trainable_parameters(theirs), lr=0.1)
    final = cfg.total_step - cfg.tfinal  # type: ignore[operator]
    for step in range(1, 9):
        for model, opt in ((ours, opt_a), (theirs, opt_b)):
            opt.zero_grad()
            run(model, text_inputs(seed=step)).pow(2).mean().backward()
            opt.step()
        update_and_allocate(ours, step)
        # PEFT's AdaLoraModel.update_and_allocate, written out.
        if step < final:
            _, pattern = peft_alloc.update_and_allocate(theirs, step)
        elif step == final:
            _, pattern = peft_alloc.update_and_allocate(theirs, step, force_mask=True)
            peft_alloc.reset_ipt()
        else:
            peft_alloc.mask_using_rank_pattern(theirs, pattern)
        for (n, a), (_, b) in zip(layers(ours).items(), layers(theirs).items(), strict=True):
            assert torch.allclose(a.lora_E["default"], b.lora_E["default"], atol=1e-7), (step, n)
    expected = {k.replace(".default", ""): v for k, v in pattern.items()}
    assert state_of(ours).configs["default"].rank_pattern == expected


# --- the trainer hook ---------------------------------------------------------------------------


class Regression:
    """Mean squared error of ``model(x)`` against ``y``."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return ((model(batch["x"]) - batch["y"]) ** 2).mean()

    def evaluate(self, model: nn.Module, loader: Any) -> dict[str, float]:
        with torch.no_grad():
            losses = [float(self.loss(model, b)) for b in loader]
        return {"loss": sum(losses) / len(losses)}


class Branches(nn.Module):
    """Four parallel Linear(16, 16) branches; only the first two reach the output strongly."""

    def __init__(self) -> None:
        super().__init__()
        self.m = nn.ModuleList(nn.Linear(16, 16, bias=False) for _ in range(4))
        self.weights = (1.0, 1.0, 0.0, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(c * m(x) for c, m in zip(self.weights, self.m, strict=True))  # type: ignore[return-value]


def branches_data() -> tuple[Branches, list[dict[str, torch.Tensor]]]:
    torch.manual_seed(1)
    model = Branches()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 16, generator=gen)
    # The target needs a rank-3 change in branches 0 and 1 and none in 2 and 3.
    deltas = [
        torch.randn(16, 3, generator=gen) @ torch.randn(3, 16, generator=gen) * 0.3
        for _ in range(2)
    ]
    with torch.no_grad():
        y = model(x) + sum(x @ d.T for d in deltas)
    return model, [{"x": x[i], "y": y[i]} for i in range(len(x))]


def test_trainer_calls_hooks_with_gradients_present() -> None:
    model, data = branches_data()
    for p in model.parameters():
        p.requires_grad_(True)
    seen: list[tuple[int, int, bool]] = []

    class Hook:
        def extra_loss(self, m: nn.Module) -> torch.Tensor:
            return m.m[0].weight.sum() * 0 + 5.0  # on the gradient path; adds 5 to the loss

        def after_optimizer_step(self, m: nn.Module, step: int, total: int) -> None:
            seen.append((step, total, m.m[0].weight.grad is not None))

    add_training_hook(model, "test", Hook())
    cfg = TrainerConfig(epochs=1, batch_size=64, learning_rate=1e-2, progress=False)
    result = fit(model, Regression(), data, None, cfg)
    assert all(row["loss"] > 5.0 for row in result.history)
    assert seen == [(1, 4, True), (2, 4, True), (3, 4, True), (4, 4, True)]


def test_budget_moves_rank_to_the_modules_that_matter(tmp_path: Path) -> None:
    model, data = branches_data()
    cfg = dt.AdaLoraConfig(
        init_r=6,
        target_r=3,
        tinit=5,
        tfinal=5,
        deltaT=2,
        lora_alpha=6,
        orth_reg_weight=0.1,
        target_modules=[f"m.{i}" for i in range(4)],
    )
    dt.inject(model, cfg)
    train = TrainerConfig(
        epochs=4,
        batch_size=16,
        learning_rate=2e-2,
        progress=False,
        warmup_ratio=0.0,
        scheduler="constant",
        max_grad_norm=None,
    )
    result = fit(model, Regression(), data, None, train)
    assert result.history[-1]["loss"] < 0.3 * result.history[0]["loss"]
    ranks = final_ranks(model)
    assert sum(ranks.values()) == 3 * 4  # the target budget
    assert len(set(ranks.values())) > 1  # rank moved between modules
    assert min(ranks["m.0"], ranks["m.1"]) >= 3  # the modules that matter keep their rank
    assert max(ranks["m.2"], ranks["m.3"]) < min(ranks["m.0"], ranks["m.1"])

    saved = state_of(model).configs["default"]
    assert saved.total_step == result.steps  # null took the trainer's total
    x = torch.stack([d["x"] for d in data[:8]])
    with torch.no_grad():
        out = model(x)
    dt.save_adapter(model, tmp_path)
    cfg_json = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert {k: sum(v) for k, v in cfg_json["rank_pattern"].items()} == {
        f"{n}.lora_E": r for n, r in ranks.items()
    }
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    for n, r in ranks.items():
        assert tensors[f"base_model.model.{n}.lora_A"].shape == (r, 16)
        assert tensors[f"base_model.model.{n}.lora_E"].shape == (r, 1)
        assert tensors[f"base_model.model.{n}.lora_B"].shape == (16, r)
    # Loading re-creates those ranks, with the same outputs.
    fresh, _ = branches_data()
    dt.load_adapter(fresh, tmp_path)
    assert {n: layer.lora_A["default"].shape[0] for n, layer in layers(fresh).items()} == {
        f"m.{i}": ranks[f"m.{i}"] for i in range(4)
    }
    assert final_ranks(fresh) == ranks
    with torch.no_grad():
        assert (fresh(x) - out).abs().max().item() <= 1e-6
    dt.merge(fresh)
    with torch.no_grad():
        assert (fresh(x) - out).abs().max().item() <= 1e-5


def test_resume_continues_the_allocation_exactly(tmp_path: Path) -> None:
    """The importance statistics and masks are buffers: a resumed run ends bit-identical."""

    class Interrupt(Exception):
        pass

    def stop_at(step: int) -> Any:
        def callback(row: dict[str, float]) -> None:
            if row["step"] == step:
                raise Interrupt

        return callback

    cfg = dt.AdaLoraConfig(
        init_r=4, target_r=2, tinit=2, tfinal=4, deltaT=1, target_modules=["m.0", "m.1", "m.2"]
    )
    train = TrainerConfig(
        epochs=2, batch_size=32, learning_rate=2e-2, progress=False, checkpoint_every_steps=1
    )
    results = {}
    for kind in ("straight", "resumed"):
        model, data = branches_data()
        dt.inject(model, cfg)
        if kind == "resumed":
            with pytest.raises(Interrupt):
                fit(model, Regression(), data, None, train, tmp_path / kind, callbacks=[stop_at(9)])
            model, data = branches_data()
            dt.inject(model, cfg)
            fit(model, Regression(), data, None, train, tmp_path / kind, resume=True)
        else:
            fit(model, Regression(), data, None, train, tmp_path / kind)
        results[kind] = (model, state_of(model).configs["default"].rank_pattern)
    (a, pattern_a), (b, pattern_b) = results["straight"], results["resumed"]
    assert pattern_a is not None and pattern_a == pattern_b
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), n


# --- PEFT interop ---------------------------------------------------------------------------


def bert_data(n: int = 24) -> list[dict[str, torch.Tensor]]:
    batch = text_inputs(batch=n, seq=7, seed=5)
    labels = torch.arange(n) % 3
    return [{**{k: v[i] for k, v in batch.items()}, "labels": labels[i]} for i in range(n)]


def test_trained_adapter_loads_in_peft_with_same_outputs(tmp_path: Path) -> None:
    from peft import PeftModel

    model = make_bert()
    cfg = dt.AdaLoraConfig(
        init_r=4,
        target_r=2,
        tinit=2,
        tfinal=2,
        lora_alpha=8,
        target_modules=["query", "value", "intermediate.dense"],
        modules_to_save=["classifier"],
    )
    dt.inject(model, cfg)
    train = TrainerConfig(epochs=3, batch_size=8, learning_rate=5e-2, progress=False)
    fit(model, ClassificationTask(3), bert_data(), None, train)
    model.eval()
    ranks = final_ranks(model)
    assert sum(ranks.values()) == 2 * 6 and min(ranks.values()) < 4
    x = text_inputs()
    with torch.no_grad():
        ours = run(model, x)
    dt.save_adapter(model, tmp_path)

    peft_model = PeftModel.from_pretrained(make_bert(), str(tmp_path)).eval()
    with torch.no_grad():
        theirs = run(peft_model, x)
    assert (theirs - ours).abs().max().item() <= 1e-5
    with torch.no_grad():
        base = run(make_bert(), x)
    assert (ours - base).abs().max().item() > 1e-3


def test_peft_trained_adapter_loads_with_same_outputs(tmp_path: Path) -> None:
    from peft import AdaLoraConfig, get_peft_model

    peft_model = get_peft_model(
        make_bert(),
        AdaLoraConfig(
            init_r=4, target_r=2, tinit=1, tfinal=2, total_step=8, target_modules=QV, lora_alpha=8
        ),
    ).train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    for step in range(1, 9):
        out = peft_model(**text_inputs(seed=step), labels=torch.tensor([0, 1, 2]))
        out.loss.backward()
        opt.step()
        peft_model.base_model.update_and_allocate(step)
        opt.zero_grad()
    peft_model.save_pretrained(str(tmp_path))
    peft_model.eval()
    x = text_inputs()
    with torch.no_grad():
        theirs = run(peft_model, x)

    model = make_bert()
    dt.load_adapter(model, tmp_path)
    with torch.no_grad():
        ours = run(model, x)
    assert (ours - theirs).abs().max().item() <= 1e-5
    pattern = json.loads((tmp_path / CONFIG_NAME).read_text())["rank_pattern"]
    assert final_ranks(model) == {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}


# --- configs, CLI and errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"target_r": 16}, "target_r=16"),
        ({"init_r": 0}, "init_r=0"),
        ({"beta1": 1.0}, "beta1=1.0"),
        ({"deltaT": 0}, "deltaT=0"),
        ({"orth_reg_weight": -1}, "orth_reg_weight=-1"),
        ({"total_step": 10, "tinit": 6, "tfinal": 4}, "leaves no pruning phase"),
    ],
)
def test_bad_config_values_raise(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(dt.ConfigError, match=match):
        dt.config_from_dict({"name": "adalora", **changes})


def test_schedule_too_long_for_the_run_raises() -> None:
    model, data = branches_data()
    dt.inject(model, dt.AdaLoraConfig(init_r=2, target_r=1, tinit=10, target_modules=["m.0"]))
    cfg = TrainerConfig(epochs=1, batch_size=64, learning_rate=1e-2, progress=False)
    with pytest.raises(dt.ConfigError, match="leaves no pruning phase"):
        fit(model, Regression(), data, None, cfg)


def test_total_step_beyond_the_run_warns() -> None:
    model, data = branches_data()
    cfg = dt.AdaLoraConfig(init_r=2, target_r=1, total_step=100, target_modules=["m.0"])
    dt.inject(model, cfg)
    train = TrainerConfig(epochs=1, batch_size=64, learning_rate=1e-2, progress=False)
    with pytest.warns(UserWarning, match="after this run's 4 steps"):
        fit(model, Regression(), data, None, train)
    assert state_of(model).configs["default"].rank_pattern is None


def test_unsupported_targets_and_patterns_raise() -> None:
    with pytest.raises(dt.ConfigError, match="AdaLoRA wraps Linear"):
        dt.inject(make_bert(), dt.AdaLoraConfig(target_modules=["word_embeddings"]))
    bad = dt.AdaLoraConfig(
        init_r=4,
        target_r=2,
        target_modules=["query"],
        rank_pattern={"bert.encoder.layer.0.attention.self.query.lora_E": [True, False]},
    )
    with pytest.raises(dt.ConfigError, match="has 2 entries, init_r is 4"):
        dt.inject(make_bert(), bad)


def test_conv2d_delta_matches_a_dense_convolution() -> None:
    model = make_cnn()
    dt.inject(model, dt.AdaLoraConfig(init_r=3, target_r=1, target_modules=["conv2"]))
    randomize(model)
    layer = model.conv2
    x = torch.randn(2, 8, 6, 6)
    a, e, b = layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]
    delta = ((b @ (a * e)) * (8 / (3 + 1e-5))).reshape(16, 8, 3, 3)
    expected = torch.nn.functional.conv2d(x, layer.base_layer.weight + delta, layer.base_layer.bias)
    with torch.no_grad():
        assert (layer(x) - expected).abs().max().item() <= 1e-5


def test_yaml_config_and_cli_list_adalora() -> None:
    from deltatune.cli import methods_table
    from deltatune.run import load_run_config

    cfg = load_run_config(Path(__file__).parents[1] / "configs" / "adalora.yaml", [])
    method = cfg.method_config()
    assert isinstance(method, dt.AdaLoraConfig)
    assert method.target_r < method.init_r
    row = next(r for r in methods_table() if r["method"] == "adalora")
    assert row["peft_compatible"] and row["merge"] and row["family"] == "low-rank"
