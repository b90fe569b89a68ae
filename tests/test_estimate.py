"""``deltatune estimate``: the fake-tensor estimate against real steps on tiny random models."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

from deltatune.cli import main
from deltatune.errors import ConfigError
from deltatune.estimate import (
    build_real,
    estimate,
    max_batch_size,
    measure_step,
    optimizer_state_bytes,
    real_batch,
)
from deltatune.memory import count_saved, model_storages, unique_bytes

BERT = {
    "model_type": "bert",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "vocab_size": 1000,
    "num_labels": 3,
}
LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 1000,
    "architectures": ["LlamaForCausalLM"],
}
CPU = torch.device("cpu")

CASES: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = [
    ("bert-full", BERT, None),
    (
        "bert-lora-all-dropout",
        BERT,
        {"name": "lora", "r": 4, "target_modules": "all-linear", "lora_dropout": 0.1},
    ),
    ("bert-ia3", BERT, {"name": "ia3"}),
    ("bert-prefix", BERT, {"name": "prefix_tuning", "num_virtual_tokens": 10}),
    ("bert-houlsby", BERT, {"name": "houlsby"}),
    ("bert-bitfit", BERT, {"name": "bitfit"}),
    # int8 here; NF4 is checked against measure_step below.
    ("bert-qlora-int8", BERT, {"name": "qlora", "r": 4, "quantize": "int8"}),
    ("llama-full", LLAMA, None),
    ("llama-lora", LLAMA, {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}),
    ("llama-prompt", LLAMA, {"name": "prompt_tuning", "num_virtual_tokens": 10}),
    ("llama-pfeiffer", LLAMA, {"name": "pfeiffer"}),
]


def _reference_counted(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str
) -> dict[str, int]:
    """Counted peak of one real step written with deltatune.memory alone (after a warm-up step
    that creates AdamW's state): weights + grads + optimizer state + saved activations."""
    from deltatune.estimate import task_loss

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    task_loss(model, batch, task).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    with count_saved(model_storages(model)) as seen:
        loss = task_loss(model, batch, task)
    loss.backward()
    grads = unique_bytes([p.grad for p in trainable if p.grad is not None])
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    weights = unique_bytes([*model.parameters(), *model.buffers()])
    return {
        "activations": sum(seen.values()),
        "counted": weights + grads + unique_bytes(state) + sum(seen.values()),
    }


@pytest.mark.parametrize(("name", "config", "method"), CASES, ids=[c[0] for c in CASES])
def test_estimate_matches_a_real_step(name: str, config: dict[str, Any], method: Any) -> None:
    est = estimate(config, method, batch_size=4, seq_len=32, device="cpu")
    torch.manual_seed(0)
    real, task, vocab = build_real(config, method, device="cpu")
    batch = real_batch(task, 4, 32, vocab, CPU)
    reference = _reference_counted(real, batch, task)
    # The saved activations are what autograd keeps: the trace must find the same tensors.
    assert est.activations == pytest.approx(reference["activations"], rel=0.01)
    assert est.counted_peak == pytest.approx(reference["counted"], rel=0.01)
    measured = measure_step(real, batch, task=task)
    assert abs(est.peak - measured.allocator_peak) <= 0.10 * measured.allocator_peak, (
        f"{name}: estimated peak {est.peak} vs measured {measured.allocator_peak}"
    )


def test_qlora_nf4_matches_a_real_step() -> None:
    method = {"name": "qlora", "r": 4}
    est = estimate(LLAMA, method, batch_size=4, seq_len=32, device="cpu")
    real, task, vocab = build_real(LLAMA, method, device="cpu")
    measured = measure_step(real, real_batch(task, 4, 32, vocab, CPU), task=task)
    assert est.weights == measured.weights  # codes, constants and the float embeddings
    assert est.activations == pytest.approx(measured.activations, rel=0.01)
    assert abs(est.peak - measured.allocator_peak) <= 0.10 * measured.allocator_peak


def test_breakdown_adds_up_and_scales_with_the_batch() -> None:
    method = {"name": "lora", "r": 4}
    small = estimate(BERT, method, batch_size=2, seq_len=32, device="cpu")
    large = estimate(BERT, method, batch_size=8, seq_len=32, device="cpu")
    assert small.counted_peak == (
        small.weights + small.adapter + small.gradients + small.optimizer_state + small.activations
    )
    assert small.peak == small.counted_peak + small.transient
    # Weights, adapter, gradients and optimizer state do not depend on the batch.
    for field in ("weights", "adapter", "gradients", "optimizer_state"):
        assert getattr(small, field) == getattr(large, field)
    # Every matmul has the batch as a factor: FLOPs are linear in it.
    assert large.flops_per_step == pytest.approx(4 * small.flops_per_step, rel=1e-6)
    assert large.activations > 3 * small.activations
    # LoRA's trainable tensors: AdamW keeps two moments like each, plus a step scalar.
    assert small.optimizer_state == 2 * small.adapter + 4 * _count_trainable_tensors(method)


def _count_trainable_tensors(method: dict[str, Any]) -> int:
    real, _, _ = build_real(BERT, method, device="cpu")
    return sum(1 for p in real.parameters() if p.requires_grad)


def test_flops_follow_the_matmul_formula() -> None:
    """Forward FLOPs of full fine-tuning: 2·(tokens)·(in·out) for every linear layer, plus
    the attention (2 matmuls of 2·S·S·d per head) and the classifier on the pooled token."""
    b, s, h, f, layers = 2, 16, BERT["hidden_size"], BERT["intermediate_size"], 2
    est = estimate(BERT, None, batch_size=b, seq_len=s, device="cpu")
    tokens = b * s
    per_layer = 2 * tokens * (4 * h * h + 2 * h * f) + 2 * (2 * b * s * s * h)
    head = 2 * b * (h * h + h * BERT["num_labels"])  # pooler + classifier
    assert est.forward_flops == pytest.approx(layers * per_layer + head, rel=1e-6)
    # Full fine-tuning: backward computes input and weight gradients, ~2x the forward.
    assert (
        1.8 * est.forward_flops < est.flops_per_step - est.forward_flops < 2.2 * est.forward_flops
    )


def test_method_specifics_prefix_length_and_nf4_weights() -> None:
    prefix = estimate(
        BERT,
        {"name": "prefix_tuning", "num_virtual_tokens": 10},
        batch_size=2,
        seq_len=32,
        device="cpu",
    )
    assert prefix.attention_len == 42
    float_lora = estimate(
        LLAMA,
        {"name": "lora", "r": 4, "target_modules": "all-linear"},
        device="cpu",
        batch_size=1,
        seq_len=8,
    )
    qlora = estimate(LLAMA, {"name": "qlora", "r": 4}, device="cpu", batch_size=1, seq_len=8)
    h, f, layers = 64, 128, 2
    kv = 32  # 2 key/value heads of 16
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * f)
    # NF4: 4 bits + one int8 constant per 64 weights ≈ 0.516 B/weight, plus fp32 factors
    # that weigh more on these tiny 64-wide layers (torchao keeps a lone factor as a view of
    # a per-block buffer): between 0.5 and 0.6 bytes per weight instead of 4.
    bytes_per_weight = 4.0 - (float_lora.weights - qlora.weights) / linear
    assert 0.5 < bytes_per_weight < 0.6
    assert qlora.adapter == float_lora.adapter


