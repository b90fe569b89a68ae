r"""Pruning: make a (fine-tuned or base) transformer smaller, then recover with a short fine-tune.

Four kinds, applied in this order (each optional):

1. **Top layers**: drop the last ``N`` transformer blocks (the embeddings, the first ``L - N``
   blocks and the head stay).
2. **Attention heads** (structured): head ``h`` of a block owns rows ``h*d .. (h+1)*d`` of the
   query/key/value projections and the same columns of the output projection ``W_o``
   (``d`` = head size). Its importance is ``||W_v[h]||_F * ||W_o[:, h]||_F`` (how much it can
   write into the residual stream); the least important ``fraction`` of all heads (over the
   whole model, at least one head kept per block) are removed by slicing those rows/columns::

       x ─► [q|k|v] heads 0 1 2 3 ─► attention per head ─► concat ─► W_o ─► +x
                          ✗     ✗                           rows/cols of heads 1, 3 sliced away

3. **Feed-forward neurons** (structured): neuron ``i`` is row ``i`` of the input projection(s)
   ``W_1`` (and LLaMA's gate) and column ``i`` of ``W_2``; importance
   ``||W_1[i]|| * ||W_2[:, i]||`` (times ``||W_gate[i]||`` for gated MLPs). The least important
   ``fraction`` of each block's neurons are sliced away. Removing neuron ``i`` is exactly the
   same function as zeroing ``W_1[i]``, its bias and ``W_2[:, i]`` (tested).
4. **Magnitude** (unstructured): the ``fraction`` of the blocks' Linear weights with the
   smallest ``|w|`` (one global threshold) are set to zero; the zeros stay zero through the
   recovery fine-tune (their gradients are masked; after an adapter is merged they are zeroed
   again). This makes the model sparse, not smaller in memory: dense kernels run as fast.

Architectures: BERT/RoBERTa-like encoders and LLaMA/Mistral/Qwen2-like decoders (heads only
when every query head has its own key/value head). Anything else is a :class:`ConfigError`
naming the model type.

A pruned model is saved as ``model.safetensors`` (its whole state dict) and ``prune.json``
(the kept layers, heads and neurons per block); :func:`load_pruned` rebuilds it.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.config import BaseConfig
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.targeting import set_submodule

PRUNE_FILE = "prune.json"
PRUNED_WEIGHTS = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class _Parts:
    """Module paths inside one block (relative), for one architecture family."""

    layers: str
    attention: str
    q: str
    k: str
    v: str
    o: str
    ffn_in: tuple[str, ...]
    ffn_out: str


_BERT_PARTS = _Parts(
    layers="encoder.layer",
    attention="attention.self",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    ffn_in=("intermediate.dense",),
    ffn_out="output.dense",
)
_LLAMA_PARTS = _Parts(
    layers="layers",
    attention="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"),
    ffn_out="mlp.down_proj",
)
_PARTS: dict[str, _Parts] = {
    "bert": _BERT_PARTS,
    "roberta": _BERT_PARTS,
    "llama": _LLAMA_PARTS,
    "mistral": _LLAMA_PARTS,
    "qwen2": _LLAMA_PARTS,
}


@dataclasses.dataclass
class PruneConfig(BaseConfig):
    """What ``deltatune prune`` removes and how it recovers (the ``prune:`` config section).

    Fields:
        source: a trained run folder to prune (its adapter merged first); ``None`` prunes the
            config's base model, and the recovery fine-tune is then its training.
            Default ``None``.
        layers: drop this many top transformer blocks. Default ``0``.
        heads: fraction of all attention heads to remove (least important first; at least
            one head per block stays), in [0, 1). Default ``0.0``.
        neurons: fraction of each block's feed-forward neurons to remove, in [0, 1).
            Default ``0.0``.
        magnitude: fraction of the blocks' Linear weights to set to zero (smallest ``|w|``,
            one global threshold), in [0, 1). Default ``0.0``.
        recovery_steps: optimizer steps of the recovery fine-tune with the config's ``method``
            and ``train`` settings (``train.max_steps`` is set to this); ``0`` skips it.
            Default ``50``.
        latency_batch: examples in the batch whose forward time is measured. Default ``32``.
        latency_repeats: timed forward passes per model (median reported). Default ``5``.
    """

    source: str | None = None
    layers: int = 0
    heads: float = 0.0
    neurons: float = 0.0
    magnitude: float = 0.0
    recovery_steps: int = 50
    latency_batch: int = 32
    latency_repeats: int = 5

    def validate(self) -> None:
        if self.layers < 0:
            raise ConfigError(f"prune.layers: value {self.layers!r} must be >= 0")
        for name in ("heads", "neurons", "magnitude"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(
                    f"prune.{name}: value {value!r} must be a fraction in [0, 1) (e.g. 0.25)"
                )
        if self.recovery_steps < 0:
            raise ConfigError(f"prune.recovery_steps: value {self.recovery_steps!r} must be >= 0")
        for name in ("latency_batch", "latency_repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"prune.{name}: value {getattr(self, name)!r} must be >= 1")

    @property
    def any(self) -> bool:
        return bool(self.layers or self.heads or self.neurons or self.magnitude)


# --------------------------------------------------------------------------- structure


def _parts(model: nn.Module) -> _Parts:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    parts = _PARTS.get(model_type) if isinstance(model_type, str) else None
    if parts is None:
        raise ConfigError(
            f"prune: {type(model).__name__} (model type {model_type!r}) is not supported; "
            f"structured pruning knows {', '.join(_PARTS)}"
        )
    return parts


def blocks_of(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, ModuleList)`` of the model's transformer blocks."""
    name = _parts(model).layers
    for path, module in model.named_modules():
        if (path == name or path.endswith("." + name)) and isinstance(module, nn.ModuleList):
            return path, module
    raise DeltatuneError(f"prune: {type(model).__name__} has no '{name}' block list")


