"""The generic method matrix: every registered method on every model it has a case for.

Checks, per case: injection starts at the base and changes the output once the method's
tensors move; only the method's parameters get gradients; save -> load onto a fresh base is
exact; merge/unmerge, disable, several named adapters and unload behave as the method's
capabilities say; the trainable report matches a hand count.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import ALL_CASES, CASES_BY_METHOD, Case, labelled_batches, run
from deltatune.checkpoint import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from deltatune.quant.linear import QuantLinear


@pytest.fixture(params=ALL_CASES, ids=[c.id for c in ALL_CASES])
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


def spec_of(case: Case) -> dt.registry.MethodSpec:
    return dt.get_method(case.method)


def method_tensors(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The parameters the method owns (what it saves, less buffers), by PEFT key."""
    tensors = dt.adapter_state_dict(model, adapter_name)
    return {k: t for k, t in tensors.items() if isinstance(t, nn.Parameter)}


def perturb(model: nn.Module, adapter_name: str = "default", seed: int = 0) -> None:
    """Move the method's tensors away from their (identity) start values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in method_tensors(model, adapter_name).values():
            t.add_(0.2 * torch.randn(t.shape, generator=gen, dtype=t.dtype))


def injected(case: Case, adapter_name: str = "default", seed: int = 0) -> nn.Module:
    """A fresh model with the case's adapter injected and moved away from identity."""
    model = case.make_model()
    add_adapter(model, case, adapter_name, seed)
    return model


def add_adapter(model: nn.Module, case: Case, adapter_name: str, seed: int) -> None:
    torch.manual_seed(seed)  # LoRA's init_lora_weights=False draws from the global generator
    dt.inject(model, case.config(), adapter_name)
    if "init_lora_weights" not in case.options:
        perturb(model, adapter_name, seed)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def n_adapter_layers(model: nn.Module) -> int:
    return sum(isinstance(m, dt.AdapterLayer) for m in model.modules())


# --- the registry is covered ----------------------------------------------------------------


def test_every_method_has_a_case() -> None:
    registered = dt.methods()
    missing = [name for name in registered if not CASES_BY_METHOD.get(name)]
    assert not missing, f"registered methods without a test-matrix case in conftest.py: {missing}"
    stale = [name for name in CASES_BY_METHOD if name not in registered]
    assert not stale, f"conftest.py has cases for unregistered methods: {stale}"
    assert {c.method for c in ALL_CASES} == set(registered)
    assert len({c.id for c in ALL_CASES}) == len(ALL_CASES)


def test_case_configs_round_trip(case: Case) -> None:
    cfg = case.config()
    assert type(cfg) is spec_of(case).config_cls
    again = dt.config_from_dict({"name": case.method, **cfg.to_dict()})
    assert again == cfg


# --- (a) injection ----------------------------------------------------------------------------


def test_inject_starts_at_base_then_changes_output(case: Case) -> None:
    x = case.inputs()
    model = case.make_model()
    with torch.no_grad():
        base = run(model, x)
        if case.starts_like:
            dt.set_active(model, list(case.starts_like))
            start_ref = run(model, x)
    overrides = {"init_lora_weights": True} if "init_lora_weights" in case.options else {}
    dt.inject(model, case.config(**overrides))
    with torch.no_grad():
        start = run(model, x)
    # Default initialisation is an identity (DoRA up to rounding of the norm division).
    if case.starts_like is not None:
        assert maxdiff(start, start_ref if case.starts_like else base) <= 1e-6

    changed = injected(case)
    with torch.no_grad():
        out = run(changed, x)
    assert out.shape == base.shape
    assert maxdiff(out, base) > 1e-3


# --- (b) gradients --------------------------------------------------------------------------


def test_only_method_parameters_get_gradients(case: Case) -> None:
    model = injected(case)
    own_ids = {id(t) for t in method_tensors(model).values()}
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in named.items()}
    spec = spec_of(case)

    if spec.fit is not None:
        # Fitted in closed form: nothing trains by gradient, fitting changes only the head.
        assert trainable == set()
        metrics = spec.fit(model, case.config(), labelled_batches(case.model))
        assert 0.0 <= metrics["train_accuracy"] <= 1.0
        changed = {n for n, p in named.items() if not torch.equal(p, before[n])}
        assert changed
        assert {id(named[n]) for n in changed} <= own_ids
        return

    # The trainable parameters are exactly the tensors the method saves.
    assert {id(named[n]) for n in trainable} == own_ids
    out = run(model, case.inputs())
    out.float().pow(2).mean().backward()
    with_grad = {n for n, p in named.items() if p.grad is not None}
    assert with_grad == trainable
    for n in with_grad:
        assert torch.isfinite(named[n].grad).all()
    opt = torch.optim.SGD([named[n] for n in sorted(trainable)], lr=0.5)
    opt.step()
    for n, p in named.items():
        if n not in trainable:
            assert torch.equal(p, before[n]), f"frozen parameter {n} moved"
    moved = [n for n in trainable if not torch.equal(named[n], before[n])]
    assert moved


