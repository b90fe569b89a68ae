"""Bad input through the Python API: clear one-line errors, and nothing half-done is left behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import make_bert, make_llama, run, text_inputs
from deltatune.checkpoint import CONFIG_NAME, WEIGHTS_NAME


def one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


def pristine(model: nn.Module) -> None:
    """No adapter wrapper, no recorded adapter, every parameter trainable as built."""
    assert not any(isinstance(m, dt.AdapterLayer) for m in model.modules())
    assert dt.adapter_names(model) == []
    assert all(p.requires_grad for p in model.parameters())
    assert list(model.state_dict()) == list(make_bert().state_dict())


def saved_lora(tmp_path: Path, **options: Any) -> tuple[Path, torch.Tensor]:
    model = make_bert()
    cfg = dt.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False, **options)
    dt.inject(model, cfg)
    folder = tmp_path / "adapter"
    dt.save_adapter(model, folder)
    with torch.no_grad():
        return folder, run(model, text_inputs())


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / CONFIG_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# --- configs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "nearest"), [("lorra", "lora"), ("bitfitt", "bitfit"), ("freze", "freeze")]
)
def test_unknown_method_suggests_nearest(name: str, nearest: str) -> None:
    with pytest.raises(dt.ConfigError) as err:
        dt.config_from_dict({"name": name, "r": 4})
    msg = one_line(err)
    assert f"'{name}'" in msg and f"did you mean '{nearest}'" in msg
    with pytest.raises(dt.ConfigError, match=f"did you mean '{nearest}'"):
        dt.get_method(name)


def test_method_name_missing() -> None:
    with pytest.raises(dt.ConfigError) as err:
        dt.config_from_dict({"r": 4})
    assert "name" in one_line(err)


@pytest.mark.parametrize(
    ("data", "key", "nearest"),
    [
        ({"name": "lora", "lora_alpah": 8}, "lora_alpah", "lora_alpha"),
        ({"name": "lora", "target_module": ["query"]}, "target_module", "target_modules"),
        ({"name": "freeze", "train_last": 1}, "train_last", "train_last_n"),
        ({"name": "bitfit", "exclude_module": ["x"]}, "exclude_module", "exclude_modules"),
    ],
)
def test_unknown_config_key_suggests_nearest(data: dict[str, Any], key: str, nearest: str) -> None:
    with pytest.raises(dt.ConfigError) as err:
        dt.config_from_dict(data)
    msg = one_line(err)
    assert f"'{key}'" in msg and f"did you mean '{nearest}'" in msg


def test_unknown_key_in_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "lora.yaml"
    path.write_text("r: 4\nlora_dropuot: 0.1\n")
    with pytest.raises(dt.ConfigError) as err:
        dt.LoraConfig.from_file(path)
    msg = one_line(err)
    assert "lora_dropuot" in msg and "did you mean 'lora_dropout'" in msg and "lora.yaml" in msg


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"r": "eight"}, ["r", "'eight'", "integer"]),
        ({"r": 0}, ["r=0", "positive"]),
        ({"lora_dropout": 1.5}, ["lora_dropout=1.5"]),
        ({"use_dora": "maybe"}, ["use_dora", "'maybe'", "boolean"]),
        ({"bias": "all"}, ["bias", "'all'"]),
    ],
)
def test_bad_lora_values_name_field_and_value(data: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(dt.ConfigError) as err:
        dt.config_from_dict({"name": "lora", **data})
    msg = one_line(err)
    for w in words:
        assert w in msg, (w, msg)


def test_freeze_needs_exactly_one_choice() -> None:
    with pytest.raises(dt.ConfigError) as err:
        dt.FreezeConfig(train_last_n=1, freeze_first_n=1).validate()
    assert "exactly one" in one_line(err)


def test_inject_needs_a_method_config() -> None:
    model = make_bert()
    with pytest.raises(dt.ConfigError, match="method config"):
        dt.inject(model, {"name": "lora"})  # type: ignore[arg-type]
    pristine(model)


# --- targets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [["qury"], r"bert\.encoder\.layer\.\d\.attention\.selff\.query", ["query.weight"]],
)
def test_target_matching_nothing_names_the_pattern(target: Any) -> None:
    model = make_bert()
    with pytest.raises(dt.ConfigError) as err:
        dt.inject(model, dt.LoraConfig(target_modules=target))
    msg = one_line(err)
    assert repr(target) in msg
    assert "query" in msg  # lists module names that exist
    pristine(model)


def test_comma_separated_target_string_suggests_the_list_form() -> None:
    # `method.target_modules=query,value` on the CLI arrives as one string, which PEFT's rule
    # reads as a single regex; the error must say how to give two names.
    model = make_bert()
    with pytest.raises(dt.ConfigError) as err:
        dt.inject(model, dt.LoraConfig(target_modules="query,value"))
    assert "target_modules=[query,value]" in one_line(err)
    pristine(model)


def test_lora_target_inside_another_methods_wrapper_is_refused_not_skipped() -> None:
    # Prefix tuning wraps whole attention modules; LoRA on q/v afterwards would sit inside that
    # wrapper, so the error says to inject in the other order (it used to skip them silently).
    model = make_bert()
    dt.inject(model, dt.PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=False), "p")
    before = {n for n, _ in model.named_parameters()}
    with pytest.raises(dt.ConfigError) as err:
        dt.inject(model, dt.LoraConfig(r=2, target_modules=["query", "value"]), "lo")
    msg = one_line(err)
    assert "query" in msg and "p (prefix_tuning)" in msg and "inject lora first" in msg
    assert {n for n, _ in model.named_parameters()} == before
    # the other order works: every query and value gets LoRA
    model = make_bert()
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["query", "value"]), "lo")
    dt.inject(model, dt.PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=False), "p")
    n_layers = model.config.num_hidden_layers
    assert (
        sum(1 for n, _ in model.named_parameters() if n.endswith("lora_A.lo.weight"))
        == 2 * n_layers
    )


def test_lora_on_layernorm_is_refused_without_half_injection() -> None:
    model = make_bert()
    # 'query' of layer 0 comes before the first matching LayerNorm in module order.
    with pytest.raises(dt.ConfigError) as err:
        dt.inject(model, dt.LoraConfig(target_modules=["query", "attention.output.LayerNorm"]))
    msg = one_line(err)
    assert "LayerNorm" in msg and "bert.encoder.layer.0.attention.output.LayerNorm" in msg
    pristine(model)


def test_failed_second_adapter_keeps_the_first() -> None:
    model = make_bert()
    dt.inject(model, dt.LoraConfig(r=4, target_modules=["query"], init_lora_weights=False))
    x = text_inputs()
    with torch.no_grad():
        out = run(model, x)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(dt.ConfigError):
        dt.inject(model, dt.LoraConfig(target_modules=["value", "LayerNorm"]), "second")
    assert dt.adapter_names(model) == ["default"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert not any("second" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(run(model, x), out)


def test_modules_to_save_matching_nothing() -> None:
    model = make_bert()
    with pytest.raises(dt.ConfigError) as err:
        dt.inject(model, dt.LoraConfig(target_modules=["query"], modules_to_save=["clasifier"]))
    assert "clasifier" in one_line(err)
    pristine(model)


def test_bitfit_on_a_model_without_biases() -> None:
    model = make_llama()
    with pytest.raises(dt.ConfigError) as err:
        dt.inject(model, dt.BitFitConfig())
    assert "bias" in one_line(err)
    assert dt.adapter_names(model) == []
    assert all(p.requires_grad for p in model.parameters())


def test_dora_on_embedding_is_refused() -> None:
    model = make_llama()
    with pytest.raises(dt.ConfigError) as err:
        dt.inject(model, dt.LoraConfig(target_modules=["embed_tokens"], use_dora=True))
    assert "use_dora" in one_line(err)
    assert not any(isinstance(m, dt.AdapterLayer) for m in model.modules())


def test_unknown_adapter_names() -> None:
    model = make_bert()
    dt.inject(model, dt.LoraConfig(target_modules=["query"]))
    for call in (dt.set_active, dt.delete):
        with pytest.raises(dt.ConfigError) as err:
            call(model, "nope")
        msg = one_line(err)
        assert "'nope'" in msg and "default" in msg
    with pytest.raises(dt.ConfigError, match="already exists"):
        dt.inject(model, dt.LoraConfig(target_modules=["query"]))
    with pytest.raises(dt.CheckpointError, match="'nope'"):
        dt.save_adapter(model, "/nonexistent/never-written", "nope")


def test_adapters_cannot_stack_on_in_place_training() -> None:
    model = make_bert()
    dt.inject(model, dt.FullConfig())
    with pytest.raises(dt.ConfigError) as err:
        dt.inject(model, dt.LoraConfig(target_modules=["query"]), "lora")
    assert "in place" in one_line(err)
    with pytest.raises(dt.DeltatuneError):
        dt.disable(model)


# --- loading adapters that do not fit -------------------------------------------------------


def test_missing_keys_are_listed_and_nothing_is_left(tmp_path: Path) -> None:
    folder, _ = saved_lora(tmp_path)
    edit_config(folder, target_modules=["query", "key", "value"])
    model = make_bert()
    with pytest.raises(dt.CheckpointError) as err:
        dt.load_adapter(model, folder)
    msg = one_line(err)
    assert "missing" in msg and "attention.self.key.lora_A.weight" in msg
    assert "unexpected" not in msg
    pristine(model)


def test_unexpected_keys_are_listed(tmp_path: Path) -> None:
    folder, _ = saved_lora(tmp_path)
    edit_config(folder, target_modules=["query"])
    model = make_bert()
    with pytest.raises(dt.CheckpointError) as err:
        dt.load_adapter(model, folder)
    msg = one_line(err)
    assert "unexpected" in msg and "attention.self.value.lora_B.weight" in msg
    pristine(model)


def test_shape_mismatch_is_listed(tmp_path: Path) -> None:
    folder, _ = saved_lora(tmp_path)
    edit_config(folder, r=8)
    model = make_bert()
    with pytest.raises(dt.CheckpointError) as err:
        dt.load_adapter(model, folder)
    msg = one_line(err)
    assert "shape mismatch" in msg and "(4, 32)" in msg and "(8, 32)" in msg
    pristine(model)


def test_adapter_of_another_model(tmp_path: Path) -> None:
    folder, _ = saved_lora(tmp_path)
    model = make_llama()
    with pytest.raises(dt.CheckpointError) as err:
        dt.load_adapter(model, folder)
    assert "query" in one_line(err)
    assert not any(isinstance(m, dt.AdapterLayer) for m in model.modules())
    assert dt.adapter_names(model) == []


def test_failed_load_keeps_existing_adapters(tmp_path: Path) -> None:
    folder, out = saved_lora(tmp_path)
    model = make_bert()
    dt.load_adapter(model, folder)
    edit_config(folder, r=8)
    with pytest.raises(dt.CheckpointError):
        dt.load_adapter(model, folder, "second")
    assert dt.adapter_names(model) == ["default"]
    with torch.no_grad():
        assert torch.equal(run(model, text_inputs()), out)


# --- broken files ---------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors(damage: str, tmp_path: Path) -> None:
    folder, _ = saved_lora(tmp_path)
    weights = folder / WEIGHTS_NAME
    data = weights.read_bytes()
    if damage == "garbage":
        weights.write_bytes(bytes(range(256)) * 8)
    elif damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.write_bytes(b"")
    model = make_bert()
    with pytest.raises(dt.CheckpointError) as err:
        dt.load_adapter(model, folder)
    assert WEIGHTS_NAME in one_line(err)
    pristine(model)


def test_corrupt_config_json(tmp_path: Path) -> None:
    folder, _ = saved_lora(tmp_path)
    (folder / CONFIG_NAME).write_text('{"peft_type": "LORA", "r": ')
    model = make_bert()
    with pytest.raises(dt.CheckpointError) as err:
        dt.load_adapter(model, folder)
    assert CONFIG_NAME in one_line(err)
    pristine(model)


def test_config_with_bad_value(tmp_path: Path) -> None:
    folder, _ = saved_lora(tmp_path)
    edit_config(folder, r="four")
    with pytest.raises(dt.CheckpointError) as err:
        dt.load_adapter(make_bert(), folder)
    assert "'four'" in one_line(err)


def test_missing_adapter_folder(tmp_path: Path) -> None:
    model = make_bert()
    for call in (dt.load_adapter, dt.load_adapters):
        with pytest.raises(dt.CheckpointError) as err:
            call(model, tmp_path / "does-not-exist")
        assert "does-not-exist" in one_line(err)
    pristine(model)


def test_folder_without_adapter(tmp_path: Path) -> None:
    with pytest.raises(dt.CheckpointError) as err:
        dt.load_adapters(make_bert(), tmp_path)
    assert CONFIG_NAME in one_line(err)


def test_missing_weights_file(tmp_path: Path) -> None:
    folder, _ = saved_lora(tmp_path)
    (folder / WEIGHTS_NAME).unlink()
    model = make_bert()
    with pytest.raises(dt.CheckpointError) as err:
        dt.load_adapter(model, folder)
    assert WEIGHTS_NAME in one_line(err)
    pristine(model)


def test_pickle_files_are_not_adapters(tmp_path: Path) -> None:
    """Only safetensors are read: a pickled checkpoint in place of the weights is refused."""
    folder, _ = saved_lora(tmp_path)
    torch.save({"x": torch.zeros(2)}, folder / WEIGHTS_NAME)
    with pytest.raises(dt.CheckpointError):
        dt.load_adapter(make_bert(), folder)
