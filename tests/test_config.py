"""BaseConfig: strict keys with suggestions, typed coercion, dotted overrides, JSON/YAML."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pytest
import yaml

from deltatune.config import BaseConfig, apply_overrides, parse_override
from deltatune.data import DataConfig
from deltatune.errors import ConfigError
from deltatune.train import TrainerConfig


@dataclasses.dataclass
class Inner(BaseConfig):
    epochs: int = 3
    learning_rate: float | None = None
    scheduler: Literal["cosine", "linear", "constant"] = "linear"

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs: value {self.epochs} must be >= 1")


@dataclasses.dataclass
class Outer(BaseConfig):
    name: str = "lora"
    lora_alpha: int = 8
    dropout: float = 0.0
    fan_in_fan_out: bool = False
    target_modules: list[str] = dataclasses.field(default_factory=lambda: ["query"])
    label: str | int = "x"
    layers: tuple[int, ...] = ()
    train: Inner = dataclasses.field(default_factory=Inner)


@dataclasses.dataclass
class Required(BaseConfig):
    path: str


# --------------------------------------------------------------------------- unknown keys


def test_unknown_key_suggests_nearest_and_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as info:
        Outer.from_dict({"lora_alpah": 16})
    msg = str(info.value)
    assert "unknown config key 'lora_alpah'" in msg
    assert "did you mean 'lora_alpha'?" in msg
    assert "valid keys: dropout, fan_in_fan_out, label, layers, lora_alpha" in msg


def test_unknown_key_without_close_match_has_no_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        Outer.from_dict({"zzzzzz": 1})
    assert "did you mean" not in str(info.value)
    assert "'zzzzzz' for Outer" in str(info.value)


def test_unknown_nested_key_names_its_section() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown config key 'epoch' in train; did you mean 'epochs'"
    ):
        Outer.from_dict({"train": {"epoch": 2}})


# --------------------------------------------------------------------------- types


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"lora_alpha": "lots"}, r"^lora_alpha: value 'lots' is not an integer$"),
        ({"lora_alpha": 2.5}, r"^lora_alpha: value 2.5 is not an integer$"),
        ({"lora_alpha": True}, r"^lora_alpha: value True is not an integer$"),
        ({"dropout": "high"}, r"^dropout: value 'high' is not a number$"),
        ({"fan_in_fan_out": "maybe"}, r"^fan_in_fan_out: value 'maybe' is not a boolean"),
        ({"target_modules": {"a": 1}}, r"^target_modules: value \{'a': 1\} is not a list$"),
        ({"train": {"epochs": "many"}}, r"^train\.epochs: value 'many' is not an integer$"),
        (
            {"train": {"learning_rate": "fast"}},
            r"^train\.learning_rate: value 'fast' is not float or null$",
        ),
        ({"train": 5}, r"^train: expected a mapping of Inner fields, got 5$"),
    ],
)
def test_type_errors_name_the_field_and_value(data: dict[str, object], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        Outer.from_dict(data)


def test_literal_error_lists_choices_and_suggests() -> None:
    with pytest.raises(ConfigError) as info:
        Outer.from_dict({"train": {"scheduler": "cosin"}})
    msg = str(info.value)
    assert msg.startswith(
        "train.scheduler: value 'cosin' is not one of 'cosine', 'linear', 'constant'"
    )
    assert "did you mean 'cosine'?" in msg


def test_coercions_from_strings_and_numbers() -> None:
    cfg = Outer.from_dict(
        {
            "lora_alpha": "16",
            "dropout": 1,
            "fan_in_fan_out": "yes",
            "target_modules": "query, value",
            "label": "3",
            "layers": [0, "1"],
            "train": {"epochs": 4.0, "learning_rate": "1e-4"},
        }
    )
    assert cfg.lora_alpha == 16
    assert cfg.dropout == 1.0 and isinstance(cfg.dropout, float)
    assert cfg.fan_in_fan_out is True
    assert cfg.target_modules == ["query", "value"]
    assert cfg.label == "3"  # exact type wins in `str | int`
    assert Outer.from_dict({"label": 3}).label == 3
    assert cfg.layers == (0, 1)
    assert cfg.train.epochs == 4 and isinstance(cfg.train.epochs, int)
    assert cfg.train.learning_rate == pytest.approx(1e-4)


def test_validate_runs_on_read_and_on_replace() -> None:
    with pytest.raises(ConfigError, match="epochs: value 0 must be >= 1"):
        Outer.from_dict({"train": {"epochs": 0}})
    with pytest.raises(ConfigError, match="epochs: value 0 must be >= 1"):
        Inner().replace(epochs=0)
    assert Inner().replace(epochs=7).epochs == 7


def test_missing_required_field_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"Required: .*path"):
        Required.from_dict({})


def test_non_mapping_input_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        Outer.from_dict([1, 2])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- overrides


def test_parse_override_reads_yaml_scalars() -> None:
    assert parse_override("train.epochs=5") == (["train", "epochs"], 5)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=[q, v]") == (["a"], ["q", "v"])
    assert parse_override("a=x=y") == (["a"], "x=y")
    assert parse_override("a=") == (["a"], "")


@pytest.mark.parametrize("text", ["train.epochs", "=3"])
def test_bad_override_syntax(text: str) -> None:
    with pytest.raises(ConfigError, match="override"):
        parse_override(text)


def test_dotted_overrides_set_nested_values_and_validate_on_read() -> None:
    data = Outer().to_dict()
    apply_overrides(data, ["train.epochs=5", "train.learning_rate=3e-4", "lora_alpha=32"])
    cfg = Outer.from_dict(data)
    assert cfg.train.epochs == 5
    assert cfg.train.learning_rate == pytest.approx(3e-4)
    assert cfg.lora_alpha == 32
    # A misspelt override key is caught by the strict read, with a suggestion.
    data = apply_overrides(Outer().to_dict(), ["train.epohcs=5"])
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        Outer.from_dict(data)


def test_override_creates_missing_sections() -> None:
    assert apply_overrides({}, ["train.epochs=2"]) == {"train": {"epochs": 2}}
    assert Outer.from_dict(apply_overrides({}, ["train.epochs=2"])).train.epochs == 2


def test_override_through_a_scalar_is_refused() -> None:
    with pytest.raises(ConfigError, match="'lora_alpha' is not a section"):
        apply_overrides({"lora_alpha": 8}, ["lora_alpha.x=1"])


# --------------------------------------------------------------------------- round trips


def _non_default_outer() -> Outer:
    return Outer(
        name="dora",
        lora_alpha=32,
        dropout=0.05,
        fan_in_fan_out=True,
        target_modules=["q_proj", "v_proj"],
        label=7,
        layers=(1, 3),
        train=Inner(epochs=9, learning_rate=2e-5, scheduler="cosine"),
    )


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = _non_default_outer()
    text = cfg.to_yaml()
    assert "!!python" not in text  # plain YAML, readable by the safe loader
    assert Outer.from_dict(yaml.safe_load(text)) == cfg
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert Outer.from_file(path) == cfg


def test_json_round_trip(tmp_path: Path) -> None:
    cfg = _non_default_outer()
    path = tmp_path / "run.json"
    path.write_text(cfg.to_json())
    assert Outer.from_file(path) == cfg


def test_real_configs_round_trip_through_yaml() -> None:
    train = TrainerConfig(
        learning_rate=1e-4, scheduler="cosine", max_steps=10, layerwise_lr_decay=0.9
    )
    data = DataConfig(source="x.csv", max_train_examples=50)
    assert TrainerConfig.from_dict(yaml.safe_load(train.to_yaml())) == train
    assert DataConfig.from_dict(yaml.safe_load(data.to_yaml())) == data


def test_from_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Outer.from_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml' is not valid YAML"):
        Outer.from_file(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("train:\n  epochs: 2\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'lr' in wrong.yaml.train"):
        Outer.from_file(wrong)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert Outer.from_file(empty) == Outer()


def test_yaml_is_read_with_the_safe_loader(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Outer.from_file(evil)