# --- (c) save / load ------------------------------------------------------------------------


def test_save_load_onto_fresh_base_is_exact(case: Case, tmp_path: Path) -> None:
    x = case.inputs()
    model = injected(case)
    with torch.no_grad():
        out = run(model, x)
    dt.save_adapter(model, tmp_path)
    assert (tmp_path / CONFIG_NAME).is_file()
    assert (tmp_path / WEIGHTS_NAME).is_file()
    saved_cfg = dt.read_adapter_config(tmp_path)
    assert saved_cfg.method_name == case.method

    fresh = case.make_model()
    with torch.no_grad():
        base = run(fresh, x)
    assert dt.load_adapters(fresh, tmp_path) == ["default"]
    with torch.no_grad():
        loaded = run(fresh, x)
    assert torch.equal(loaded, out)
    assert maxdiff(loaded, base) > 1e-3
    # Loaded for inference by default: nothing trainable.
    assert not any(p.requires_grad for p in fresh.parameters())
    # ... and trainable when asked.
    again = case.make_model()
    dt.load_adapter(again, tmp_path, is_trainable=True)
    assert dt.trainable_report(again).trainable == case.trainable


# --- (d) merge ------------------------------------------------------------------------------


def test_merge_and_unmerge(case: Case) -> None:
    x = case.inputs()
    model = injected(case)
    with torch.no_grad():
        out = run(model, x)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    if case.in_place:
        # Trained in place: the weights already are the result, merging changes nothing.
        dt.merge(model)
        with torch.no_grad():
            assert torch.equal(run(model, x), out)
        assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
        return
    if not spec_of(case).capabilities.merge:
        with pytest.raises(dt.DeltatuneError, match="cannot be merged"):
            dt.merge(model)
        with torch.no_grad():
            assert torch.equal(run(model, x), out)
        return
    dt.merge(model)
    mergeable = [
        layer for _, layer in dt.adapter_layers(model) if not isinstance(layer, dt.ModulesToSave)
    ]
    assert mergeable
    assert all(layer.merged_adapters == ["default"] for layer in mergeable)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, weights[n])]
    assert changed, "merge changed no base weight"
    assert all("base_layer" in n for n in changed)
    with torch.no_grad():
        merged = run(model, x)
    assert maxdiff(merged, out) <= 1e-5
    dt.unmerge(model)
    assert not any(layer.merged_adapters for _, layer in dt.adapter_layers(model))
    with torch.no_grad():
        assert maxdiff(run(model, x), out) <= 1e-5
    for n, p in model.named_parameters():
        # (LoRA-on-Embedding deltas with init_lora_weights=False are O(10): fp32 rounding ~1e-6)
        assert maxdiff(p, weights[n]) <= 1e-5, n


# --- (e) disable ----------------------------------------------------------------------------


def test_disable_restores_base(case: Case) -> None:
    x = case.inputs()
    with torch.no_grad():
        base = run(case.make_model(), x)
    model = injected(case)
    with torch.no_grad():
        out = run(model, x)
    if not spec_of(case).capabilities.disable:
        with pytest.raises(dt.DeltatuneError):
            dt.disable(model)
        return
    with dt.disabled(model), torch.no_grad():
        assert torch.equal(run(model, x), base)
    with torch.no_grad():
        assert torch.equal(run(model, x), out)
    dt.disable(model)
    with torch.no_grad():
        assert torch.equal(run(model, x), base)
    dt.enable(model)
    with torch.no_grad():
        assert torch.equal(run(model, x), out)
    if spec_of(case).capabilities.merge:
        # A merged adapter is unmerged before disabling.
        dt.merge(model)
        with dt.disabled(model), torch.no_grad():
            assert maxdiff(run(model, x), base) <= 1e-4
        with torch.no_grad():
            assert maxdiff(run(model, x), out) <= 1e-4


# --- (f) named adapters ---------------------------------------------------------------------


