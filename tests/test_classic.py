"""Classic transfer-learning modes: freezing boundaries, head replacement, feature-based fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import make_bert, make_cnn, make_llama
from deltatune.errors import ConfigError
from deltatune.methods.features import collect_head_inputs
from deltatune.models import replace_head, resolve_model_path


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_first_n_on_bert_trains_later_blocks_and_head() -> None:
    model = dt.inject(make_bert(), dt.FreezeConfig(freeze_first_n=1))
    names = trainable_names(model)
    assert not any(n.startswith("bert.embeddings.") for n in names)
    assert not any(n.startswith("bert.encoder.layer.0.") for n in names)
    assert any(n.startswith("bert.encoder.layer.1.") for n in names)
    assert {"bert.pooler.dense.weight", "classifier.weight", "classifier.bias"} <= names


def test_train_last_n_zero_trains_only_what_follows_the_blocks() -> None:
    model = dt.inject(make_llama(), dt.FreezeConfig(train_last_n=0))
    assert trainable_names(model) == {"model.norm.weight", "lm_head.weight"}


def test_trainable_patterns_and_cnn_blocks_path() -> None:
    model = dt.inject(make_bert(), dt.FreezeConfig(trainable_patterns=["classifier"]))
    assert trainable_names(model) == {"classifier.weight", "classifier.bias"}
    cnn = dt.inject(make_cnn(), dt.FreezeConfig(freeze_first_n=1))  # blocks: top-level children
    assert "conv1.weight" not in trainable_names(cnn)
    assert {"conv2.weight", "fc.weight"} <= trainable_names(cnn)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({}, "exactly one of"),
        ({"train_last_n": 1, "freeze_first_n": 1}, "exactly one of"),
        ({"train_last_n": 9}, "has 2 blocks"),
        ({"trainable_patterns": ["nothing_here"]}, "match no parameter"),
    ],
)
def test_freeze_config_errors(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        dt.inject(make_bert(), dt.FreezeConfig(**kwargs))  # type: ignore[arg-type]


def test_replace_head_swaps_the_output_layer() -> None:
    model = make_bert()
    name = replace_head(model, 7)
    assert name == "classifier"
    x = torch.randint(0, 100, (2, 5))
    assert model(input_ids=x).logits.shape == (2, 7)
    cnn = make_cnn()
    replace_head(cnn, 10)
    assert cnn(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ConfigError, match="not a Linear"):
        replace_head(make_bert(), 3, head="bert.embeddings")


def test_model_path_errors_name_the_field(tmp_path: object) -> None:
    with pytest.raises(ConfigError, match=r"model\.name_or_path"):
        resolve_model_path("./no/such/folder")
    assert resolve_model_path("org/model") == ("org/model", False)  # a hub id, only if named


def test_features_head_reproduces_sklearn_probabilities() -> None:
    """The fitted head must give exactly the logistic regression's class probabilities."""
    from sklearn.linear_model import LogisticRegression

    torch.manual_seed(0)
    model = make_bert()
    dt.inject(model, dt.FeaturesConfig(standardize=True, C=0.5))
    ids = torch.randint(0, 100, (60, 6))
    labels = torch.arange(60) % 3
    batches = [
        {"input_ids": ids[i : i + 20], "labels": labels[i : i + 20]} for i in range(0, 60, 20)
    ]
    spec = dt.get_method("features")
    assert spec.fit is not None
    spec.fit(model, dt.FeaturesConfig(standardize=True, C=0.5), batches)

    x, y = collect_head_inputs(model, "classifier", batches)
    mean, std = x.mean(0), x.std(0) + 1e-6
    reference = LogisticRegression(C=0.5, max_iter=2000).fit((x - mean) / std, y)
    expected = reference.predict_proba((x - mean) / std)
    with torch.no_grad():
        got = model(input_ids=ids).logits.double().softmax(-1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert all(not p.requires_grad for p in model.parameters())