def _linear(block: nn.Module, path: str) -> nn.Linear:
    module = block.get_submodule(path)
    if not isinstance(module, nn.Linear):
        raise DeltatuneError(
            f"prune: '{path}' is a {type(module).__name__}, not an nn.Linear; merge or unload "
            "adapters before pruning (deltatune.unload(model, merge=True))"
        )
    return module


def _sliced(lin: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    """A new Linear holding ``lin``'s weight restricted to ``rows`` (outputs) / ``cols`` (inputs)."""
    weight = lin.weight.detach()
    bias = lin.bias.detach() if lin.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if cols is not None:
        weight = weight[:, cols]
    new = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device
    ).to(weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(lin.training)
    return new


def drop_top_layers(model: nn.Module, n: int) -> None:
    """Remove the last ``n`` transformer blocks in place (``config.num_hidden_layers`` follows)."""
    if n == 0:
        return
    path, blocks = blocks_of(model)
    if n >= len(blocks):
        raise ConfigError(
            f"prune.layers: value {n} would remove all {len(blocks)} blocks; give at most "
            f"{len(blocks) - 1}"
        )
    keep = len(blocks) - n
    set_submodule(model, path, nn.ModuleList(list(blocks)[:keep]))
    config = getattr(model, "config", None)
    if config is not None:
        config.num_hidden_layers = keep
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list):
            config.layer_types = layer_types[:keep]


def _head_geometry(model: nn.Module, block: nn.Module) -> tuple[int, int]:
    """``(heads, head size)`` of one block's attention, from its query projection."""
    parts = _parts(model)
    attention = block.get_submodule(parts.attention)
    size = getattr(attention, "attention_head_size", None) or getattr(attention, "head_dim", None)
    if not isinstance(size, int):
        raise DeltatuneError(f"prune: cannot find the head size of {type(attention).__name__}")
    q = _linear(block, parts.q)
    k = _linear(block, parts.k)
    if k.out_features != q.out_features:
        raise ConfigError(
            "prune.heads: this model shares key/value heads between query heads (grouped-query "
            "attention); head pruning needs one key/value head per query head (use neurons or "
            "layers instead)"
        )
    return q.out_features // size, size


