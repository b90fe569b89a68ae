"""Image classification data: Fashion-MNIST, scikit-learn's digits, or a folder per class.

The flow mirrors the text path: :func:`load_image_splits` reads the source named by
``data.source``, makes the same stratified, seeded train/validation/test split (with the same
``data.*_fraction``/``max_*_examples`` caps) and returns uint8 images; :class:`ImageDataset`
turns them into what a CNN pretrained on ImageNet-normalised RGB expects::

    uint8 (N, 1 or 3, h, w) ─► [0, 1] ─► resize to size x size ─► 3 channels ─► (x - mean) / std
                                            training only, when switched on: random crop with
                                            padding (``crop``), horizontal flip (``flip``)

Items are ``{"pixel_values": (3, S, S) float32, "labels": int}``; the default collate stacks
them into the batch dicts the trainer passes to ``model(pixel_values=...)``.

Sources:

- ``fashion_mnist``: the Debian package ``dataset-fashion-mnist`` (70,000 28x28 grayscale images
  of 10 clothing classes, gzip IDX files under ``/usr/share/datasets/fashion-mnist/``). The
  official train and test files are pooled and split like any other source.
- ``digits``: scikit-learn's ``load_digits`` (1,797 8x8 grayscale handwritten digits, 10 classes).
- a folder holding one sub-folder per class of PNG/JPEG/BMP/GIF/WebP files (read with Pillow;
  sub-folder names are the labels, sorted; files are read only once the split has chosen them).
"""

from __future__ import annotations

import dataclasses
import gzip
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from deltatune.config import BaseConfig
from deltatune.data.text import DataConfig, TextExamples, encode_labels, split_examples
from deltatune.errors import AssetError, ConfigError, DeltatuneError

