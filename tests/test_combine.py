"""Free combination of methods (methods/combine.py): LoRA on attention + Pfeiffer on the FFN +
a trainable head, checked against the same parts injected by hand and against the formulas."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from conftest import make_bert, make_llama, run, text_inputs
from deltatune.checkpoint import CONFIG_NAME, WEIGHTS_NAME

LORA = {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}
PFEIFFER = {"name": "pfeiffer", "bottleneck_size": 4}


def combo(**extra: object) -> dt.CombineConfig:
    return dt.CombineConfig(methods=[LORA, PFEIFFER], task_type="SEQ_CLS", **extra)  # type: ignore[arg-type]


def perturb(model: nn.Module, name: str = "default", seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in dt.adapter_state_dict(model, name).values():
            t.add_(0.2 * torch.randn(t.shape, generator=gen))


def combined(seed: int = 0) -> nn.Module:
    model = make_bert()
    torch.manual_seed(seed)
    dt.inject(model, combo())
    perturb(model)
    return model


def hand_composed() -> nn.Module:
    """The same parts as separate adapters, both active (the head goes with the LoRA one)."""
    model = make_bert()
    dt.inject(model, dt.config_from_dict({**LORA, "task_type": "SEQ_CLS"}), "attn")
    dt.inject(model, dt.config_from_dict(PFEIFFER), "ffn")
    dt.set_active(model, ["attn", "ffn"])
    return model


def test_equals_hand_composed_parts() -> None:
    x = text_inputs()
    model = combined()
    hand = hand_composed()
    tensors = dt.adapter_state_dict(model)
    hand_tensors = {**dt.adapter_state_dict(hand, "attn"), **dt.adapter_state_dict(hand, "ffn")}
    assert set(tensors) == set(hand_tensors)
    with torch.no_grad():
        for k, t in hand_tensors.items():
            t.copy_(tensors[k])
        out, ref = run(model, x), run(hand, x)
    assert torch.equal(out, ref)
    with torch.no_grad():
        base = run(make_bert(), x)
    assert (out - base).abs().max() > 1e-3
    # Same seed, no perturbation: the fresh injection draws the same initial tensors as by hand.
    a, b = make_bert(), make_bert()
    torch.manual_seed(3)
    dt.inject(a, combo())
    torch.manual_seed(3)
    dt.inject(b, dt.config_from_dict({**LORA, "task_type": "SEQ_CLS"}), "attn")
    dt.inject(b, dt.config_from_dict(PFEIFFER), "ffn")
    sa = dt.adapter_state_dict(a)
    sb = {**dt.adapter_state_dict(b, "attn"), **dt.adapter_state_dict(b, "ffn")}
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_wrapped_modules_follow_the_formulas() -> None:
    """query: y = W x + b + (alpha/r) B A x; FFN output: h + W_up relu(W_down h + b_d) + b_u."""
    model = combined()
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(7))
    q = model.get_submodule("bert.encoder.layer.0.attention.self.query")
    base_q = q.base_layer
    a, b = q.lora_A["default"].weight, q.lora_B["default"].weight
    want = F.linear(x, base_q.weight, base_q.bias) + (8 / 4) * x @ a.T @ b.T
    with torch.no_grad():
        assert (q(x) - want).abs().max() <= 1e-5
    ffn = model.get_submodule("bert.encoder.layer.0.output.dense")
    t = dt.adapter_state_dict(model)
    p = "base_model.model.bert.encoder.layer.0.output.dense.adapter."
    h_in = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(8))
    h = F.linear(h_in, ffn.base_layer.weight, ffn.base_layer.bias)
    down = F.relu(h @ t[p + "down.weight"].T + t[p + "down.bias"])
    want_ffn = h + down @ t[p + "up.weight"].T + t[p + "up.bias"]
    with torch.no_grad():
        assert (ffn(h_in) - want_ffn).abs().max() <= 1e-5


def test_only_the_parts_get_gradients_and_count_by_hand() -> None:
    model = combined()
    report = dt.trainable_report(model)
    # LoRA r=4 on query, value (32->32): 4 * (32 + 32) * 2 modules * 2 blocks = 1024;
    # Pfeiffer m=4 on hidden 32: down 32*4+4 + up 4*32+32 = 292 per block * 2 = 584;
    # classifier copy 32*3+3 = 99.
    assert report.trainable == 1024 + 584 + 99
    assert report.by_group == {"lora_A": 512, "lora_B": 512, "adapter": 584, "modules_to_save": 99}
    named = dict(model.named_parameters())
    own = {id(t) for t in dt.adapter_state_dict(model).values()}
    assert {id(p) for p in named.values() if p.requires_grad} == own
    run(model, text_inputs()).pow(2).mean().backward()
    with_grad = {n for n, p in named.items() if p.grad is not None}
    assert {id(named[n]) for n in with_grad} == own
    assert any("lora_B" in n for n in with_grad) and any(n.endswith("up.weight") for n in with_grad)


def test_save_load_on_fresh_base_is_exact(tmp_path: Path) -> None:
    x = text_inputs()
    model = combined()
    with torch.no_grad():
        out = run(model, x)
    dt.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    cfg = dt.read_adapter_config(tmp_path)
    # As PEFT does, the SEQ_CLS heads are written out in modules_to_save.
    assert isinstance(cfg, dt.CombineConfig)
    assert cfg == combo(modules_to_save=["classifier", "score"])
    fresh = make_bert()
    assert dt.load_adapters(fresh, tmp_path) == ["default"]
    with torch.no_grad():
        assert torch.equal(run(fresh, x), out)
    assert dt.trainable_report(fresh).trainable == 0
    again = make_bert()
    dt.load_adapter(again, tmp_path, is_trainable=True)
    assert dt.trainable_report(again).trainable == 1707


def test_export_parts_lora_part_loads_in_peft(tmp_path: Path) -> None:
    from peft import PeftModel

    x = text_inputs()
    model = combined()
    folders = dt.export_parts(model, tmp_path)
    assert [f.name for f in folders] == ["0-lora", "1-pfeiffer"]
    # The LoRA part alone, by deltatune and by peft, computes the same thing.
    ours = make_bert()
    dt.load_adapter(ours, folders[0])
    assert isinstance(dt.read_adapter_config(folders[0]), dt.LoraConfig)
    theirs = PeftModel.from_pretrained(make_bert(), str(folders[0])).eval()
    with torch.no_grad():
        a, b = run(ours, x), theirs(**x).logits
        base = run(make_bert(), x)
    assert (a - b).abs().max() <= 1e-5
    assert (a - base).abs().max() > 1e-4
    # The Pfeiffer part alone loads back into deltatune.
    alone = make_bert()
    dt.load_adapter(alone, folders[1])
    assert isinstance(dt.read_adapter_config(folders[1]), dt.PfeifferConfig)
    # LoRA part + Pfeiffer part + the combination's head = the whole combination.
    with torch.no_grad():
        whole = run(model, x)
    parts = make_bert()
    dt.load_adapter(parts, folders[0], "attn")
    dt.load_adapter(parts, folders[1], "ffn")
    dt.set_active(parts, ["attn", "ffn"])
    parts.classifier.load_state_dict(model.classifier.modules_to_save["default"].state_dict())
    with torch.no_grad():
        assert torch.equal(run(parts, x), whole)


def test_merge_refuses_naming_the_part_and_mergeable_parts_merge() -> None:
    x = text_inputs()
    model = combined()
    with torch.no_grad():
        out = run(model, x)
    with pytest.raises(dt.DeltatuneError, match=r"part methods\[1\] \(pfeiffer\) cannot be merged"):
        dt.merge(model)
    with torch.no_grad():
        assert torch.equal(run(model, x), out)

    model = make_llama()
    cfg = dt.CombineConfig(
        methods=[
            {"name": "lora", "r": 4, "target_modules": ["q_proj"], "init_lora_weights": False},
            {"name": "ia3", "target_modules": ["v_proj"], "feedforward_modules": []},
        ]
    )
    dt.inject(model, cfg)
    perturb(model)
    with torch.no_grad():
        before = run(model, x)
    merged = dt.unload(model, merge=True)
    assert not any(isinstance(m, dt.AdapterLayer) for m in merged.modules())
    with torch.no_grad():
        assert (run(merged, x) - before).abs().max() <= 1e-5


def test_two_combinations_switch_and_delete() -> None:
    x = text_inputs()
    model = combined()
    with torch.no_grad():
        out_a = run(model, x)
    torch.manual_seed(1)
    dt.inject(model, combo(), "other")
    perturb(model, "other", seed=5)
    with torch.no_grad():
        out_b = run(model, x)
    assert (out_a - out_b).abs().max() > 1e-3
    dt.set_active(model, "default")
    with torch.no_grad():
        assert torch.equal(run(model, x), out_a)
    # Both combinations from one forward call (each branch runs all its parts).
    dt.set_active(model, dt.Parallel("default", "other"))
    with torch.no_grad():
        both = dt.split_parallel(model, model(**x).logits)
    assert (both["default"] - out_a).abs().max() <= 1e-5
    assert (both["other"] - out_b).abs().max() <= 1e-5
    dt.set_active(model, "default")
    dt.delete(model, "default")
    dt.set_active(model, "other")
    with torch.no_grad():
        assert torch.equal(run(model, x), out_b)


@pytest.mark.parametrize(
    ("methods", "match"),
    [
        ([], "methods is empty"),
        ([{"name": "lorra"}], "unknown method 'lorra'.*lora"),
        ([{"name": "full"}], r"methods\[0\]: name='full' cannot be a part"),
        ([{"name": "combine", "methods": [LORA]}], "cannot contain a combination"),
        (
            [{**LORA, "modules_to_save": ["classifier"]}],
            "modules_to_save.*belongs on the combination",
        ),
        ([{**LORA, "r": 0}], "r=0 must be a positive integer"),
        ([{**LORA, "rank": 4}], "unknown config key 'rank'"),
        (["lora"], r"methods\[0\]: value 'lora' is not a mapping"),
    ],
)
def test_bad_configs(methods: list[object], match: str) -> None:
    with pytest.raises(dt.ConfigError, match=match):
        dt.config_from_dict({"name": "combine", "methods": methods})


@pytest.mark.parametrize(
    ("methods", "match"),
    [
        # The same method twice on one module: the second would silently replace the first.
        (
            [LORA, {**LORA, "target_modules": ["value"]}],
            r"methods\[1\] \(lora\) and methods\[0\] both target module "
            r"'bert\.encoder\.layer\.\d\.attention\.self\.value'",
        ),
        # Two methods on one module: the wrapper belongs to the first.
        (
            [LORA, {"name": "ia3", "target_modules": ["query"], "feedforward_modules": []}],
            r"methods\[1\] \(ia3\).*attention\.self\.query' already carries a LoraLinear",
        ),
        ([{**LORA, "target_modules": ["nope"]}], r"methods\[0\] \(lora\).*nope"),
    ],
)
def test_overlapping_or_missing_targets_leave_the_model_unchanged(
    methods: list[dict[str, object]], match: str
) -> None:
    model = make_bert()
    x = text_inputs()
    with torch.no_grad():
        base = run(model, x)
    with pytest.raises(dt.ConfigError, match=match):
        dt.inject(model, dt.CombineConfig(methods=methods, task_type="SEQ_CLS"))
    assert not any(isinstance(m, dt.AdapterLayer) for m in model.modules())
    assert dt.adapter_names(model) == []
    with torch.no_grad():
        assert torch.equal(run(model, x), base)


def test_duplicate_adapter_name_and_config_objects() -> None:
    model = combined()
    with pytest.raises(dt.ConfigError, match="adapter 'default' already exists"):
        dt.inject(model, combo())
    # Parts may be given as config objects; they are stored as their dicts (JSON-ready).
    cfg = dt.CombineConfig(methods=[dt.LoraConfig(r=2, target_modules=["query"])])  # type: ignore[list-item]
    assert cfg.methods[0]["name"] == "lora" and cfg.methods[0]["r"] == 2
    assert dt.config_from_dict({"name": "combine", **cfg.to_dict()}) == cfg


def test_run_config_builds_the_combination() -> None:
    from deltatune.run import RunConfig

    cfg = RunConfig.from_file(Path(__file__).parents[1] / "configs" / "combine.yaml")
    method = cfg.method_config()
    assert isinstance(method, dt.CombineConfig)
    assert [p.method_name for p in method.parts()] == ["lora", "pfeiffer"]


def test_export_parts_expands_all_linear_to_the_parts_own_modules(tmp_path: Path) -> None:
    model = make_bert()
    cfg = dt.CombineConfig(
        methods=[
            {"name": "lora", "r": 2, "target_modules": "all-linear", "exclude_modules": ["key"]},
            {"name": "ia3", "target_modules": ["key"], "feedforward_modules": []},
        ],
        task_type="SEQ_CLS",
    )
    dt.inject(model, cfg)
    lora_dir, ia3_dir = dt.export_parts(model, tmp_path)
    lora = dt.read_adapter_config(lora_dir)
    assert isinstance(lora, dt.LoraConfig) and isinstance(lora.target_modules, list)
    # query, value, attention.output.dense, intermediate.dense, output.dense in 2 blocks + pooler
    assert len(lora.target_modules) == 11
    assert not any(n.endswith(("key", "classifier")) for n in lora.target_modules)
    ia3 = dt.read_adapter_config(ia3_dir)
    assert isinstance(ia3, dt.IA3Config) and ia3.target_modules == ["key"]
    fresh = make_bert()
    dt.load_adapter(fresh, lora_dir)
    dt.load_adapter(fresh, ia3_dir, "ia3")


def test_cli_train_eval_merge_on_a_tiny_local_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`deltatune train` with method: combine writes one adapter folder; eval reloads it
    exactly; merge refuses (Pfeiffer) naming the part."""
    import csv
    import json
    import random

    import yaml
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    from deltatune.cli import main
    from deltatune.run import evaluate_run

    words, filler = ["alpha", "bravo", "charlie"], [f"w{i}" for i in range(20)]
    model_dir = tmp_path / "tiny-bert"
    tok = BertTokenizer(
        vocab={
            t: i
            for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *filler])
        }
    )
    tok.save_pretrained(model_dir)
    torch.manual_seed(0)
    BertForSequenceClassification(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).save_pretrained(model_dir)
    rng = random.Random(0)
    data = tmp_path / "topics.csv"
    with data.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(90):
            row = [rng.choice(filler) for _ in range(6)] + [words[i % 3]] * 3
            rng.shuffle(row)
            writer.writerow([" ".join(row), words[i % 3]])
    config = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"source": str(data), "max_length": 16},
        "method": {"name": "combine", "methods": [LORA, PFEIFFER]},
        "train": {"epochs": 2, "batch_size": 16, "progress": False, "device": "cpu"},
        "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # LoRA 1024 + Pfeiffer 584 + head (32 * 3 + 3) = 1707, as on the tiny test BERT.
    assert metrics["method"] == "combine" and metrics["trainable_params"] == 1707
    assert dt.read_adapter_config(run_dir).method_name == "combine"
    assert evaluate_run(run_dir, []) == pytest.approx(metrics["test"], abs=1e-6)
    capsys.readouterr()
    assert main(["merge", str(run_dir), str(tmp_path / "merged")]) != 0
    assert r"part methods[1] (pfeiffer) cannot be merged" in capsys.readouterr().err