def test_optimizer_state_formulas() -> None:
    shapes = [(10_000, 4), (100, 4)]
    assert optimizer_state_bytes(shapes, "adamw") == 2 * 10_100 * 4 + 2 * 4
    assert optimizer_state_bytes(shapes, "sgd") == 0
    assert optimizer_state_bytes(shapes, "sgd_momentum") == 10_100 * 4
    # 8-bit: 1 byte per moment element and an fp32 absmax per 256 for the large tensor only.
    expected = 2 * (10_000 + 4 * math.ceil(10_000 / 256)) + 4 + 2 * 100 * 4 + 4
    assert optimizer_state_bytes(shapes, "paged_adamw_8bit") == expected


def test_max_batch_size_is_the_largest_that_fits() -> None:
    method = {"name": "lora", "r": 4}
    one = estimate(BERT, method, batch_size=1, seq_len=32, device="cpu").peak
    budget = one + 5 * (estimate(BERT, method, batch_size=2, seq_len=32, device="cpu").peak - one)
    best = max_batch_size(BERT, method, budget, seq_len=32, device="cpu")
    assert best >= 5
    assert estimate(BERT, method, batch_size=best, seq_len=32, device="cpu").peak <= budget
    assert estimate(BERT, method, batch_size=best + 1, seq_len=32, device="cpu").peak > budget
    more = max_batch_size(BERT, method, 2 * budget, seq_len=32, device="cpu")
    assert more >= best
    assert max_batch_size(BERT, method, one - 1, seq_len=32, device="cpu") == 0