FASHION_MNIST = "fashion_mnist"
DIGITS = "digits"
#: ``data.source`` values that name an embedded image data set.
IMAGE_SOURCES = (FASHION_MNIST, DIGITS)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_APT = "apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
AUGMENTATIONS = ("crop", "flip")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclasses.dataclass
class ImageConfig(BaseConfig):
    """How images are prepared for the CNN (used when ``data.source`` is an image data set).

    Fields:
        size: images are resized to ``size x size`` pixels. Default ``32``.
        augment: training-time augmentations, any of ``crop`` (random crop after padding by
            ``crop_padding`` pixels on each side) and ``flip`` (random horizontal flip);
            validation and test images are never augmented. Default ``[]`` (none).
        crop_padding: the padding of ``crop``, in pixels (padded with black). Default ``4``.
        mean, std: per-channel normalisation of RGB values in [0, 1]. Default ImageNet's, which
            the embedded VGG16-BN was trained with.
    """

    size: int = 32
    augment: list[str] = dataclasses.field(default_factory=list)
    crop_padding: int = 4
    mean: list[float] = dataclasses.field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = dataclasses.field(default_factory=lambda: list(IMAGENET_STD))

    def validate(self) -> None:
        if self.size < 8:
            raise ConfigError(f"image.size: value {self.size!r} must be >= 8 (e.g. 32)")
        for item in self.augment:
            if item not in AUGMENTATIONS:
                raise ConfigError(
                    f"image.augment: value {item!r} is not one of {', '.join(AUGMENTATIONS)} "
                    "(e.g. image.augment=[crop,flip])"
                )
        if not 0 <= self.crop_padding <= self.size:
            raise ConfigError(
                f"image.crop_padding: value {self.crop_padding!r} must be in [0, image.size]"
            )
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ConfigError(f"image.{name}: needs 3 values (R, G, B), got {value!r}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"image.std: values {self.std!r} must all be > 0")


def is_image_source(source: str) -> bool:
    """Whether ``data.source`` names image data (an embedded image set or a folder)."""
    return source in IMAGE_SOURCES or Path(source).expanduser().is_dir()


# --------------------------------------------------------------------------- sources


@dataclasses.dataclass
class ImageExamples:
    """uint8 images ``(N, C, H, W)`` (C = 1 or 3) with integer label ids."""

    images: torch.Tensor
    labels: list[int]

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.shape[0] != len(self.labels):
            raise ValueError(
                f"images {tuple(self.images.shape)} do not fit {len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass
class ImageSplits:
    """Train/validation/test images; ``label_names[i]`` names label id ``i``."""

    train: ImageExamples
    val: ImageExamples
    test: ImageExamples
    label_names: list[str]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or plain): magic 0x08 (uint8) with 1 to 3 dimensions."""
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype != 0x08 or not 1 <= ndim <= 3:
            raise ValueError(f"bad magic (type {dtype:#x}, {ndim} dims)")
        shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return body.reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as exc:
        raise AssetError(
            f"'{path}' is not a valid IDX file ({exc}); reinstall with "
            f"`{FASHION_MNIST_APT.replace('install', 'install --reinstall')}`"
        ) from None


def load_fashion_mnist(root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 Fashion-MNIST images ``(N, 28, 28)`` uint8 and labels, train file first."""
    folder = Path(root) if root is not None else FASHION_MNIST_DIR
    images, labels = [], []
    for part in ("train", "t10k"):
        files = [
            folder / f"{part}-{kind}-idx{dims}-ubyte.gz"
            for kind, dims in (("images", 3), ("labels", 1))
        ]
        for f in files:
            if not f.is_file():
                raise AssetError(
                    f"Fashion-MNIST is not installed ('{f}' is missing); run `make setup` or "
                    f"`sudo {FASHION_MNIST_APT}` (Debian/Ubuntu)"
                )
        x, y = _read_idx(files[0]), _read_idx(files[1])
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise AssetError(f"'{files[0]}' and '{files[1]}' do not match ({x.shape}, {y.shape})")
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(1797, 8, 8)`` uint8 (0-16 scaled to 0-255) and labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, bunch.target.astype(np.int64)


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise DeltatuneError(
            "reading image files needs Pillow; install it with `pip install pillow`"
        ) from None
    return Image


def folder_files(root: str | Path) -> tuple[list[Path], list[str]]:
    """Image files of a folder-per-class tree and their raw labels (sub-folder names), sorted."""
    folder = Path(root).expanduser()
    files: list[Path] = []
    labels: list[str] = []
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    for class_dir in classes:
        for f in sorted(class_dir.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(class_dir.name)
    if not files:
        raise DeltatuneError(
            f"data.source: folder '{folder}' holds no images; give one sub-folder per class "
            f"with {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files (e.g. {folder}/cat/001.png)"
        )
    return files, labels


def read_image_file(path: str | Path, size: int) -> torch.Tensor:
    """One image file as uint8 ``(3, size, size)`` RGB (resized with bilinear filtering)."""
    image_mod = _pil()
    p = Path(path)
    try:
        with image_mod.open(p) as img:
            rgb = img.convert("RGB").resize((size, size), image_mod.Resampling.BILINEAR)
            array = np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise DeltatuneError(f"cannot read image '{p}' ({exc})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _split_indices(
    labels: Sequence[int], names: list[str], cfg: DataConfig
) -> tuple[list[int], list[int], list[int]]:
    """Indices of the train/val/test split, with exactly the text path's semantics."""
    ids = TextExamples([str(i) for i in range(len(labels))], list(labels))
    splits = split_examples(
        ids,
        names,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        seed=cfg.seed,
        max_train_examples=cfg.max_train_examples,
        max_eval_examples=cfg.max_eval_examples,
    )
    return (
        [int(t) for t in splits.train.texts],
        [int(t) for t in splits.val.texts],
        [int(t) for t in splits.test.texts],
    )


def load_image_splits(cfg: DataConfig, image: ImageConfig | None = None) -> ImageSplits:
    """Load the image data ``cfg.source`` names and split it (stratified, seeded)."""
    image = image or ImageConfig()
    source = cfg.source
    if source in IMAGE_SOURCES:
        if source == FASHION_MNIST:
            x, y = load_fashion_mnist()
            names = list(FASHION_MNIST_LABELS)
        else:
            x, y = load_digits_images()
            names = [str(i) for i in range(10)]
        labels = [int(v) for v in y]
        tr, va, te = _split_indices(labels, names, cfg)
        tensor = torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1)  # (N, 1, h, w)

        def take(idx: list[int]) -> ImageExamples:
            return ImageExamples(tensor[idx].clone(), [labels[i] for i in idx])

        return ImageSplits(take(tr), take(va), take(te), names)
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"data.source: '{source}' is not an image folder; use "
            f"{', '.join(repr(s) for s in IMAGE_SOURCES)} or a folder with one sub-folder per class"
        )
    files, raw = folder_files(folder)
    labels, names = encode_labels(raw)
    tr, va, te = _split_indices(labels, names, cfg)

    def read(idx: list[int]) -> ImageExamples:
        if not idx:
            return ImageExamples(torch.zeros(0, 3, image.size, image.size, dtype=torch.uint8), [])
        return ImageExamples(
            torch.stack([read_image_file(files[i], image.size) for i in idx]),
            [labels[i] for i in idx],
        )

    return ImageSplits(read(tr), read(va), read(te), names)


