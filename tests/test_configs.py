"""The shipped YAML configs: the reference documents the real defaults; examples all parse."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deltatune.run import RunConfig, load_run_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_reference_config_equals_the_code_defaults() -> None:
    reference = yaml.safe_load((CONFIGS / "reference.yaml").read_text())
    assert reference == RunConfig().to_dict()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path: Path) -> None:
    if "tasks" in (yaml.safe_load(path.read_text()) or {}):  # a `deltatune multitask` config
        from deltatune.train.multitask import load_multitask_config

        assert len(load_multitask_config(path, []).tasks) >= 2
        return
    cfg = load_run_config(path, [])
    assert cfg.method_config().method_name == cfg.method["name"]