@pytest.mark.parametrize(
    "second",
    [
        {"name": "houlsby", "bottleneck_size": 4},
        {"name": "parallel_adapter", "bottleneck_size": 4},
        {"name": "bitfit", "target_modules": ["intermediate.dense"]},
        {"name": "ia3", "target_modules": ["key"], "feedforward_modules": []},
    ],
    ids=lambda p: p["name"],
)
def test_every_part_method_trains_saves_and_loads(
    second: dict[str, object], tmp_path: Path
) -> None:
    x = text_inputs()
    first = {"name": "lora", "r": 4, "target_modules": ["query"]}
    model = make_bert()
    dt.inject(model, dt.CombineConfig(methods=[first, second], task_type="SEQ_CLS"))
    # Trainable = each part alone (no head) + the classifier copy (99).
    alone = 0
    for part in (first, second):
        m = make_bert()
        dt.inject(m, dt.config_from_dict(part))
        alone += dt.trainable_report(m).trainable
    assert dt.trainable_report(model).trainable == alone + 99
    perturb(model)
    with torch.no_grad():
        out = run(model, x)
        assert (out - run(make_bert(), x)).abs().max() > 1e-3
    dt.save_adapter(model, tmp_path)
    fresh = make_bert()
    dt.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(run(fresh, x), out)