def test_two_named_adapters(case: Case, tmp_path: Path) -> None:
    x = case.inputs()
    with torch.no_grad():
        base = run(case.make_model(), x)
    model = injected(case, "default", seed=1)
    with torch.no_grad():
        out_a = run(model, x)
    if not spec_of(case).capabilities.multi_adapter:
        with pytest.raises(dt.ConfigError):
            dt.inject(model, case.config(), "other")
        assert dt.adapter_names(model) == ["default"]
        return
    with pytest.raises(dt.ConfigError, match="already exists"):
        dt.inject(model, case.config(), "default")
    add_adapter(model, case, "other", seed=2)
    pre = case.prerequisite_names
    assert dt.adapter_names(model) == [*pre, "default", "other"]
    assert dt.active_adapters(model) == ["other"]
    with torch.no_grad():
        out_b = run(model, x)
    assert maxdiff(out_b, out_a) > 1e-3
    assert maxdiff(out_b, base) > 1e-3
    # Only the active adapter trains.
    other_ids = {id(t) for t in method_tensors(model, "other").values()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == other_ids

    dt.set_active(model, "default")
    with torch.no_grad():
        assert torch.equal(run(model, x), out_a)
    default_ids = {id(t) for t in method_tensors(model, "default").values()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == default_ids
    dt.set_active(model, "other")
    with torch.no_grad():
        assert torch.equal(run(model, x), out_b)
    with pytest.raises(dt.ConfigError, match="no adapter named 'nope'"):
        dt.set_active(model, "nope")

    # Both travel through save_adapters / load_adapters ("other" in a subfolder).
    dt.save_adapters(model, tmp_path)
    assert (tmp_path / "other" / CONFIG_NAME).is_file()
    fresh = case.make_base()
    assert dt.load_adapters(fresh, tmp_path) == [*pre, "default", "other"]
    for name, expected in (("default", out_a), ("other", out_b)):
        dt.set_active(fresh, name)
        with torch.no_grad():
            assert torch.equal(run(fresh, x), expected)

    dt.delete(model, "other")
    assert dt.adapter_names(model) == [*pre, "default"]
    assert not any(".other" in n for n, _ in model.named_parameters())
    dt.set_active(model, "default")
    with torch.no_grad():
        assert torch.equal(run(model, x), out_a)
    dt.delete(model, "default")
    assert n_adapter_layers(model) == n_adapter_layers(case.make_model())
    with torch.no_grad():
        assert torch.equal(run(model, x), base)


# --- (g) unload -----------------------------------------------------------------------------


def _same_structure(model: nn.Module, reference: nn.Module) -> None:
    assert n_adapter_layers(model) == 0
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert list(model.state_dict()) == list(reference.state_dict())
    assert dt.adapter_names(model) == []


def test_unload(case: Case) -> None:
    x = case.inputs()
    reference = case.make_base()
    with torch.no_grad():
        base = run(reference, x)
    model = injected(case)
    with torch.no_grad():
        out = run(model, x)
    caps = spec_of(case).capabilities

    if caps.merge or case.in_place:
        merged = dt.unload(model, merge=True)
        assert merged is model
        _same_structure(merged, reference)
        with torch.no_grad():
            assert maxdiff(run(merged, x), out) <= 1e-5

    if caps.disable:
        plain = dt.unload(injected(case))
        _same_structure(plain, reference)
        with torch.no_grad():
            assert torch.equal(run(plain, x), base)


# --- (h) trainable report -------------------------------------------------------------------


def test_trainable_report_matches_hand_count(case: Case) -> None:
    model = case.make_model()
    # a quantised base's packed weights count as the in x out weights they stand for
    base_total = sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear)
    )
    dt.inject(model, case.config())
    report = dt.trainable_report(model)
    assert report.trainable == case.trainable
    assert report.total == base_total + (0 if case.in_place else case.trainable)
    assert sum(report.by_group.values()) == report.trainable
    assert report.percent == pytest.approx(100.0 * case.trainable / report.total)
    assert f"trainable params: {case.trainable:,}" in str(report)
    assert sum(p.numel() for p in dt.trainable_parameters(model)) == case.trainable


def test_saved_keys_are_peft_style(case: Case) -> None:
    model = injected(case)
    keys = list(method_tensors(model))
    assert keys
    # Layers with absolute_keys name their keys in full (PEFT's prompt-learning formats keep
    # e.g. ``prompt_embeddings`` at the top level); every other key has PEFT's module prefix.
    absolute = {
        k
        for _, layer in dt.adapter_layers(model)
        if layer.absolute_keys and "default" in layer.adapter_names
        for k in layer.adapter_tensors("default")
    }
    assert all(k.startswith(PREFIX) or k in absolute for k in keys)
    assert not any(".default." in k or k.endswith(".default") for k in keys)


def test_injected_modules_follow_training_mode(case: Case) -> None:
    for training in (False, True):
        model = case.make_model().train(training)
        dt.inject(model, case.config())
        modes = {name: m.training for name, m in model.named_modules()}
        assert set(modes.values()) == {training}, [n for n, t in modes.items() if t != training]


def test_full_finetune_keeps_batchnorm_statistics(tmp_path: Path) -> None:
    """A fully fine-tuned CNN trained in train mode saves its BatchNorm running statistics."""
    case = next(c for c in ALL_CASES if c.id == "cnn-full")
    x = case.inputs()
    model = case.make_model()
    dt.inject(model, case.config())
    model.train()
    opt = torch.optim.SGD(dt.trainable_parameters(model), lr=0.1)
    run(model, x).pow(2).mean().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        out = run(model, x)
    dt.save_adapter(model, tmp_path)
    fresh = case.make_model()
    dt.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh.bn1.running_mean, model.bn1.running_mean)
    with torch.no_grad():
        assert torch.equal(run(fresh, x), out)
