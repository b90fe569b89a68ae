r"""Feature-based transfer: frozen model → features → logistic regression.

::

    x ──► frozen pretrained model ──► h (the head's input, cached) ──► LogisticRegression ──► y

The classic baseline of transfer learning: no gradient reaches the network. deltatune records
the input of the model's classification head (e.g. BERT's pooled output) for every training
example, fits scikit-learn's multinomial ``LogisticRegression`` on it, and writes the fitted
coefficients into the head (``W ← coef``, ``b ← intercept``). The model then predicts exactly
as the fitted classifier does, and is evaluated, saved and served like any other method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.registry import Capabilities, MethodConfig, MethodSpec, register
from deltatune.targeting import HEAD_NAMES, output_layer_names


@dataclasses.dataclass
class FeaturesConfig(MethodConfig):
    """Feature-based settings.

    - ``head`` (None = the model's ``classifier``/``score``/output layer): the Linear to fit.
    - ``C`` (1.0): inverse L2 regularisation strength of the logistic regression.
    - ``max_iter`` (2000): solver iterations.
    - ``standardize`` (True): scale features to zero mean / unit variance before fitting (folded
      into the head's weights afterwards).
    """

    method_name: ClassVar[str] = "features"
    peft_type: ClassVar[str] = "DELTATUNE_FEATURES"

    head: str | None = None
    C: float = 1.0
    max_iter: int = 2000
    standardize: bool = True

    def validate(self) -> None:
        if self.C <= 0:
            raise ConfigError(f"C={self.C} must be > 0 (try 1.0)")


def find_head(model: nn.Module, head: str | None) -> str:
    if head is not None:
        try:
            module = model.get_submodule(head)
        except AttributeError:
            raise ConfigError(
                f"head='{head}' is not a submodule of {type(model).__name__}"
            ) from None
        if not isinstance(module, nn.Linear):
            raise ConfigError(
                f"head='{head}' is a {type(module).__name__}; the feature-based method fits a Linear"
            )
        return head
    candidates = [
        n
        for n, m in model.named_modules()
        if n.split(".")[-1] in HEAD_NAMES and isinstance(m, nn.Linear)
    ]
    candidates += sorted(output_layer_names(model) - set(candidates))
    if not candidates:
        raise ConfigError(
            f"cannot find the classification head of {type(model).__name__}; set head: <module name>"
        )
    return candidates[-1]


def inject_features(model: nn.Module, config: FeaturesConfig, adapter_name: str) -> None:
    from deltatune.model import state_of

    head = find_head(model, config.head)
    for p in model.parameters():
        p.requires_grad_(False)
    state_of(model).in_place_params[adapter_name] = [
        f"{head}.{n}" for n, _ in model.get_submodule(head).named_parameters()
    ]


@torch.no_grad()
def collect_head_inputs(
    model: nn.Module, head: str, batches: Iterable[dict[str, Any]]
) -> tuple[np.ndarray, np.ndarray]:
    """Run the frozen model and return (features at the head's input, labels)."""
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    module = model.get_submodule(head)
    handle = module.register_forward_hook(
        lambda _m, args, _out: feats.append(args[0].detach().float().cpu())
    )
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = dict(batch)
            labels.append(batch.pop("labels").cpu())
            model(**batch)
    finally:
        handle.remove()
        model.train(was_training)
    x = torch.cat([f.reshape(f.shape[0], -1) if f.dim() == 2 else f[:, 0] for f in feats])
    return x.numpy(), torch.cat(labels).numpy()


def fit_features(
    model: nn.Module, config: FeaturesConfig, batches: Iterable[dict[str, Any]]
) -> dict[str, float]:
    """Fit the head by logistic regression on cached frozen features; return train accuracy."""
    from sklearn.linear_model import LogisticRegression

    head_name = find_head(model, config.head)
    head: nn.Linear = model.get_submodule(head_name)  # type: ignore[assignment]
    x, y = collect_head_inputs(model, head_name, batches)
    n_classes = head.out_features
    if y.max() >= n_classes:
        raise ConfigError(
            f"labels go up to {int(y.max())} but the head '{head_name}' has {n_classes} outputs"
        )
    mean = x.mean(0) if config.standardize else np.zeros(x.shape[1], dtype=x.dtype)
    std = x.std(0) + 1e-6 if config.standardize else np.ones(x.shape[1], dtype=x.dtype)
    clf = LogisticRegression(C=config.C, max_iter=config.max_iter)
    clf.fit((x - mean) / std, y)
    coef = np.zeros((n_classes, x.shape[1]))
    intercept = np.zeros(n_classes)
    if len(clf.classes_) == 2 and clf.coef_.shape[0] == 1:
        # Binary: sklearn keeps one row; logits (−z/2, z/2) give the same probabilities.
        coef[clf.classes_[1]] = clf.coef_[0] / 2
        coef[clf.classes_[0]] = -clf.coef_[0] / 2
        intercept[clf.classes_[1]], intercept[clf.classes_[0]] = (
            clf.intercept_[0] / 2,
            -clf.intercept_[0] / 2,
        )
    else:
        coef[clf.classes_] = clf.coef_
        intercept[clf.classes_] = clf.intercept_
        missing = np.setdiff1d(np.arange(n_classes), clf.classes_)
        intercept[missing] = -1e4  # classes absent from the training data are never predicted
    # Fold the standardisation in: W (x − μ)/σ + b = (W/σ) x + (b − W μ/σ).
    w = coef / std
    b = intercept - w @ mean
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(w, dtype=head.weight.dtype))
        if head.bias is not None:
            head.bias.copy_(torch.as_tensor(b, dtype=head.bias.dtype))
    return {
        "train_accuracy": float(clf.score((x - mean) / std, y)),
        "n_features": float(x.shape[1]),
    }


register(
    MethodSpec(
        name="features",
        config_cls=FeaturesConfig,
        inject=inject_features,
        capabilities=Capabilities(merge=False),
        default_lr=0.0,
        summary="Frozen features + scikit-learn logistic regression head",
        family="classic",
        fit=fit_features,
    )
)