def head_importance(model: nn.Module) -> dict[int, torch.Tensor]:
    """Per block, ``||W_v[h]||_F * ||W_o[:, h]||_F`` for each head ``h``."""
    parts = _parts(model)
    _, blocks = blocks_of(model)
    out: dict[int, torch.Tensor] = {}
    for i, block in enumerate(blocks):
        heads, size = _head_geometry(model, block)
        v = _linear(block, parts.v).weight.detach().float().reshape(heads, size, -1)
        o = _linear(block, parts.o).weight.detach().float().reshape(-1, heads, size)
        out[i] = v.flatten(1).norm(dim=1) * o.transpose(0, 1).flatten(1).norm(dim=1)
    return out


def prune_heads(model: nn.Module, heads: Mapping[int, Sequence[int]]) -> None:
    """Remove the given heads (``{block index: [head indices]}``) in place."""
    parts = _parts(model)
    _, blocks = blocks_of(model)
    for i, removed in heads.items():
        if not removed:
            continue
        if not 0 <= i < len(blocks):
            raise ConfigError(f"prune.heads: block {i} does not exist ({len(blocks)} blocks)")
        block = blocks[i]
        n_heads, size = _head_geometry(model, block)
        gone = set(int(h) for h in removed)
        if any(not 0 <= h < n_heads for h in gone):
            raise ConfigError(f"prune.heads: block {i} has heads 0..{n_heads - 1}, got {removed}")
        kept = [h for h in range(n_heads) if h not in gone]
        if not kept:
            raise ConfigError(f"prune.heads: would remove every head of block {i}; keep one")
        idx = torch.cat([torch.arange(h * size, (h + 1) * size) for h in kept])
        for path in (parts.q, parts.k, parts.v):
            set_submodule(block, path, _sliced(_linear(block, path), idx, None))
        set_submodule(block, parts.o, _sliced(_linear(block, parts.o), None, idx))
        attention = block.get_submodule(parts.attention)
        # The forward passes reshape with -1 heads; these attributes are kept truthful anyway.
        if hasattr(attention, "num_attention_heads"):
            setattr(attention, "num_attention_heads", len(kept))  # noqa: B010 (a plain int)
        if hasattr(attention, "all_head_size"):
            setattr(attention, "all_head_size", len(kept) * size)  # noqa: B010


def select_heads(model: nn.Module, fraction: float) -> dict[int, list[int]]:
    """The least important ``fraction`` of all heads, keeping at least one per block."""
    scores = head_importance(model)
    total = sum(len(s) for s in scores.values())
    budget = round(fraction * total)
    ranked = sorted(
        ((float(s), i, h) for i, per in scores.items() for h, s in enumerate(per)),
    )
    chosen: dict[int, list[int]] = {i: [] for i in scores}
    for _, i, h in ranked:
        if budget == 0:
            break
        if len(chosen[i]) + 1 < len(scores[i]):
            chosen[i].append(h)
            budget -= 1
    return {i: sorted(hs) for i, hs in chosen.items() if hs}


def neuron_importance(model: nn.Module) -> dict[int, torch.Tensor]:
    """Per block, ``prod_j ||W_in_j[i]|| * ||W_out[:, i]||`` for each feed-forward neuron ``i``."""
    parts = _parts(model)
    _, blocks = blocks_of(model)
    out: dict[int, torch.Tensor] = {}
    for i, block in enumerate(blocks):
        score = _linear(block, parts.ffn_out).weight.detach().float().norm(dim=0)
        for path in parts.ffn_in:
            score = score * _linear(block, path).weight.detach().float().norm(dim=1)
        out[i] = score
    return out


