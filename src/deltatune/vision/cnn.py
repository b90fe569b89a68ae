"""CNN image classifiers: a backbone, global average pooling and a new Linear head.

:class:`ImageClassifier` is what ``deltatune train`` fine-tunes on image data::

    pixel_values ──► backbone ──► (B, C, h, w) ──► global average pool ──► classifier ──► logits
                                  or (B, C) features                      (new nn.Linear)

The head is always the module ``classifier``, so the methods find it as they find a transformers
model's: LoRA/BitFit/IA3 train it whole (``modules_to_save``), ``freeze`` trains it after the last
block, ``features`` fits it by logistic regression, and ``train.head_lr_multiplier`` gives it
its own learning rate.

The backbone (``model.name_or_path``) is one of:

- ``embedded-vgg16bn``: CRAFT's pretrained VGG16-BN (:mod:`deltatune.vision.vgg`);
  ``model.pretrained: false`` builds the same network with random weights (the baseline that
  pretraining must beat).
- ``package.module:Name`` or ``path/to/file.py:Name``: any ``nn.Module`` class (or a function
  returning one), called with ``model.model_kwargs``, its weights read from ``model.weights``
  (``torch.load(weights_only=True)`` or safetensors, strict: every key must fit).
- ``torchvision:<name>`` / ``timm:<name>`` when that library is installed (built without
  downloading anything; give the weights with ``model.weights``).

A user's network keeps its own head only as far as finding it: the output ``nn.Linear``
(``model.head``, or found by running one dummy image and taking the Linear whose output the
model returns) is replaced by ``nn.Identity`` and its input becomes the new head's input. A
network that returns a feature map or a feature vector is used as it is.

BatchNorm layers whose parameters are all frozen stay in eval mode while the model trains, so
a frozen block keeps its pretrained running statistics (they would otherwise drift to the new
data and, not being trained parameters, not be saved with the adapter).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.errors import CheckpointError, ConfigError, DeltatuneError
from deltatune.targeting import HEAD_NAMES, set_submodule
from deltatune.vision.vgg import EMBEDDED_VGG, read_state_dict, vgg16bn_backbone

#: Prefixes of ``model.name_or_path`` that name a model of an optional library.
LIBRARY_PREFIXES = ("torchvision:", "timm:")


class ImageClassifier(nn.Module):
    """``backbone`` -> global average pooling (of a 4-D map) -> ``classifier`` (new Linear).

    ``forward(pixel_values)`` takes ``(B, 3, H, W)`` images and returns ``(B, num_classes)``
    logits. ``frozen_bn_eval`` keeps frozen BatchNorm layers in eval mode during training.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: int,
        *,
        frozen_bn_eval: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"an image classifier needs >= 1 class, got {num_classes}")
        self.backbone = backbone
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.frozen_bn_eval = frozen_bn_eval

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The head's input: pooled backbone features ``(B, feature_dim)``."""
        h = backbone_output(self.backbone(pixel_values))
        if h.dim() == 4:
            return self.pool(h).flatten(1)
        if h.dim() == 2:
            return h
        raise DeltatuneError(
            f"the backbone returned a {h.dim()}-D tensor {tuple(h.shape)}; expected a (B, C, H, W) "
            "feature map or (B, C) features"
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(pixel_values))

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if mode and self.frozen_bn_eval:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    params = list(module.parameters(recurse=False))
                    if params and not any(p.requires_grad for p in params):
                        module.eval()
        return self


def backbone_output(output: Any) -> torch.Tensor:
    """The tensor of a backbone's output (a tensor, ``.logits``/``.last_hidden_state``, a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    for attr in ("logits", "last_hidden_state", "pooler_output"):
        value = getattr(output, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise DeltatuneError(f"the backbone returned {type(output).__name__}; it must return a tensor")


def is_image_model(name_or_path: str) -> bool:
    """Whether ``model.name_or_path`` names a CNN (the embedded VGG, a class path, a library model)."""
    if name_or_path == EMBEDDED_VGG or name_or_path.startswith(LIBRARY_PREFIXES):
        return True
    return ":" in name_or_path and not Path(name_or_path).expanduser().is_dir()


# --------------------------------------------------------------------------- user networks


def import_object(spec: str) -> Any:
    """``package.module:Name`` or ``path/to/file.py:Name`` (``Name`` may be dotted)."""
    module_part, _, attr = spec.rpartition(":")
    if not module_part or not attr:
        raise ConfigError(
            f"model.name_or_path: '{spec}' is not 'package.module:ClassName' or 'file.py:ClassName'"
        )
    try:
        if module_part.endswith(".py"):
            path = Path(module_part).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"model.name_or_path: file '{path}' does not exist")
            name = f"_deltatune_user_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise ConfigError(f"model.name_or_path: cannot import '{path}'")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_part)
    except ImportError as exc:
        raise ConfigError(
            f"model.name_or_path: cannot import '{module_part}' ({exc}); is it installed or on "
            "PYTHONPATH?"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model.name_or_path: '{module_part}' has no '{attr}'")
        obj = getattr(obj, part)
    return obj


def _library_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    library, _, model_name = name.partition(":")
    try:
        if library == "torchvision":
            import torchvision

            kwargs = {"weights": None, **kwargs}
            return torchvision.models.get_model(model_name, **kwargs)  # type: ignore[no-any-return]
        import timm

        kwargs = {"pretrained": False, **kwargs}
        return timm.create_model(model_name, **kwargs)  # type: ignore[no-any-return]
    except ImportError:
        raise ConfigError(
            f"model.name_or_path: '{name}' needs {library}, which is not installed "
            f"(`pip install {library}`), or name the class as 'package.module:ClassName'"
        ) from None
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ConfigError(
            f"model.name_or_path: {library} cannot build '{model_name}': {exc}"
        ) from None


def build_user_network(
    name: str, weights: str | None, kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """Instantiate a user's CNN and load its state dict (strict, ``weights_only``)."""
    kwargs = dict(kwargs or {})
    if name.startswith(LIBRARY_PREFIXES):
        network = _library_model(name, kwargs)
    else:
        factory = import_object(name)
        if not callable(factory):
            raise ConfigError(f"model.name_or_path: '{name}' is not a class or function")
        try:
            network = factory(**kwargs)
        except TypeError as exc:
            raise ConfigError(
                f"model.name_or_path: '{name}' cannot be built with model_kwargs={kwargs}: {exc}"
            ) from None
    if not isinstance(network, nn.Module):
        raise ConfigError(
            f"model.name_or_path: '{name}' built a {type(network).__name__}, not a torch nn.Module"
        )
    if weights is not None:
        state = read_state_dict(weights)
        own = network.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        mismatched = sorted(
            f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
            for k in set(own) & set(state)
            if tuple(state[k].shape) != tuple(own[k].shape)
        )
        if missing or unexpected or mismatched:
            parts = [
                f"{len(keys)} {label}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                for label, keys in (
                    ("missing", missing),
                    ("unexpected", unexpected),
                    ("mis-shaped", mismatched),
                )
                if keys
            ]
            raise CheckpointError(
                f"model.weights: '{weights}' does not fit {type(network).__name__} "
                f"({'; '.join(parts)}); was it saved from this class with these model_kwargs?"
            )
        network.load_state_dict(state)
    return network