def test_live_module_is_estimated_as_it_is() -> None:
    method = {"name": "lora", "r": 4}
    real, _, _ = build_real(BERT, method, device="cpu")
    from_module = estimate(real, None, batch_size=2, seq_len=16, device="cpu")
    from_config = estimate(BERT, method, batch_size=2, seq_len=16, device="cpu")
    assert from_module.method == "as given"
    for field in ("weights", "adapter", "activations", "peak", "flops_per_step"):
        assert getattr(from_module, field) == getattr(from_config, field)
    # The live model's weights were not touched (the estimate works on a meta copy).
    assert all(p.device.type == "cpu" for p in real.parameters())


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"seq_len": -1}, "seq_len=-1"),
        ({"dtype": "float64"}, "dtype='float64'"),
        ({"quantize": "nf3"}, "quantize='nf3'"),
        ({"optimizer": "adam"}, "did you mean 'adamw'"),
        ({"task_type": "translation"}, "task_type='translation'"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        estimate(BERT, {"name": "lora"}, **kwargs)


def test_bad_method_and_model_errors() -> None:
    with pytest.raises(ConfigError, match="unknown method 'lorra'; did you mean 'lora'"):
        estimate(BERT, {"name": "lorra"})
    with pytest.raises(ConfigError, match="missing 'name'"):
        estimate(BERT, {"r": 8})
    with pytest.raises(ConfigError, match="needs 'model_type'"):
        estimate({"hidden_size": 8}, None)
    with pytest.raises(ConfigError, match="is not a folder"):
        estimate("./no/such/model", None)
    with pytest.raises(ConfigError, match="freezes the linear weights"):
        estimate(BERT, None, quantize="nf4")


def _folder(tmp_path: Any, config: dict[str, Any]) -> str:
    from transformers import AutoConfig

    data = dict(config)
    AutoConfig.for_model(data.pop("model_type"), **data).save_pretrained(tmp_path)
    return str(tmp_path)


def test_cli_json_and_fit(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _folder(tmp_path, BERT)
    rc = main(
        [
            "estimate",
            "--model",
            folder,
            "--method",
            "lora",
            "method.r=4",
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--device",
            "cpu",
            "--fit-gib",
            "0.01",
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    est = out["estimate"]
    assert est["method"] == "lora" and est["batch_size"] == 4 and est["seq_len"] == 32
    direct = estimate(folder, {"name": "lora", "r": 4}, batch_size=4, seq_len=32, device="cpu")
    assert est["peak"] == direct.peak
    fit = out["fit"]["max_batch_size"]
    assert fit == max_batch_size(
        folder, {"name": "lora", "r": 4}, int(0.01 * 2**30), seq_len=32, device="cpu"
    )


def test_cli_table_and_errors(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _folder(tmp_path, LLAMA)
    assert (
        main(
            [
                "estimate",
                "--model",
                folder,
                "--method",
                "ia3",
                "--seq-len",
                "16",
                "--batch-size",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    for row in (
        "weights (frozen)",
        "adapter (trainable)",
        "gradients",
        "optimizer state",
        "activations",
        "peak",
        "FLOPs per step",
        "step time",
    ):
        assert row in text
    assert main(["estimate", "--model", folder, "--method", "lorra"]) == 2
    assert "unknown method 'lorra'" in capsys.readouterr().err
    assert main(["estimate", "--model", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["estimate", "--model", folder, "train.epochs=3"]) == 2
    assert "only method.<key>=value" in capsys.readouterr().err


def test_max_batch_size_needs_three_traces_when_the_peak_is_affine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Batch 1 and 2 predict the answer and one trace at it verifies it (LoRA on BERT is
    exactly affine in the batch); the answer is the one estimate() agrees with."""
    import deltatune.estimate as module

    method = {"name": "lora", "r": 4, "target_modules": "all-linear"}
    kw: dict[str, Any] = {"seq_len": 24, "device": "cpu"}
    one = estimate(BERT, method, batch_size=1, **kw).peak
    slope = estimate(BERT, method, batch_size=2, **kw).peak - one
    budget = one + 40 * slope + slope // 2  # 41 fits, 42 does not
    module._MEMO.clear()
    probed: list[int] = []
    real_trace = module._trace_step

    def counting_trace(*args: Any, **kwargs: Any) -> Any:
        probed.append(kwargs["batch_size"])
        return real_trace(*args, **kwargs)

    monkeypatch.setattr(module, "_trace_step", counting_trace)
    best = max_batch_size(BERT, method, budget, **kw)
    assert probed == [1, 2, 41]
    assert best == 41
    assert estimate(BERT, method, batch_size=41, **kw).peak <= budget
    assert estimate(BERT, method, batch_size=42, **kw).peak > budget


def test_max_batch_size_searches_when_the_prediction_is_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peak that is not affine (here: a step function added to the real estimate) makes the
    verification disagree; the bracketed search still ends on two adjacent traced batches."""
    import deltatune.estimate as module

    method = {"name": "lora", "r": 4}
    kw: dict[str, Any] = {"seq_len": 24, "device": "cpu"}
    one = estimate(BERT, method, batch_size=1, **kw).peak
    slope = estimate(BERT, method, batch_size=2, **kw).peak - one
    real_estimate = module.estimate
    module._MEMO.clear()  # every probe goes through the bumpy estimate below

    def bumpy(model: Any, m: Any, **kwargs: Any) -> Any:
        est = real_estimate(model, m, **kwargs)
        b = kwargs["batch_size"]
        est.peak += (b >= 10) * 6 * slope + (b * b % 7) * (slope // 10)  # a jump, then noise
        return est

    monkeypatch.setattr(module, "estimate", bumpy)
    budget = one + 30 * slope
    best = max_batch_size(BERT, method, budget, **kw)
    assert bumpy(BERT, method, batch_size=best, **kw).peak <= budget
    assert bumpy(BERT, method, batch_size=best + 1, **kw).peak > budget


def test_qlora_counts_the_quantised_weights_as_parameters() -> None:
    """Totals match the float model (a quantised layer stands for in x out weights), and so
    does the trainable percentage."""
    lora = {"name": "lora", "r": 4, "target_modules": "all-linear"}
    float_model = estimate(BERT, lora, batch_size=1, seq_len=8, device="cpu")
    full = estimate(BERT, None, batch_size=1, seq_len=8, device="cpu")
    qlora = estimate(
        BERT,
        {"name": "qlora", "r": 4, "target_modules": "all-linear"},
        batch_size=1,
        seq_len=8,
        device="cpu",
    )
    assert qlora.total_params == float_model.total_params
    assert qlora.trainable_params == float_model.trainable_params
    # The float base is all there: every weight of the full model, plus LoRA's matrices.
    assert qlora.total_params > full.total_params == _real_params()


def _real_params() -> int:
    torch.manual_seed(0)
    real, _, _ = build_real(BERT, None, device="cpu")
    return sum(p.numel() for p in real.parameters())


def test_qlora_on_a_config_only_bert_folder(tmp_path: Any) -> None:
    """A BERT folder with only config.json: QLoRA on every linear layer is estimated (the
    quantised layers are linear layers for ``all-linear``), with NF4 weights."""
    folder = _folder(tmp_path, {**BERT, "architectures": ["BertForSequenceClassification"]})
    method = {"name": "qlora", "r": 4, "target_modules": "all-linear", "quantize": "nf4"}
    est = estimate(folder, method, batch_size=2, seq_len=16, device="cpu")
    lora_method = {"name": "lora", "r": 4, "target_modules": "all-linear"}
    lora = estimate(folder, lora_method, batch_size=2, seq_len=16, device="cpu")
    assert est.method == "qlora" and est.quantize == "nf4"
    assert est.trainable_params == lora.trainable_params
    assert est.weights < lora.weights


def test_table_explains_the_sign_of_the_adjustment() -> None:
    """Full fine-tuning's peak is below the sum of its parts (early activations are freed
    before the last gradients exist); LoRA's is above (transient buffers). Neither prints a
    bare negative 'transient'."""
    full = estimate(BERT, None, batch_size=4, seq_len=32, device="cpu")
    lora = estimate(BERT, {"name": "lora", "r": 4}, batch_size=4, seq_len=32, device="cpu")
    assert full.peak == full.counted_peak + full.transient
    for est in (full, lora):
        text = est.table()
        assert "sum of the above" in text
        assert "transient -" not in text
        sign = "+" if est.transient >= 0 else "-"
        adjustment = next(line for line in text.splitlines() if "at the peak:" in line)
        assert adjustment.split()[0] == sign
        expected = "transient buffers on top" if est.transient >= 0 else "peak < sum"
        assert expected in adjustment


def test_step_time_adds_a_memory_traffic_term() -> None:
    """Step time = FLOPs / matmul throughput + traffic / bandwidth. The traffic is affine in
    the batch (the optimizer's update is constant, every activation op scales with it), and
    AdamW moves at least 7 more bytes per weight byte than plain SGD: it reads the gradient
    and both moments and writes both moments again, where SGD touches only weight and grad."""
    kw: dict[str, Any] = {"seq_len": 16, "device": "cpu"}
    at = {b: estimate(BERT, None, batch_size=b, **kw) for b in (2, 4, 8)}
    e = at[2]
    assert e.memory_traffic > 0 and e.device_bytes_per_s > 0
    assert e.step_time_s == pytest.approx(
        e.flops_per_step / e.device_flops_per_s + e.memory_traffic / e.device_bytes_per_s
    )
    assert at[8].memory_traffic - at[2].memory_traffic == 3 * (
        at[4].memory_traffic - at[2].memory_traffic
    )
    sgd = estimate(BERT, None, batch_size=2, optimizer="sgd", **kw)
    weight_bytes = 4 * e.trainable_params
    assert e.memory_traffic - sgd.memory_traffic >= 7 * weight_bytes
    assert "+ other ops" in e.table()