def prune_neurons(model: nn.Module, keep: Mapping[int, Sequence[int]]) -> None:
    """Keep only the given feed-forward neurons (``{block index: [neuron indices]}``)."""
    parts = _parts(model)
    _, blocks = blocks_of(model)
    for i, kept in keep.items():
        if not kept:
            raise ConfigError(f"prune.neurons: would remove every neuron of block {i}")
        block = blocks[i]
        idx = torch.as_tensor(sorted(int(k) for k in kept), dtype=torch.long)
        for path in parts.ffn_in:
            set_submodule(block, path, _sliced(_linear(block, path), idx, None))
        set_submodule(block, parts.ffn_out, _sliced(_linear(block, parts.ffn_out), None, idx))


def select_neurons(model: nn.Module, fraction: float) -> dict[int, list[int]]:
    """Per block, the most important ``1 - fraction`` of the neurons (at least one)."""
    out = {}
    for i, score in neuron_importance(model).items():
        n_keep = max(1, len(score) - round(fraction * len(score)))
        out[i] = sorted(int(k) for k in torch.topk(score, n_keep).indices)
    return out


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """``(name, Linear)`` of every Linear inside the transformer blocks."""
    path, blocks = blocks_of(model)
    return [
        (f"{path}.{name}", module)
        for name, module in blocks.named_modules()
        if isinstance(module, nn.Linear)
    ]


def magnitude_masks(model: nn.Module, fraction: float) -> dict[str, torch.Tensor]:
    """Boolean keep-masks zeroing the ``fraction`` of block Linear weights smallest in ``|w|``.

    One global threshold over all the blocks' Linear weights (global unstructured pruning).
    """
    linears = block_linears(model)
    if fraction <= 0 or not linears:
        return {}
    flat = torch.cat([lin.weight.detach().abs().flatten().float().cpu() for _, lin in linears])
    k = round(fraction * flat.numel())
    if k == 0:
        return {}
    threshold = torch.kthvalue(flat, k).values
    return {
        f"{name}.weight": (lin.weight.detach().abs().float() > threshold.to(lin.weight.device))
        for name, lin in linears
    }


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero every masked-out weight (``mask == False``) in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask.to(params[name].dtype))