def find_output_linear(network: nn.Module, image_size: int) -> str | None:
    """The name of the Linear whose output the network returns, or None (a feature extractor).

    Runs one zero image of ``image_size`` through the network (eval mode, no gradients).
    """
    outputs: dict[int, str] = {}
    hooks = [
        module.register_forward_hook(lambda _m, _a, out, n=name: outputs.__setitem__(id(out), n))
        for name, module in network.named_modules()
        if isinstance(module, nn.Linear)
    ]
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            out = backbone_output(network(torch.zeros(1, 3, image_size, image_size)))
    except Exception as exc:
        raise ConfigError(
            f"{type(network).__name__} fails on a (1, 3, {image_size}, {image_size}) image "
            f"({type(exc).__name__}: {str(exc)[:200]}); check image.size and the network"
        ) from None
    finally:
        for h in hooks:
            h.remove()
        network.train(was_training)
    return outputs.get(id(out))


def _feature_dim(network: nn.Module, image_size: int) -> int:
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            out = backbone_output(network(torch.zeros(1, 3, image_size, image_size)))
    finally:
        network.train(was_training)
    if out.dim() not in (2, 4):
        raise ConfigError(
            f"{type(network).__name__} returns a {tuple(out.shape)} tensor; a backbone must return "
            "(B, C, H, W) feature maps or (B, C) features"
        )
    return int(out.shape[1])


def classifier_from_network(
    network: nn.Module, num_classes: int, image_size: int, head: str | None = None
) -> ImageClassifier:
    """Wrap a user's CNN: its output Linear (``head`` or found) becomes a new ``classifier``."""
    if head is None:
        head = find_output_linear(network, image_size)
        if head is None:
            named = [n for n, m in network.named_modules() if n.split(".")[-1] in HEAD_NAMES]
            head = next((n for n in named if isinstance(network.get_submodule(n), nn.Linear)), None)
    if head is not None:
        try:
            old = network.get_submodule(head)
        except AttributeError:
            raise ConfigError(
                f"model.head: '{head}' is not a submodule of {type(network).__name__}"
            ) from None
        if not isinstance(old, nn.Linear):
            raise ConfigError(f"model.head: '{head}' is a {type(old).__name__}, not a Linear layer")
        set_submodule(network, head, nn.Identity())
        feature_dim = old.in_features
    else:
        feature_dim = _feature_dim(network, image_size)
    return ImageClassifier(network, feature_dim, num_classes)


def build_image_classifier(
    name_or_path: str,
    num_classes: int,
    *,
    image_size: int = 32,
    pretrained: bool = True,
    weights: str | None = None,
    head: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> ImageClassifier:
    """The CNN classifier named by ``model.name_or_path`` with a new ``num_classes`` head."""
    if name_or_path == EMBEDDED_VGG:
        if weights is not None or head is not None or model_kwargs:
            raise ConfigError(
                f"model.weights/head/model_kwargs are for your own CNN; '{EMBEDDED_VGG}' takes "
                "none of them (model.pretrained: false gives it random weights)"
            )
        backbone = vgg16bn_backbone(pretrained=pretrained)
        return ImageClassifier(backbone, backbone.out_channels, num_classes)
    if not is_image_model(name_or_path):
        raise ConfigError(
            f"model.name_or_path: '{name_or_path}' is not a CNN; image data needs "
            f"'{EMBEDDED_VGG}', 'package.module:ClassName' (+ model.weights), or "
            "'torchvision:<name>' / 'timm:<name>'"
        )
    if not pretrained:
        weights = None
    network = build_user_network(name_or_path, weights, model_kwargs)
    return classifier_from_network(network, num_classes, image_size, head)
