"""Adapters move both ways between deltatune and Hugging Face PEFT (0.21.2, test-only).

For each LoRA variant: deltatune save -> ``peft.PeftModel.from_pretrained`` gives the same
outputs, and ``peft.get_peft_model(...).save_pretrained`` -> ``deltatune.load_adapter(s)`` gives
the same outputs. Both sides use ``init_lora_weights=False`` and then perturb every trainable
tensor (B, DoRA magnitudes, ``modules_to_save`` copies), so the outputs differ from the base.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from conftest import MODELS, make_bert, run, text_inputs
from deltatune.checkpoint import CONFIG_NAME, WEIGHTS_NAME

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

TOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Variant:
    id: str
    model: str
    options: dict[str, Any]
    adapter_name: str = "default"


SEQ = {"task_type": "SEQ_CLS"}
VARIANTS = [
    Variant("bert-qv", "bert", {**SEQ, "target_modules": ["query", "value"]}),
    Variant("bert-all-linear", "bert", {**SEQ, "target_modules": "all-linear"}),
    Variant("bert-dora", "bert", {**SEQ, "target_modules": ["query", "value"], "use_dora": True}),
    Variant(
        "bert-rslora",
        "bert",
        {**SEQ, "target_modules": ["query", "key", "value"], "use_rslora": True, "lora_alpha": 12},
    ),
    Variant(
        "bert-patterns",
        "bert",
        {
            **SEQ,
            "target_modules": ["query", "value", "dense"],
            "rank_pattern": {"query": 2, "bert.encoder.layer.1.output.dense": 6},
            "alpha_pattern": {"value": 3},
        },
    ),
    Variant("llama-qv", "llama", {"target_modules": ["q_proj", "v_proj"]}),
    Variant("llama-all-linear", "llama", {"target_modules": "all-linear"}),
    Variant("llama-dora", "llama", {"target_modules": ["q_proj", "v_proj"], "use_dora": True}),
    Variant(
        "llama-modules-to-save",
        "llama",
        {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]},
    ),
    Variant("llama-embedding", "llama", {"target_modules": ["embed_tokens", "q_proj"]}),
    Variant("llama-named", "llama", {"target_modules": ["q_proj", "k_proj"]}, adapter_name="extra"),
    Variant("gpt2-c_attn", "gpt2", {"target_modules": ["c_attn"]}),
    Variant("gpt2-all-linear-dora", "gpt2", {"target_modules": "all-linear", "use_dora": True}),
]


def options(variant: Variant) -> dict[str, Any]:
    return {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **variant.options}


def perturb_trainable(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def adapter_dir(root: Path, name: str) -> Path:
    return root if name == "default" else root / name


def deltatune_adapter(variant: Variant, out_dir: Path) -> torch.Tensor:
    """Train-like deltatune adapter saved to ``out_dir``; returns its output."""
    model = MODELS[variant.model]()
    torch.manual_seed(0)
    dt.inject(model, dt.LoraConfig(**options(variant)), variant.adapter_name)
    perturb_trainable(model, seed=3)
    dt.save_adapters(model, out_dir)
    with torch.no_grad():
        return run(model, text_inputs())


def peft_adapter(variant: Variant, out_dir: Path) -> torch.Tensor:
    """The same adapter made and saved by PEFT; returns its output."""
    base = MODELS[variant.model]()
    torch.manual_seed(0)
    pm = peft.get_peft_model(
        base, peft.LoraConfig(**options(variant)), adapter_name=variant.adapter_name
    )
    perturb_trainable(pm, seed=4)
    pm.eval()
    pm.save_pretrained(str(out_dir))
    with torch.no_grad():
        return run(pm, text_inputs())


@pytest.fixture(params=VARIANTS, ids=[v.id for v in VARIANTS])
def variant(request: pytest.FixtureRequest) -> Variant:
    return request.param


def base_output(variant: Variant) -> torch.Tensor:
    with torch.no_grad():
        return run(MODELS[variant.model](), text_inputs())


def test_deltatune_to_peft(variant: Variant, tmp_path: Path) -> None:
    out = deltatune_adapter(variant, tmp_path)
    assert maxdiff(out, base_output(variant)) > 1e-3
    folder = adapter_dir(tmp_path, variant.adapter_name)
    assert (folder / CONFIG_NAME).is_file()
    pm = peft.PeftModel.from_pretrained(
        MODELS[variant.model](), str(folder), adapter_name=variant.adapter_name
    )
    pm.eval()
    with torch.no_grad():
        assert maxdiff(run(pm, text_inputs()), out) <= TOL


def test_peft_to_deltatune(variant: Variant, tmp_path: Path) -> None:
    out = peft_adapter(variant, tmp_path)
    assert maxdiff(out, base_output(variant)) > 1e-3
    model = MODELS[variant.model]()
    assert dt.load_adapters(model, tmp_path) == [variant.adapter_name]
    with torch.no_grad():
        assert maxdiff(run(model, text_inputs()), out) <= TOL


def test_same_tensor_keys_and_shapes(variant: Variant, tmp_path: Path) -> None:
    deltatune_adapter(variant, tmp_path / "dt")
    peft_adapter(variant, tmp_path / "peft")
    ours = load_file(adapter_dir(tmp_path / "dt", variant.adapter_name) / WEIGHTS_NAME)
    theirs = load_file(adapter_dir(tmp_path / "peft", variant.adapter_name) / WEIGHTS_NAME)
    # PEFT also stores the whole base embedding next to an Embedding LoRA; we do not need it.
    theirs = {k: v for k, v in theirs.items() if not k.endswith(".base_layer.weight")}
    assert sorted(ours) == sorted(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


# --- adapter_config.json fields -------------------------------------------------------------

QV = Variant("bert-qv", "bert", {**SEQ, "target_modules": ["query", "value"]})


def _edit_config(folder: Path, **changes: Any) -> None:
    path = folder / CONFIG_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("use_bdlora", True),
        ("lora_bias", True),
        ("use_qalora", True),
        ("layer_replication", [[0, 1], [0, 1]]),
        ("trainable_token_indices", [1, 2]),
    ],
)
def test_unsupported_peft_feature_is_refused(field: str, value: Any, tmp_path: Path) -> None:
    peft_adapter(QV, tmp_path)
    _edit_config(tmp_path, **{field: value})
    model = make_bert()
    with pytest.raises(dt.CheckpointError, match=field) as err:
        dt.load_adapter(model, tmp_path)
    assert "\n" not in str(err.value)
    assert not any(isinstance(m, dt.AdapterLayer) for m in model.modules())
    assert dt.adapter_names(model) == []


def test_unknown_fields_at_defaults_are_accepted(tmp_path: Path) -> None:
    out = peft_adapter(QV, tmp_path)
    _edit_config(
        tmp_path,
        some_future_config=None,
        use_some_future_trick=False,
        future_list=[],
        future_mapping={},
        use_bdlora=None,
        lora_bias=False,
    )
    model = make_bert()
    dt.load_adapter(model, tmp_path)
    with torch.no_grad():
        assert maxdiff(run(model, text_inputs()), out) <= TOL


def test_unknown_peft_type_is_refused(tmp_path: Path) -> None:
    peft_adapter(QV, tmp_path)
    _edit_config(tmp_path, peft_type="VERA")
    with pytest.raises(dt.CheckpointError, match="VERA"):
        dt.load_adapter(make_bert(), tmp_path)


def test_saved_config_reads_in_peft(tmp_path: Path) -> None:
    """Our adapter_config.json is a valid PEFT config with the expanded all-linear targets."""
    variant = Variant("bert-all-linear", "bert", {**SEQ, "target_modules": "all-linear"})
    deltatune_adapter(variant, tmp_path)
    cfg = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert cfg.peft_type == peft.PeftType.LORA
    assert cfg.r == 4 and cfg.lora_alpha == 8
    targets = set(cfg.target_modules)
    assert "bert.encoder.layer.0.attention.self.query" in targets
    assert "bert.pooler.dense" in targets
    assert not any(t.startswith("classifier") for t in targets)
    assert set(cfg.modules_to_save) >= {"classifier"}