def mask_gradients(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list[Any]:
    """Hooks that zero the gradients of masked-out weights (AdamW then keeps them at zero).

    With a zero gradient from the first step, Adam's moments stay zero, its update is zero and
    decoupled weight decay scales zero to zero. Returns the hook handles (``.remove()`` them).
    """
    params = dict(model.named_parameters())
    handles = []
    for name, mask in masks.items():
        param = params[name]
        if param.requires_grad:
            m = mask.to(param.dtype)
            handles.append(param.register_hook(lambda g, m=m: g * m))
    return handles


def structure_of(model: nn.Module) -> dict[str, Any]:
    """What :func:`apply_structure` needs to rebuild the shapes: blocks, heads, neurons."""
    parts = _parts(model)
    _, blocks = blocks_of(model)
    heads, neurons = [], []
    for block in blocks:
        heads.append(_head_geometry(model, block)[0])
        neurons.append(_linear(block, parts.ffn_out).in_features)
    return {"num_layers": len(blocks), "heads": heads, "neurons": neurons}


def apply_structure(model: nn.Module, structure: Mapping[str, Any]) -> None:
    """Give an unpruned model the shapes in ``structure`` (weights are loaded afterwards)."""
    _, blocks = blocks_of(model)
    drop_top_layers(model, len(blocks) - int(structure["num_layers"]))
    _, blocks = blocks_of(model)
    for i, block in enumerate(blocks):
        n_heads, _ = _head_geometry(model, block)
        prune_heads(model, {i: list(range(int(structure["heads"][i]), n_heads))})
        prune_neurons(model, {i: list(range(int(structure["neurons"][i])))})


def prune(
    model: nn.Module,
    *,
    layers: int = 0,
    heads: float = 0.0,
    neurons: float = 0.0,
    magnitude: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Prune ``model`` in place (top layers, then heads, neurons, magnitude).

    Returns the magnitude keep-masks (empty without magnitude pruning), for
    :func:`mask_gradients` / :func:`apply_masks` around a recovery fine-tune.
    """
    PruneConfig(layers=layers, heads=heads, neurons=neurons, magnitude=magnitude)  # validates
    drop_top_layers(model, layers)
    if heads:
        prune_heads(model, select_heads(model, heads))
    if neurons:
        prune_neurons(model, select_neurons(model, neurons))
    masks = magnitude_masks(model, magnitude)
    apply_masks(model, masks)
    return masks


# --------------------------------------------------------------------------- measuring


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(parameters, non-zero parameters)``, each shared tensor counted once."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return total, nonzero


@torch.no_grad()
def compare_latency(
    models: Sequence[nn.Module], batch: Mapping[str, torch.Tensor], repeats: int = 5
) -> list[float]:
    """Median forward time (ms) of each model on ``batch``, timed in interleaved rounds.

    Interleaving (round r times every model once) spreads machine noise over all models
    alike, so the ratios are fair on a shared machine. One warm-up pass per model first.
    """
    was = [m.training for m in models]
    for m in models:
        m.eval()
        m(**batch)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for j, m in enumerate(models):
            start = time.perf_counter()
            m(**batch)
            times[j].append((time.perf_counter() - start) * 1000.0)
    for m, w in zip(models, was):
        m.train(w)
    return [statistics.median(t) for t in times]


# --------------------------------------------------------------------------- a whole run


def _inject_method(model: nn.Module, cfg: Any) -> None:
    from deltatune.model import inject
    from deltatune.run import _has_field

    method_cfg = cfg.method_config()
    if method_cfg.task_type is None and _has_field(method_cfg, "modules_to_save"):
        method_cfg = method_cfg.replace(task_type="SEQ_CLS")
    if method_cfg.base_model_name_or_path is None:
        method_cfg = method_cfg.replace(base_model_name_or_path=cfg.model.name_or_path)
    inject(model, method_cfg)


def prune_run(cfg: Any, output_dir: str | Path | None = None, echo: Any = print) -> dict[str, Any]:
    """Prune a run's merged model (``cfg.prune.source``) or the base, recover, measure, save.

    Writes ``model.safetensors``, ``prune.json``, ``metrics.json``, ``config.yaml`` and
    ``labels.json`` to ``output_dir`` (default ``cfg.output_dir``); returns the metrics:
    parameters, non-zero parameters, forward latency and validation/test accuracy of the model
    before pruning, right after it, and after the recovery fine-tune.
    """
    from deltatune.data import PadCollator, TokenizedDataset, load_text_splits
    from deltatune.data.augment import augment_text_dataset
    from deltatune.io import save_safetensors, write_json, write_text
    from deltatune.model import unload
    from deltatune.models import load_tokenizer
    from deltatune.registry import get_method
    from deltatune.run import (
        LABELS_NAME,
        METRICS_NAME,
        RUN_CONFIG_NAME,
        is_image_run,
        load_base_model,
        load_run,
        seed_everything,
    )
    from deltatune.train import ClassificationTask, evaluate_dataset, fit, resolve_device

    pcfg: PruneConfig = cfg.prune
    if not pcfg.any:
        raise ConfigError(
            "prune: nothing to prune; set at least one of prune.layers, prune.heads, "
            "prune.neurons, prune.magnitude (e.g. prune.heads=0.25)"
        )
    if is_image_run(cfg):
        raise ConfigError("prune: structured pruning applies to transformer text models only")
    out = Path(output_dir if output_dir is not None else cfg.output_dir)
    if pcfg.source is not None and out.resolve() == Path(pcfg.source).resolve():
        raise ConfigError(
            f"output_dir: '{out}' is the run being pruned; give another folder (--output-dir)"
        )
    seed_everything(cfg.train.seed)
    splits = load_text_splits(cfg.data)
    if pcfg.source is not None:
        run_cfg, model, tokenizer, label_names = load_run(pcfg.source)
        if label_names != splits.label_names:
            raise DeltatuneError(
                f"the data's labels {splits.label_names} differ from run '{pcfg.source}''s "
                f"{label_names}"
            )
        model = unload(model, merge=True)
        where = f"run {pcfg.source} (adapter merged)"
    else:
        tokenizer = load_tokenizer(cfg.model)
        model = load_base_model(cfg, splits.label_names)
        where = f"base model {cfg.model.name_or_path}"
    device = resolve_device(cfg.train.device)
    model.to(device).eval()
    collate = PadCollator(tokenizer)
    length = cfg.data.max_length
    train_ds = TokenizedDataset(splits.train, tokenizer, length)
    val_ds = TokenizedDataset(splits.val, tokenizer, length)
    test_ds = TokenizedDataset(splits.test, tokenizer, length)
    task = ClassificationTask(num_labels=len(splits.label_names))
    bs = cfg.train.eval_batch_size
    latency_items = [test_ds[i] for i in range(min(pcfg.latency_batch, len(test_ds)))]
    latency_batch = {k: v.to(device) for k, v in collate(latency_items).items() if k != "labels"}

    def measure(m: nn.Module) -> dict[str, Any]:
        total, nonzero = count_params(m)
        return {
            "params": total,
            "nonzero_params": nonzero,
            "val_accuracy": evaluate_dataset(m, task, val_ds, batch_size=bs, collate_fn=collate)[
                "accuracy"
            ],
            "test_accuracy": evaluate_dataset(m, task, test_ds, batch_size=bs, collate_fn=collate)[
                "accuracy"
            ],
        }

    echo(f"pruning the {where}")
    original = copy.deepcopy(model)
    before = measure(model)
    masks = prune(
        model,
        layers=pcfg.layers,
        heads=pcfg.heads,
        neurons=pcfg.neurons,
        magnitude=pcfg.magnitude,
    )
    pruned = measure(model)
    echo(
        f"pruned: {before['params']:,} -> {pruned['params']:,} parameters "
        f"({pruned['nonzero_params']:,} non-zero); test accuracy "
        f"{before['test_accuracy']:.4f} -> {pruned['test_accuracy']:.4f}"
    )
    snapshot = copy.deepcopy(model)
    recovered: dict[str, Any] | None = None
    spec = get_method(cfg.method_config().method_name)
    if pcfg.recovery_steps > 0:
        seed_everything(cfg.train.seed)
        _inject_method(model, cfg)
        if not spec.capabilities.merge and not _in_place(model):
            raise ConfigError(
                f"method.name: '{spec.name}' cannot be merged into the pruned weights after "
                "recovery; use a mergeable method (lora, ia3, bitfit, full, freeze)"
            )
        model.to(device)
        handles = mask_gradients(model, _remap_masks(model, masks))
        try:
            if spec.fit is not None:
                from deltatune.data import make_loader

                loader = make_loader(
                    train_ds, bs, shuffle=False, seed=cfg.train.seed, collate=collate
                )
                spec.fit(
                    model,
                    next(iter(_configs(model))),
                    ({k: v.to(device) for k, v in b.items()} for b in loader),
                )
            else:
                train_cfg = cfg.train.replace(
                    max_steps=pcfg.recovery_steps,
                    learning_rate=cfg.train.learning_rate or spec.default_lr,
                    early_stopping_patience=None,
                    checkpoint_every_steps=None,
                )
                fit(
                    model,
                    task,
                    augment_text_dataset(train_ds, cfg.augment, tokenizer),
                    val_ds,
                    train_cfg,
                    out,
                    collate_fn=collate,
                )
        finally:
            for h in handles:
                h.remove()
        try:
            model = unload(model, merge=True)
        except DeltatuneError:
            raise DeltatuneError(
                f"prune: the recovery method '{spec.name}' cannot be merged into the pruned "
                "weights; use a mergeable method (lora, ia3, bitfit, full, freeze)"
            ) from None
        apply_masks(model, masks)  # a merged dense delta would refill the pruned weights
        model.eval()
        recovered = measure(model)
        echo(
            f"after {pcfg.recovery_steps} recovery steps ({spec.name}): test accuracy "
            f"{recovered['test_accuracy']:.4f}"
        )
    latency = compare_latency(
        [original, snapshot, model], latency_batch, repeats=pcfg.latency_repeats
    )
    before["latency_ms"], pruned["latency_ms"] = latency[0], latency[1]
    if recovered is not None:
        recovered["latency_ms"] = latency[2]
    structure = structure_of(model)
    structure["magnitude_masked"] = int(sum(int((~m).sum()) for m in masks.values()))
    metrics = {
        "source": where,
        "prune": pcfg.to_dict(),
        "recovery_method": spec.name if recovered is not None else None,
        "before": before,
        "pruned": pruned,
        "recovered": recovered,
        "structure": structure,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(out / PRUNED_WEIGHTS, dict(model.state_dict()), metadata={"format": "pt"})
    write_json(out / PRUNE_FILE, structure)
    write_json(out / METRICS_NAME, metrics)
    source_cfg = run_cfg if pcfg.source is not None else cfg
    write_text(out / RUN_CONFIG_NAME, source_cfg.replace(output_dir=str(out)).to_yaml())
    write_json(out / LABELS_NAME, splits.label_names)
    return metrics


def _in_place(model: nn.Module) -> bool:
    from deltatune.model import state_of

    return bool(state_of(model).in_place_params)


def _configs(model: nn.Module) -> list[Any]:
    from deltatune.model import state_of

    return list(state_of(model).configs.values())


def _remap_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks keyed by the parameter names after injection (a wrapped Linear's ``base_layer``)."""
    names = {n for n, _ in model.named_parameters()}
    out = {}
    for name, mask in masks.items():
        if name in names:
            out[name] = mask
            continue
        module, _, leaf = name.rpartition(".")
        wrapped = f"{module}.base_layer.{leaf}"
        if wrapped in names:
            out[wrapped] = mask
    return out


def load_pruned(folder: str | Path) -> tuple[nn.Module, Any, list[str]]:
    """Rebuild a model written by :func:`prune_run`: ``(model, tokenizer, label names)``."""
    import json

    from safetensors.torch import load_file

    from deltatune.models import load_tokenizer
    from deltatune.run import LABELS_NAME, RUN_CONFIG_NAME, RunConfig, load_base_model

    path = Path(folder)
    for name in (PRUNE_FILE, PRUNED_WEIGHTS, RUN_CONFIG_NAME, LABELS_NAME):
        if not (path / name).is_file():
            raise DeltatuneError(
                f"'{path}' is not a pruned model folder (no {name}); give a `deltatune prune` "
                "output folder"
            )
    cfg = RunConfig.from_file(path / RUN_CONFIG_NAME)
    label_names = json.loads((path / LABELS_NAME).read_text())
    model = load_base_model(cfg, label_names)
    apply_structure(model, json.loads((path / PRUNE_FILE).read_text()))
    state = load_file(str(path / PRUNED_WEIGHTS))
    result = model.load_state_dict(state, strict=False)
    # Tied or non-persistent entries may be absent; anything else missing is corruption.
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise DeltatuneError(
            f"'{path / PRUNED_WEIGHTS}' does not fit the pruned structure (missing "
            f"{missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    return model.eval(), load_tokenizer(cfg.model), label_names