# --------------------------------------------------------------------------- preprocessing


def preprocess(images: torch.Tensor, cfg: ImageConfig) -> torch.Tensor:
    """uint8 ``(N, 1|3, h, w)`` -> float32 ``(N, 3, size, size)``, resized and normalised."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise DeltatuneError(f"images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
    x = images.float().div_(255.0)
    if tuple(x.shape[-2:]) != (cfg.size, cfg.size) and x.shape[0] > 0:
        shrink = x.shape[-1] > cfg.size or x.shape[-2] > cfg.size
        x = F.interpolate(
            x, size=(cfg.size, cfg.size), mode="bilinear", align_corners=False, antialias=shrink
        ).clamp_(0.0, 1.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


class ImageDataset(Dataset[dict[str, Any]]):
    """Preprocessed images (resized and normalised once); augmentation per item in training.

    ``train=True`` applies ``cfg.augment`` (random crop with padding, horizontal flip), drawn
    from the global torch RNG, which the trainer seeds and its checkpoints restore, so an
    augmented run is reproducible and resumes exactly. ``train=False`` never augments.
    """

    def __init__(self, examples: ImageExamples, cfg: ImageConfig, *, train: bool) -> None:
        self.pixels = preprocess(examples.images, cfg)
        self.labels = list(examples.labels)
        self.train = train
        self.crop = train and "crop" in cfg.augment and cfg.crop_padding > 0
        self.flip = train and "flip" in cfg.augment
        self.padding = cfg.crop_padding
        # Padding is black before normalisation: (0 - mean) / std per channel.
        self.fill = (-torch.tensor(cfg.mean) / torch.tensor(cfg.std)).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        if self.crop:
            p = self.padding
            _, h, w = x.shape
            padded = self.fill.expand(3, h + 2 * p, w + 2 * p).clone()
            padded[:, p : p + h, p : p + w] = x
            top, left = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
            x = padded[:, top : top + h, left : left + w]
        if self.flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x

    def __getitem__(self, index: int) -> dict[str, Any]:
        x = self.pixels[index]
        if self.crop or self.flip:
            x = self.augment(x)
        return {"pixel_values": x, "labels": self.labels[index]}


def image_datasets(
    splits: ImageSplits, cfg: ImageConfig
) -> tuple[ImageDataset, ImageDataset, ImageDataset]:
    """Train (augmented as configured), validation and test datasets (never augmented)."""
    return (
        ImageDataset(splits.train, cfg, train=True),
        ImageDataset(splits.val, cfg, train=False),
        ImageDataset(splits.test, cfg, train=False),
    )
