r"""Estimate the memory and compute of one training step before training: ``deltatune estimate``.

The estimate is exact in the shapes, not in a formula: the model is built from its config on
PyTorch's ``meta`` device (no weights are read, nothing is downloaded), the method is injected
by the very code that trains it, and one forward + backward pass runs on *fake* tensors
(``torch._subclasses.FakeTensorMode``: tensors with a shape, dtype and device but no data).
Autograd's ``saved_tensors_hooks`` record every tensor kept for backward during that pass,
``torch.utils.flop_counter`` counts the matmul / attention FLOPs of forward and backward, and a
dispatch-level ledger follows every tensor's storage from allocation to release, which gives
the step's peak of live bytes. A 135M-parameter model is traced in a few seconds on one CPU core,
whatever the batch size, because fake tensors hold no data.

Memory of one step (bytes)::

    weights     = frozen parameters + buffers           (NF4: ~0.52 B/weight, int8: ~1 B + scales)
    adapter     = trainable parameters                  (full fine-tuning: the whole model)
    gradients   = trainable parameters, in their dtype
    optimizer   = AdamW: 2 x trainable (exp_avg, exp_avg_sq, same dtype) + a step scalar each;
                  paged_adamw_8bit: 2 x 1 B per element (+ fp32 absmax per 256) for tensors of
                  >= 4096 elements, 32-bit otherwise; sgd: 0; sgd_momentum: 1 x trainable
    activations = unique storages autograd saves for backward (parameters excluded), exactly
                  as deltatune.memory.count_saved counts them on a real step
    peak        = weights + adapter + optimizer + max over the step of (live working bytes),
                  read off the simulated allocation ledger
    transient   = peak - (weights + adapter + gradients + optimizer + activations): signed.
                  Positive: working buffers on top of the sum at the peak (gradients of the
                  largest activations at the start of backward, the logits the model returns,
                  the dequantised weight of a quantised layer, a recomputed block under
                  gradient checkpointing). Negative: not all of the sum is alive at once
                  (activations are freed during backward while the gradients appear)

so that ``peak`` is the allocator-level high-water mark (``torch.cuda.max_memory_allocated``
on CUDA), and ``weights + adapter + gradients + optimizer + activations`` is the counted peak
the benchmarks report on CPU (``deltatune.memory``).

Method specifics come from tracing the method's own code rather than from rules written here:
prompt and prefix methods lengthen the attention sequence by their virtual tokens, IA3 keeps its
scaled activations, LoRA keeps its input (and the dropout mask) and the rank-``r`` intermediate,
adapters keep their bottleneck activations, QLoRA keeps 4-bit codes and rebuilds a dequantised
weight per matmul.

FLOPs per step are the forward + backward FLOPs of matmuls and attention (``2·m·n·k`` per
``(m,k)@(k,n)``); backward through a frozen weight computes only the input gradient (one matmul
instead of two), which the count follows because autograd skips the weight gradient. The step
time estimate is ``FLOPs / throughput + traffic / bandwidth``: the throughput is a large float32
(bfloat16 on CUDA) matmul timed once per process on the current device; ``traffic`` is the bytes
every other op of the trace (elementwise, norms, softmax, copies, the optimizer's update; views
excluded) reads and writes, and the bandwidth a large copy timed once per process. Python and
kernel-launch overheads are not in it: it is a lower bound.

Python::

    from deltatune.estimate import estimate, max_batch_size
    e = estimate("embedded-minilm", {"name": "lora", "r": 8}, batch_size=16, seq_len=256)
    print(e.table())
    max_batch_size("embedded-smollm2", {"name": "qlora"}, 4 * 2**30, seq_len=512)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import sys
import time
import types
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.errors import ConfigError, DeltatuneError, did_you_mean
from deltatune.kernels import register_layer_norms

GiB = 2**30
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE = ("nf4", "int8")
OPTIMIZERS = ("adamw", "paged_adamw", "paged_adamw_8bit", "sgd", "sgd_momentum")
TASKS = {
    "sequence-classification": "sequence-classification",
    "seq_cls": "sequence-classification",
    "causal-lm": "causal-lm",
    "causal_lm": "causal-lm",
}
#: bitsandbytes' 8-bit optimisers keep tensors smaller than this in 32 bits (``min_8bit_size``).
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256
#: :func:`max_batch_size` takes a traced peak as the affine prediction when they differ by at
#: most this fraction of the per-example slope (gradient checkpointing's per-block share is an
#: integer division: a few bytes off the line).
AFFINE_TOLERANCE = 1e-3


# ----------------------------------------------------------------------------------------------
# result
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Estimate:
    """Memory (bytes), FLOPs and time of one training step; see the module docstring.

    ``peak = weights + adapter + optimizer + working peak`` (gradients, activations and working
    buffers alive at the worst moment) ``= counted_peak + transient``. ``transient`` is signed:
    positive when working buffers sit on top of all the counted tensors at the peak, negative
    when not all counted tensors are alive at once (full fine-tuning: the early activations
    are freed before the last gradients exist).
    """

    model: str
    method: str
    batch_size: int
    seq_len: int
    dtype: str
    quantize: str | None
    optimizer: str
    gradient_checkpointing: bool
    device: str
    total_params: int
    trainable_params: int
    #: Tokens the attention sees per example: ``seq_len`` plus the method's virtual tokens.
    attention_len: int
    weights: int
    adapter: int
    gradients: int
    optimizer_state: int
    activations: int
    transient: int
    peak: int
    flops_per_step: float
    forward_flops: float
    step_time_s: float
    device_flops_per_s: float
    #: Bytes the non-matmul ops read and write (elementwise, norms, softmax, optimizer update).
    memory_traffic: int = 0
    device_bytes_per_s: float = 0.0

    @property
    def optimizer_bytes(self) -> int:
        return self.optimizer_state

    @property
    def counted_peak(self) -> int:
        """``weights + adapter + gradients + optimizer + activations``: what
        :mod:`deltatune.memory` counts on a real step (no transient buffers)."""
        return (
            self.weights + self.adapter + self.gradients + self.optimizer_state + self.activations
        )

    @property
    def adjustment_note(self) -> str:
        """What ``transient = peak - counted_peak`` means, for its sign."""
        if self.transient >= 0:
            return (
                "at the peak: transient buffers on top of the sum (gradients of the largest "
                "activations, logits, dequantised weights, recomputed blocks)"
            )
        return (
            "at the peak: peak < sum, not all of the above are alive at once (activations "
            "are freed during backward while gradients appear)"
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["optimizer"] = self.optimizer
        out["counted_peak"] = self.counted_peak
        return out

    def table(self) -> str:
        """A human-readable breakdown."""
        head = (
            f"{self.model} + {self.method}: batch {self.batch_size} x {self.seq_len} tokens"
            + (
                f" (attention sees {self.attention_len})"
                if self.attention_len != self.seq_len
                else ""
            )
            + f", {self.dtype}"
            + (f", {self.quantize} base" if self.quantize else "")
            + f", {self.optimizer}"
            + (", gradient checkpointing" if self.gradient_checkpointing else "")
            + f", {self.device}"
        )
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        rows = [
            ("weights (frozen)", self.weights),
            ("adapter (trainable)", self.adapter),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer_state),
            ("activations", self.activations),
        ]
        lines = [
            head,
            f"parameters          {self.total_params:,} ({self.trainable_params:,} trainable, "
            f"{pct:.3f}%)",
        ]
        for name, value in rows:
            lines.append(f"{name:<20}{_fmt_bytes(value):>12}")
        lines.append(f"{'sum of the above':<20}{_fmt_bytes(self.counted_peak):>12}")
        lines.append(f"{'':<20}{_signed_bytes(self.transient):>12}   {self.adjustment_note}")
        lines.append(f"{'peak':<20}{_fmt_bytes(self.peak):>12}")
        lines.append(
            f"{'FLOPs per step':<20}{self.flops_per_step:>12.3e}   "
            f"(forward {self.forward_flops:.3e})"
        )
        matmul_s = self.flops_per_step / self.device_flops_per_s
        lines.append(
            f"{'step time':<20}{_fmt_seconds(self.step_time_s):>12}   "
            f"(matmuls {_fmt_seconds(matmul_s)} at {self.device_flops_per_s / 1e9:,.1f} GFLOP/s"
            f" + other ops {_fmt_seconds(self.step_time_s - matmul_s)} moving "
            f"{_fmt_bytes(self.memory_traffic)} at {self.device_bytes_per_s / 1e9:,.1f} GB/s, "
            f"measured on {self.device}; a lower bound)"
        )
        return "\n".join(lines)


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _signed_bytes(n: float) -> str:
    return ("+" if n >= 0 else "-") + " " + _fmt_bytes(abs(n))


def _fmt_seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


# ----------------------------------------------------------------------------------------------
# building the model on the meta device
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _ModelSpec:
    label: str
    task: str  # "sequence-classification" | "causal-lm"
    build: Callable[[], nn.Module]  # a fresh model on the meta device
    vocab_size: int
    #: A live module: with ``method=None`` its own trainable set is estimated as it is.
    from_module: bool = False


def _task_name(task_type: str | None, config: Any) -> str:
    if task_type is not None:
        key = str(task_type).lower()
        if key not in TASKS:
            raise ConfigError(
                f"task_type={task_type!r} is not known; use 'sequence-classification' (SEQ_CLS) "
                "or 'causal-lm' (CAUSAL_LM)"
            )
        return TASKS[key]
    archs = getattr(config, "architectures", None) or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return "causal-lm" if causal else "sequence-classification"


def _hf_spec(config: Any, label: str, task_type: str | None, dtype: torch.dtype) -> _ModelSpec:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    task = _task_name(task_type, config)
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    if task == "sequence-classification" and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = getattr(config, "eos_token_id", None) or 0

    def build() -> nn.Module:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with torch.device("meta"):
                model = auto.from_config(config, dtype=dtype)
        except ValueError as exc:
            raise ConfigError(
                f"model '{label}': transformers has no {task} class for this config ({exc}); "
                "pass task_type='causal-lm' or 'sequence-classification' to match the model"
            ) from None
        finally:
            hf_logging.set_verbosity(verbosity)
        return model  # type: ignore[no-any-return]

    return _ModelSpec(label, task, build, int(getattr(config, "vocab_size", 0) or 0))


def _config_for_name(name: str) -> Any:
    from transformers import AutoConfig

    from deltatune.models import resolve_model_path

    path, local_only = resolve_model_path(name)
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        if local_only:
            raise DeltatuneError(f"cannot read the config of model '{name}': {exc}") from None
    # A hub id not in the local cache: only its config.json (a few KB) is fetched, no weights.
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model '{name}': no local folder and its config.json could not be fetched ({exc}); "
            "give a local model folder, 'embedded-minilm', 'embedded-smollm2', or a config dict "
            "such as {'model_type': 'bert', 'hidden_size': 384, ...}"
        ) from None


def _module_spec(model: nn.Module, task_type: str | None) -> _ModelSpec:
    """A meta-device copy of a live module (weights are not copied)."""
    memo: dict[int, Any] = {}
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None and id(p) not in memo:
                memo[id(p)] = nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device="meta"),
                    requires_grad=p.requires_grad,
                )
        for b in mod._buffers.values():
            if b is not None and id(b) not in memo:
                memo[id(b)] = torch.empty(b.shape, dtype=b.dtype, device="meta")
    config = getattr(model, "config", None)
    task = _task_name(task_type, config) if config is not None else "sequence-classification"
    if task_type is None and type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        task = "causal-lm"

    def build() -> nn.Module:
        return copy.deepcopy(model, memo)

    vocab = int(getattr(config, "vocab_size", 0) or 0) if config is not None else 0
    return _ModelSpec(type(model).__name__, task, build, vocab, from_module=True)


def _model_spec(model: Any, task_type: str | None, dtype: torch.dtype) -> _ModelSpec:
    if isinstance(model, nn.Module):
        return _module_spec(model, task_type)
    if isinstance(model, (str, Path)):
        name = str(model)
        return _hf_spec(_config_for_name(name), name, task_type, dtype)
    if isinstance(model, Mapping):
        data = dict(model)
        if "name_or_path" in data:  # a run config's `model:` section
            task = task_type or data.get("task")
            return _hf_spec(
                _config_for_name(str(data["name_or_path"])), data["name_or_path"], task, dtype
            )
        if "model_type" not in data:
            raise ConfigError(
                "model: a config dict needs 'model_type' (e.g. {'model_type': 'llama', "
                "'hidden_size': 576, 'num_hidden_layers': 30, ...}) or 'name_or_path'"
            )
        from transformers import AutoConfig

        model_type = data.pop("model_type")
        try:
            config = AutoConfig.for_model(model_type, **data)
        except ValueError as exc:
            raise ConfigError(f"model: model_type={model_type!r} is not known: {exc}") from None
        return _hf_spec(config, f"{model_type} config", task_type, dtype)
    raise ConfigError(
        f"model: expected a model name/folder/hub id, a config dict or an nn.Module, got "
        f"{type(model).__name__}"
    )


# ----------------------------------------------------------------------------------------------
# quantised layers on meta: the real QuantLinear's buffers, a forward that fakes the dequantise
# ----------------------------------------------------------------------------------------------
def _quantize_meta(
    model: nn.Module, scheme: str, compute_dtype: str, device: torch.device, skip: set[str]
) -> None:
    """What :func:`deltatune.quant.quantize_model` does, with buffers of the exact sizes on meta."""
    from deltatune.quant.linear import (
        NF4_BLOCK,
        QuantLinear,
        nf4_scaler_block,
        resolve_compute_dtype,
    )
    from deltatune.targeting import is_conv1d, output_layer_names, set_submodule

    dtype = resolve_compute_dtype(compute_dtype, device)
    heads = output_layer_names(model)
    for name, module in list(model.named_modules()):
        if not name or not (type(module) is nn.Linear or is_conv1d(module)):
            continue
        if name in heads or name in skip or any(name.startswith(s + ".") for s in skip):
            continue
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        out_f, in_f = (int(n) for n in weight.shape)
        if is_conv1d(module):
            out_f, in_f = in_f, out_f
        n = out_f * in_f
        if scheme == "nf4" and n % NF4_BLOCK:
            continue
        bias = getattr(module, "bias", None)
        layer = QuantLinear(
            in_f,
            out_f,
            scheme,  # type: ignore[arg-type]
            dtype,
            None if bias is None else torch.empty_like(bias),
        )
        meta = torch.device("meta")
        if scheme == "nf4":
            blocks = n // NF4_BLOCK
            layer.scaler_block_size = nf4_scaler_block(blocks)
            layer.register_buffer(
                "quantized_data", torch.empty(n // 2, dtype=torch.uint8, device=meta)
            )
            layer.register_buffer(
                "quantized_scalers", torch.empty(blocks, dtype=torch.int8, device=meta)
            )
            n_factors = blocks // layer.scaler_block_size
            # torchao keeps a lone factor as a view of its (blocks,) intermediate.
            factor_storage = blocks if n_factors == 1 else n_factors
            layer.register_buffer(
                "quantization_factor",
                torch.empty(factor_storage, dtype=torch.float32, device=meta)[:n_factors],
            )
            layer.register_buffer("scaler_mean", torch.empty((), dtype=torch.float32, device=meta))
            layer.register_buffer(
                "nf4_code", torch.empty(16, dtype=torch.float32, device=meta), persistent=False
            )
        else:
            layer.register_buffer(
                "qweight", torch.empty(out_f, in_f, dtype=torch.int8, device=meta)
            )
            layer.register_buffer(
                "weight_scale", torch.empty(out_f, dtype=torch.float32, device=meta)
            )
        set_submodule(model, name, layer)


# ----------------------------------------------------------------------------------------------
# the fake trace
# ----------------------------------------------------------------------------------------------
def _fake_mode_class() -> type:
    from torch._subclasses.fake_tensor import FakeTensorMode

    class _ShapeOnlyMode(FakeTensorMode):
        """Fake tensors whose ``.item()`` answers a neutral value instead of raising.

        Models and methods read a few scalars that do not change any shape: a dropout seed,
        a position-limit check, "is the mask all ones", AdamW's step count. True / 0 / 1.0
        take the common path (no padding, position 0, seed 0, a non-zero step).
        """

        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            if func is torch.ops.aten._local_scalar_dense.default:
                t = args[0]
                if t.dtype == torch.bool:
                    return True
                return 1.0 if t.is_floating_point() else 0
            return super().__torch_dispatch__(func, types, args, kwargs)

    return _ShapeOnlyMode


class _Ledger:
    """Live bytes of the storages created during the traced step, with their high-water mark.

    Every op output is registered once per storage; a storage is released when the last
    tensor object on it dies (``weakref.finalize``), as the caching allocator would see it.
    Storages in ``exclude`` (weights, the input batch) are not working memory.
    """

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        #: Key lengths the attention ops saw (virtual tokens lengthen them).
        self.key_lengths: list[int] = []
        #: Bytes read + written by the ops that are not matmuls / attention (elementwise,
        #: norms, softmax, copies, the optimizer's updates); views move nothing.
        self.traffic = 0
        self.live = 0
        self.peak = 0
        self._refs: dict[int, int] = {}
        self._bytes: dict[int, int] = {}

    def add(self, t: torch.Tensor, aliases: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or _is_wrapper_subclass(t):
            return
        try:
            storage = t.untyped_storage()
        except (NotImplementedError, RuntimeError):
            return
        key = storage._cdata
        if key in aliases and key not in self._bytes:
            self.exclude.add(key)
        if key in self.exclude:
            return
        if key not in self._bytes:
            self._bytes[key] = storage.nbytes()
            self._refs[key] = 0
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._refs[key] += 1
        weakref.finalize(t, self._drop, key)

    def _drop(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            self.live -= self._bytes.pop(key)
            del self._refs[key]


def _ledger_mode(ledger: _Ledger, compute_ops: set[Any] = frozenset()) -> Any:  # type: ignore[assignment]
    """The dispatch mode that feeds ``ledger``: storages, key lengths and memory traffic
    (bytes read + written by every op outside ``compute_ops``, the FLOP-counted ones)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    def plain_tensors(values: Any) -> list[torch.Tensor]:
        return [
            t
            for t in tree_flatten(values)[0]
            if isinstance(t, torch.Tensor) and t.layout == torch.strided
        ]

    def nbytes(tensors: list[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if not _is_wrapper_subclass(t))

    class _LedgerMode(TorchDispatchMode):
        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            kwargs = kwargs or {}
            if "scaled_dot_product" in func.__name__ and len(args) > 1:
                ledger.key_lengths.append(int(args[1].shape[-2]))  # (batch, heads, keys, dim)
            out = func(*args, **kwargs)
            ins, outs = plain_tensors((args, kwargs)), plain_tensors(out)
            if func.overloadpacket not in compute_ops and not func.is_view:
                ledger.traffic += nbytes(ins) + nbytes(outs)
            # An output on an input's storage (a view, an in-place update) allocates nothing;
            # if that storage predates the ledger (weights, optimizer state) it is not working
            # memory at all.
            inputs = set()
            for t in ins:
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    inputs.add(t.untyped_storage()._cdata)
            for t in outs:
                ledger.add(t, aliases=inputs)
            return out

    return _LedgerMode()


@dataclasses.dataclass
class _Trace:
    saved: int
    forward_flops: float
    total_flops: float
    working_peak: int  # high-water mark of live non-weight bytes during forward+backward+step
    attention_len: int
    weights: int
    adapter: int
    gradients: int
    total_params: int
    trainable_params: int
    trainable_shapes: list[tuple[int, int]]
    traffic: int


def _fakeify(model: nn.Module, mode: Any, device: torch.device) -> None:
    """Replace every meta parameter / buffer by a fake tensor on ``device`` (ties kept)."""
    conv = mode.fake_tensor_converter
    memo: dict[int, Any] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in memo:
                fake = conv.from_meta_and_device(mode, p.data, device)
                memo[id(p)] = nn.Parameter(fake, requires_grad=p.requires_grad)
            module._parameters[name] = memo[id(p)]
        for name, b in list(module._buffers.items()):
            if b is None:
                continue
            if id(b) not in memo:
                memo[id(b)] = conv.from_meta_and_device(mode, b, device)
            module._buffers[name] = memo[id(b)]


def _is_wrapper_subclass(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return type(t) not in (torch.Tensor, nn.Parameter) and not isinstance(t, FakeTensor)


def _storage_bytes(tensors: Sequence[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s._cdata] = s.nbytes()
    return sum(seen.values())


def task_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], task: str) -> torch.Tensor:
    """The loss deltatune's trainer computes for ``task`` (its ClassificationTask /
    CausalLMTask): the model's output is dropped once the loss is taken, as in training."""
    if task == "causal-lm":
        from deltatune.lm.task import CausalLMTask

        return CausalLMTask().loss(model, batch)
    from deltatune.train.trainer import ClassificationTask

    return ClassificationTask().loss(model, batch)


def _batch(task: str, batch_size: int, seq_len: int, vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, max(vocab, 2), (batch_size, seq_len))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "causal-lm":
        batch["labels"] = ids.clone()
    else:
        batch["labels"] = torch.zeros(batch_size, dtype=torch.long)
    return batch


def _build(
    spec: _ModelSpec,
    method: Mapping[str, Any] | None,
    *,
    dtype: torch.dtype,
    quantize: str | None,
    gradient_checkpointing: bool,
    device: torch.device,
) -> tuple[nn.Module, str, int]:
    """The meta model with the method injected (and the base quantised), the method's name and
    its number of virtual tokens (prompt / prefix methods)."""
    from deltatune.model import inject

    model = spec.build()
    if dtype != torch.float32:
        model.to(dtype)
    if method is None and spec.from_module:
        method_name = "as given"
        virtual = 0
    else:
        method_cfg = _method_config(method, spec)
        method_name = str(method_cfg.method_name)
        virtual = int(getattr(method_cfg, "num_virtual_tokens", 0) or 0)
        scheme = quantize or getattr(method_cfg, "quantize", None)
        if scheme is not None:
            if method_name in ("full", "freeze"):
                raise ConfigError(
                    f"quantize={scheme} freezes the linear weights in 4/8 bits, but method "
                    f"{method_name} trains base weights in place; use method qlora or lora on a "
                    "quantised base, or quantize=None"
                )
            skip = set(_as_list(getattr(method_cfg, "modules_to_save", None)))
            compute = str(getattr(method_cfg, "compute_dtype", "auto"))
            _quantize_meta(model, scheme, compute, device, skip)
        inject(model, method_cfg)
    if gradient_checkpointing:
        from deltatune.quant.paged import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    model.train()
    return model, method_name, virtual


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _trace_step(
    model: nn.Module,
    spec: _ModelSpec,
    *,
    batch_size: int,
    seq_len: int,
    optimizer: str,
    device: torch.device,
    virtual_tokens: int = 0,
) -> _Trace:
    """One fake forward + backward + optimizer step of ``model`` (a meta model, consumed)."""
    from torch.utils.flop_counter import FlopCounterMode

    mode = _fake_mode_class()(allow_non_fake_inputs=True)
    _fakeify(model, mode, device)
    # The LoRA kernels rebuild a registered LayerNorm's output instead of keeping it; the fake
    # weights are new tensors, registered as the real ones were at injection.
    register_layer_norms(model)
    stack = contextlib.ExitStack()
    stack.enter_context(_masks_as_for_real_tensors())
    params = list({id(p): p for p in model.parameters()}.values())
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ConfigError(
            "the method leaves nothing trainable in this model; nothing to estimate for training"
        )
    static = [*params, *model.buffers()]
    weights_all = _storage_bytes(static)
    adapter = _storage_bytes(trainable)
    exclude = {t.untyped_storage()._cdata for t in static}
    saved: dict[int, int] = {}

    def visit(t: torch.Tensor) -> None:
        flatten = getattr(t, "__tensor_flatten__", None)
        if _is_wrapper_subclass(t) and callable(flatten):
            for name in flatten()[0]:  # e.g. torchao's NF4Tensor: its codes and constants
                visit(getattr(t, name))
        elif t.layout == torch.strided:
            s = t.untyped_storage()
            if s._cdata not in exclude:
                saved[s._cdata] = max(saved.get(s._cdata, 0), s.nbytes())

    def pack(t: torch.Tensor) -> torch.Tensor:
        visit(t)
        return t

    with mode:
        batch = {
            k: v.to(device)
            for k, v in _batch(spec.task, batch_size, seq_len, spec.vocab_size).items()
        }
        ledger = _Ledger(exclude | {t.untyped_storage()._cdata for t in batch.values()})
        opt = _make_optimizer(trainable, optimizer, foreach=device.type == "cuda")
        counter = FlopCounterMode(display=False)
        compute_ops = set(counter.flop_registry)
        with counter:
            with _ledger_mode(ledger, compute_ops):
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss = task_loss(model, batch, spec.task)
                forward_flops = float(counter.get_total_flops())
                loss.backward()
                del loss
            total_flops = float(counter.get_total_flops())
        if opt is not None:
            # The optimizer state exists in a steady-state step: create it outside the ledger
            # (it is counted as optimizer state), then trace a second step's temporaries.
            opt.step()
            with _ledger_mode(ledger, compute_ops):
                opt.step()
                opt.zero_grad(set_to_none=True)
    stack.close()
    from deltatune.model import trainable_report

    report = trainable_report(model)
    return _Trace(
        saved=sum(saved.values()),
        forward_flops=forward_flops,
        total_flops=total_flops,
        working_peak=ledger.peak,
        attention_len=max([seq_len + virtual_tokens, *ledger.key_lengths]),
        weights=weights_all - adapter,
        adapter=adapter,
        gradients=adapter,
        # A quantised layer's packed codes are buffers: count the weights they stand for, as
        # deltatune.trainable_report does, so the totals match the float model's.
        total_params=report.total,
        trainable_params=report.trainable,
        trainable_shapes=[(p.numel(), p.element_size()) for p in trainable],
        traffic=ledger.traffic,
    )


@contextlib.contextmanager
def _masks_as_for_real_tensors() -> Iterator[None]:
    """Let transformers take the path it takes for a real all-ones attention mask.

    transformers treats a fake tensor like a torch.compile trace and then always builds the
    full ``(batch, 1, q, k)`` mask (and repeats the key/value heads for grouped-query
    attention). With real tensors and no padding it skips the mask and lets SDPA apply
    ``is_causal`` on the grouped heads, which saves less for backward. Only the fake-tensor
    test is switched off here; compile / jit / export tracing are still seen.
    """
    try:
        from transformers import masking_utils
        from transformers.utils import import_utils
    except ImportError:
        yield
        return
    original = masking_utils.is_tracing

    def is_tracing(tensor: Any = None) -> bool:
        return bool(import_utils.is_tracing(None))

    masking_utils.is_tracing = is_tracing
    try:
        yield
    finally:
        masking_utils.is_tracing = original


def _num_blocks(model: nn.Module) -> int:
    """Transformer blocks (the units gradient checkpointing recomputes)."""
    config = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return 1


def _make_optimizer(
    params: list[nn.Parameter], name: str, foreach: bool | None = None
) -> torch.optim.Optimizer | None:
    """A torch optimizer whose step temporaries stand for ``name``'s (paged: AdamW's).

    ``foreach=None`` is torch's default (the multi-tensor kernels on CUDA, a per-tensor loop on
    CPU); the trace passes the choice explicitly because torch cannot read it off fake tensors.
    """
    if name in ("adamw", "paged_adamw", "paged_adamw_8bit"):
        return torch.optim.AdamW(params, lr=1e-4, foreach=foreach)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9, foreach=foreach)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-2, foreach=foreach)
    raise ConfigError(f"optimizer={name!r} is not one of {', '.join(OPTIMIZERS)}")


def _method_config(method: Mapping[str, Any] | None, spec: _ModelSpec) -> Any:
    from deltatune.registry import config_from_dict

    data = dict(method) if method is not None else {"name": "full"}
    if "name" not in data:
        raise ConfigError(
            "method: missing 'name' (e.g. {'name': 'lora', 'r': 8}; `deltatune methods` lists them)"
        )
    cfg = config_from_dict(data, where="method")
    if (
        spec.task == "sequence-classification"
        and getattr(cfg, "task_type", "x") is None
        and "modules_to_save" in cfg.field_types()
    ):
        cfg = cfg.replace(task_type="SEQ_CLS")
    return cfg


def optimizer_state_bytes(trainable: list[tuple[int, int]], optimizer: str) -> int:
    """Optimizer state for trainable tensors given as ``(numel, element_size)`` pairs.

    AdamW (torch, paged bitsandbytes): ``exp_avg`` and ``exp_avg_sq`` like the parameter, and
    a float32 ``step`` scalar per tensor. ``paged_adamw_8bit``: two uint8 moments plus a float32
    absmax per block of 256 for tensors of at least 4096 elements (bitsandbytes' default),
    32-bit moments below that. ``sgd``: none; ``sgd_momentum``: one buffer like the parameter.
    """
    total = 0
    for numel, size in trainable:
        if optimizer in ("adamw", "paged_adamw"):
            total += 2 * numel * size + 4
        elif optimizer == "paged_adamw_8bit":
            if numel >= BNB_MIN_8BIT_SIZE:
                total += 2 * (numel + 4 * math.ceil(numel / BNB_BLOCK)) + 4
            else:
                total += 2 * numel * 4 + 4
        elif optimizer == "sgd_momentum":
            total += numel * size
        elif optimizer != "sgd":
            raise ConfigError(f"optimizer={optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    return total


# ----------------------------------------------------------------------------------------------
# device throughput
# ----------------------------------------------------------------------------------------------
_THROUGHPUT: dict[str, float] = {}


def device_throughput(device: str | torch.device | None = None) -> float:
    """Measured matmul FLOP/s of ``device`` (float32 on CPU, bfloat16 on CUDA); cached."""
    dev = torch.device(device) if device is not None else _current_device()
    key = str(dev)
    if key not in _THROUGHPUT:
        n = 1024 if dev.type == "cpu" else 4096
        dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        best = math.inf
        for _ in range(4):
            _sync(dev)
            t0 = time.perf_counter()
            (a @ b).sum()
            _sync(dev)
            best = min(best, time.perf_counter() - t0)
        _THROUGHPUT[key] = 2.0 * n**3 / best
    return _THROUGHPUT[key]


_BANDWIDTH: dict[str, float] = {}


def device_bandwidth(device: str | torch.device | None = None) -> float:
    """Measured memory bandwidth of ``device`` in bytes/s: a 64 MiB (CUDA: 1 GiB) copy reads
    and writes ``2 x size`` bytes; best of 4; cached per process."""
    dev = torch.device(device) if device is not None else _current_device()
    key = str(dev)
    if key not in _BANDWIDTH:
        size = 2**26 if dev.type == "cpu" else 2**30
        src = torch.ones(size, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        best = math.inf
        for _ in range(4):
            _sync(dev)
            t0 = time.perf_counter()
            dst.copy_(src)
            _sync(dev)
            best = min(best, time.perf_counter() - t0)
        _BANDWIDTH[key] = 2.0 * size / best
    return _BANDWIDTH[key]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _current_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def _check_args(
    batch_size: int, seq_len: int, dtype: str, quantize: str | None, optimizer: str
) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer (e.g. 8)")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ConfigError(f"seq_len={seq_len!r} must be a positive integer (e.g. 128)")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise ConfigError(
            f"quantize={quantize!r} is not one of {', '.join(QUANTIZE)} (or None for a float base)"
        )
    if optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"optimizer={optimizer!r} is not one of {', '.join(OPTIMIZERS)}"
            + did_you_mean(optimizer, OPTIMIZERS)
        )


def estimate(
    model: Any,
    method: Mapping[str, Any] | None = None,
    *,
    batch_size: int = 8,
    seq_len: int = 128,
    dtype: str = "float32",
    quantize: str | None = None,
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    task_type: str | None = None,
    device: str | torch.device | None = None,
) -> Estimate:
    """Memory, FLOPs and time of one training step of ``model`` with ``method``.

    Args:
        model: a model name (``"embedded-minilm"``, ``"embedded-smollm2"``), a local folder, a
            hub id (only its config.json is read), a config dict (``{"model_type": "llama",
            ...}`` or a run config's ``model:`` section), or an ``nn.Module`` (its weights are
            not copied).
        method: a method config as in a YAML ``method:`` section (``{"name": "lora", "r": 8}``);
            ``None`` is full fine-tuning (for an ``nn.Module``: its trainable set as it is).
        batch_size, seq_len: examples per step and tokens per example.
        dtype: the weights' dtype (``float32``, ``bfloat16``, ``float16``).
        quantize: ``"nf4"`` / ``"int8"`` base (QLoRA's; method ``qlora`` implies its own).
        optimizer: ``adamw``, ``paged_adamw``, ``paged_adamw_8bit``, ``sgd``, ``sgd_momentum``.
        gradient_checkpointing: recompute each block in backward.
        task_type: ``"sequence-classification"`` or ``"causal-lm"``; ``None`` reads it from the
            model's architecture.
        device: where the step would run; default CUDA when available, else CPU.
    """
    _check_args(batch_size, seq_len, dtype, quantize, optimizer)
    dev = torch.device(device) if device is not None else _current_device()
    memo = _memo_for(
        model, method, seq_len, dtype, quantize, optimizer, gradient_checkpointing, task_type, dev
    )
    if memo is not None and batch_size in memo:
        return dataclasses.replace(memo[batch_size])
    result = _estimate(
        model,
        method,
        batch_size,
        seq_len,
        dtype,
        quantize,
        optimizer,
        gradient_checkpointing,
        task_type,
        dev,
    )
    if memo is not None:
        memo[batch_size] = dataclasses.replace(result)
    return result


#: Estimates already traced in this process (model given by name/config): by every argument
#: but the batch size, then by the batch size (max_batch_size reuses the traced ones).
_MEMO: dict[str, dict[int, Estimate]] = {}


def _memo_for(
    model: Any,
    method: Mapping[str, Any] | None,
    seq_len: int,
    dtype: str,
    quantize: str | None,
    optimizer: str,
    gradient_checkpointing: bool,
    task_type: str | None,
    dev: torch.device,
) -> dict[int, Estimate] | None:
    """The memo of estimates with these settings, by batch size (None for a live module)."""
    if isinstance(model, nn.Module):
        return None
    settings = [seq_len, dtype, quantize, optimizer, gradient_checkpointing]
    key = json.dumps(
        [str(model) if isinstance(model, Path) else model, method, settings, task_type, str(dev)],
        sort_keys=True,
        default=str,
    )
    return _MEMO.setdefault(key, {})


def _estimate(
    model: Any,
    method: Mapping[str, Any] | None,
    batch_size: int,
    seq_len: int,
    dtype: str,
    quantize: str | None,
    optimizer: str,
    gradient_checkpointing: bool,
    task_type: str | None,
    dev: torch.device,
) -> Estimate:
    torch_dtype = getattr(torch, dtype)
    spec = _model_spec(model, task_type, torch_dtype)
    built, method_name, virtual = _build(
        spec,
        method,
        dtype=torch_dtype,
        quantize=quantize,
        gradient_checkpointing=gradient_checkpointing,
        device=dev,
    )
    trace = _trace_step(
        built,
        spec,
        batch_size=batch_size,
        seq_len=seq_len,
        optimizer=optimizer,
        device=dev,
        virtual_tokens=virtual,
    )
    optimizer_bytes = optimizer_state_bytes(trace.trainable_shapes, optimizer)
    counted = trace.weights + trace.adapter + trace.gradients + optimizer_bytes + trace.saved
    peak = trace.weights + trace.adapter + optimizer_bytes + trace.working_peak
    if gradient_checkpointing:
        # For some models (BERT) the fake trace does not see the recomputed blocks released
        # one by one (its ledger keeps them all), so the ledger is an upper bound here. A
        # model from a second trace without checkpointing caps it: the kept block inputs,
        # plus one block recomputed (its share of the full activations), plus the transient
        # buffers seen without checkpointing. Where the ledger does see the releases (LLaMA)
        # it is exact and the lower of the two. The step without checkpointing is its own
        # estimate (memoised: advise and max_batch_size often ask for it as well).
        full = estimate(
            model,
            method,
            batch_size=batch_size,
            seq_len=seq_len,
            dtype=dtype,
            quantize=quantize,
            optimizer=optimizer,
            gradient_checkpointing=False,
            task_type=task_type,
            device=dev,
        )
        blocks = max(_num_blocks(built), 1)
        transient_plain = full.peak - full.counted_peak
        recompute = max(full.activations - trace.saved, 0) // blocks
        peak = min(peak, counted + recompute + max(transient_plain, 0))
    throughput = device_throughput(dev)
    bandwidth = device_bandwidth(dev)
    return Estimate(
        model=spec.label,
        method=method_name,
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=dtype,
        quantize=quantize
        or (getattr(_method_config(method, spec), "quantize", None) if method else None),
        optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing,
        device=str(dev),
        total_params=trace.total_params,
        trainable_params=trace.trainable_params,
        attention_len=trace.attention_len,
        weights=trace.weights,
        adapter=trace.adapter,
        gradients=trace.gradients,
        optimizer_state=optimizer_bytes,
        activations=trace.saved,
        transient=peak - counted,
        peak=peak,
        flops_per_step=trace.total_flops,
        forward_flops=trace.forward_flops,
        step_time_s=trace.total_flops / throughput + trace.traffic / bandwidth,
        device_flops_per_s=throughput,
        memory_traffic=trace.traffic,
        device_bytes_per_s=bandwidth,
    )


def max_batch_size(
    model: Any,
    method: Mapping[str, Any] | None,
    budget_bytes: int,
    *,
    seq_len: int = 128,
    dtype: str = "float32",
    quantize: str | None = None,
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    task_type: str | None = None,
    device: str | torch.device | None = None,
    limit: int = 1 << 16,
) -> int:
    """The largest batch size ``b <= limit`` whose estimated peak fits in ``budget_bytes``
    (0 if batch 1 does not fit), consistent with :func:`estimate`: ``estimate(b).peak <=
    budget_bytes < estimate(b + 1).peak``.

    The peak is affine in the batch size, ``peak(b) = peak(1) + (b - 1)·s``: weights,
    gradients and optimizer state do not depend on ``b``, and every activation and transient
    buffer has ``b`` as a factor. Two traced batch sizes (1 and 2, or 1 and the largest one
    already traced with these settings, e.g. the planned batch) give ``s`` and the candidate
    ``c = 1 + ⌊(budget - peak(1)) / s⌋``; one more trace verifies it. When the traced
    ``peak(c)`` is the affine prediction (within :data:`AFFINE_TOLERANCE` of ``s``) and
    ``peak(c) + s`` exceeds the budget by more than that tolerance, ``c`` is the answer (three
    estimates, fewer when some are memoised; each is one trace, two with checkpointing). Otherwise (a peak that moves from one phase
    of the step to another as the batch grows, or a budget within the tolerance of a
    boundary) a bracketed search goes on with secant guesses between traced points (bisection
    when they stall) until two adjacent batch sizes are traced, one fitting and one not.
    """
    if budget_bytes <= 0:
        raise ConfigError(f"budget_bytes={budget_bytes!r} must be positive (e.g. 4 * 2**30)")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ConfigError(f"limit={limit!r} must be a positive integer (e.g. 65536)")
    _check_args(1, seq_len, dtype, quantize, optimizer)
    kwargs: dict[str, Any] = dict(
        seq_len=seq_len,
        dtype=dtype,
        quantize=quantize,
        optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing,
        task_type=task_type,
        device=device,
    )
    dev = torch.device(device) if device is not None else _current_device()
    memo = _memo_for(
        model, method, seq_len, dtype, quantize, optimizer, gradient_checkpointing, task_type, dev
    )
    traced: dict[int, int] = {b: e.peak for b, e in (memo or {}).items() if b <= limit}

    def peak(b: int) -> int:
        if b not in traced:
            traced[b] = estimate(model, method, batch_size=b, **kwargs).peak
        return traced[b]

    if peak(1) > budget_bytes:
        return 0
    if limit == 1:
        return 1
    anchor = max(traced) if max(traced) > 1 else 2
    slope = max((peak(anchor) - peak(1)) / (anchor - 1), 1.0)
    tolerance = AFFINE_TOLERANCE * slope

    def guess(a: int, b: int) -> int:
        """The largest batch the line through traced batches ``a < b`` says fits."""
        s = max((peak(b) - peak(a)) / (b - a), 1.0)
        return a + math.floor((budget_bytes - peak(a)) / s)

    def bracket() -> tuple[int, int]:
        """(largest traced batch that fits, smallest traced batch that does not; 0: none)."""
        over = [b for b, p in traced.items() if p > budget_bytes]
        fails = min(over) if over else 0
        fits = max(b for b, p in traced.items() if p <= budget_bytes and (not fails or b < fails))
        return fits, fails

    candidate = 1 + math.floor((budget_bytes - peak(1)) / slope)
    fits, fails = bracket()
    while not (fits == limit or (fails and fails == fits + 1)):
        width = (fails or limit + 1) - fits
        candidate = min(max(candidate, fits + 1), fails - 1 if fails else limit)
        verifies = candidate not in traced and candidate != anchor
        if peak(candidate) <= budget_bytes:
            predicted = peak(1) + (candidate - 1) * slope
            if (
                verifies
                and abs(peak(candidate) - predicted) <= tolerance
                and peak(candidate) + slope - tolerance > budget_bytes
            ):
                return candidate  # the affine model, verified at the answer
        fits, fails = bracket()
        if fails and fails > fits + 1:
            candidate = guess(fits, fails)  # interpolate inside the bracket
            if (fails - fits) * 2 > width:  # the secant stalls: bisect
                candidate = (fits + fails) // 2
        else:  # nothing traced fails yet: extrapolate from the two largest traced batches
            below = max(b for b in traced if b < fits) if fits > 1 else 1
            candidate = guess(below, fits) if below < fits else fits + 1
    return fits


# ----------------------------------------------------------------------------------------------
# measuring a real step (calibration, and the checks in bench/estimate_check.py)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Measured:
    """One real training step: counted bytes (as :mod:`deltatune.memory`) and the allocator peak.

    ``allocator_peak``: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the high-water mark
    of the allocations and frees the PyTorch profiler records (``profile_memory=True``) on top of
    the bytes already held (weights, optimizer state). ``counted_peak``: weights + gradients +
    optimizer state + saved activations.
    """

    weights: int
    adapter: int
    gradients: int
    optimizer_state: int
    activations: int
    counted_peak: int
    allocator_peak: int
    step_time_s: float


def build_real(
    model: Any,
    method: Mapping[str, Any] | None = None,
    *,
    dtype: str = "float32",
    quantize: str | None = None,
    gradient_checkpointing: bool = False,
    task_type: str | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> tuple[nn.Module, str, int]:
    """The real model (random weights from its config, same shapes as the pretrained ones) with
    the method injected, on ``device``: what ``--calibrate`` runs. Returns (model, task, vocab)."""
    from deltatune.model import inject

    dev = torch.device(device) if device is not None else _current_device()
    torch_dtype = getattr(torch, dtype)
    if isinstance(model, nn.Module):
        spec = _module_spec(model, task_type)
        real = model
    else:
        spec = _model_spec(model, task_type, torch_dtype)
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        cfg = _spec_config(model, task_type)
        auto = (
            AutoModelForCausalLM if spec.task == "causal-lm" else AutoModelForSequenceClassification
        )
        torch.manual_seed(seed)
        real = auto.from_config(cfg, dtype=torch_dtype)
    real.to(dev)
    if not (method is None and spec.from_module):
        method_cfg = _method_config(method, spec)
        if quantize is not None:
            from deltatune.quant import quantize_model

            quantize_model(real, quantize)  # type: ignore[arg-type]
        inject(real, method_cfg)
    if gradient_checkpointing:
        from deltatune.quant.paged import enable_gradient_checkpointing

        enable_gradient_checkpointing(real)
    real.train()
    return real, spec.task, spec.vocab_size


def _spec_config(model: Any, task_type: str | None) -> Any:
    from transformers import AutoConfig

    if isinstance(model, Mapping):
        data = dict(model)
        if "name_or_path" in data:
            return _config_for_name(str(data["name_or_path"]))
        model_type = data.pop("model_type")
        config = AutoConfig.for_model(model_type, **data)
    else:
        config = _config_for_name(str(model))
    if (
        _task_name(task_type, config) == "sequence-classification"
        and getattr(config, "pad_token_id", None) is None
    ):
        config.pad_token_id = getattr(config, "eos_token_id", None) or 0
    return config


def _profiled_peak(run: Callable[[], None]) -> int:
    """High-water mark of CPU bytes allocated (minus freed) while ``run`` executes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    results = prof.profiler.kineto_results if prof.profiler is not None else None
    if results is None:
        return 0
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure_step(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    optimizer: str = "adamw",
    *,
    task: str = "sequence-classification",
    time_steps: int = 1,
) -> Measured:
    """Run real training steps of ``model`` on ``batch`` and measure one (see :class:`Measured`).

    A first step creates the optimizer state (a steady-state step has it); the next is counted
    and its allocator peak taken; ``time_steps`` more are timed (median).
    """
    from deltatune.memory import count_saved, model_storages, unique_bytes

    params = list({id(p): p for p in model.parameters()}.values())
    trainable = [p for p in params if p.requires_grad]
    opt = _make_optimizer(trainable, optimizer)
    if optimizer.startswith("paged"):
        from deltatune.quant.paged import build_named_optimizer

        opt = build_named_optimizer(optimizer, [{"params": trainable}], 1e-4)
    dev = trainable[0].device

    def step() -> None:
        loss = task_loss(model, batch, task)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()
    weights = unique_bytes([*params, *model.buffers()])
    adapter = unique_bytes(trainable)
    state = [
        t
        for s in (opt.state.values() if opt is not None else [])
        for t in s.values()
        if isinstance(t, torch.Tensor)
    ]
    opt_bytes = unique_bytes(state) if state else 0
    with count_saved(model_storages(model)) as seen:
        loss = task_loss(model, batch, task)
    loss.backward()
    del loss
    grads = unique_bytes([p.grad for p in trainable if p.grad is not None])
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    activations = sum(seen.values())
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        step()
        torch.cuda.synchronize(dev)
        working = torch.cuda.max_memory_allocated(dev) - base
    else:
        working = _profiled_peak(step)
    times = []
    for _ in range(max(time_steps, 1)):
        _sync(dev)
        t0 = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    times.sort()
    return Measured(
        weights=weights - adapter,
        adapter=adapter,
        gradients=grads,
        optimizer_state=opt_bytes,
        activations=activations,
        counted_peak=weights + grads + opt_bytes + activations,
        allocator_peak=weights + opt_bytes + working,
        step_time_s=times[len(times) // 2],
    )


def real_batch(
    task: str, batch_size: int, seq_len: int, vocab: int, device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A random batch of token ids (and labels) like the one the estimate traces."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, max(vocab, 2), (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = (
        ids.clone() if task == "causal-lm" else torch.zeros(batch_size, dtype=torch.long)
    )
    return {k: v.to(device) for k, v in batch.items()}


def calibrate(
    model: Any,
    method: Mapping[str, Any] | None = None,
    *,
    batch_size: int = 8,
    seq_len: int = 128,
    dtype: str = "float32",
    quantize: str | None = None,
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    task_type: str | None = None,
    device: str | torch.device | None = None,
) -> tuple[Estimate, Measured]:
    """The estimate and one real step measured on the current device (random weights of the
    same shapes: memory and time do not depend on the values)."""
    est = estimate(
        model,
        method,
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=dtype,
        quantize=quantize,
        optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing,
        task_type=task_type,
        device=device,
    )
    dev = torch.device(est.device)
    real, task, vocab = build_real(
        model,
        method,
        dtype=dtype,
        quantize=quantize,
        gradient_checkpointing=gradient_checkpointing,
        task_type=task_type,
        device=dev,
    )
    measured = measure_step(
        real, real_batch(task, batch_size, seq_len, vocab, dev), optimizer, task=task
    )
    return est, measured


# ----------------------------------------------------------------------------------------------
# command line: deltatune estimate
# ----------------------------------------------------------------------------------------------
def add_parser(sub: Any) -> None:
    """Register ``deltatune estimate`` on the CLI's subparsers."""
    p = sub.add_parser(
        "estimate",
        help="memory (weights, grads, optimizer, activations), FLOPs and time of a training step",
        description=(
            "Estimate one training step without loading weights: the model is built on the meta "
            "device and traced with fake tensors. Give a run config (its model, method, "
            "train.batch_size, data.max_length, ...) or --model/--method and method.key=value."
        ),
    )
    p.add_argument("config", nargs="?", help="a run config YAML (optional)")
    p.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. method.r=8 (with a config: any key)"
    )
    p.add_argument("--model", help="embedded-minilm, embedded-smollm2, a model folder or hub id")
    p.add_argument("--method", help="a registered method name (default: the run default, LoRA)")
    p.add_argument("--batch-size", type=int, help="examples per step (default 8)")
    p.add_argument("--seq-len", type=int, help="tokens per example (default 128)")
    p.add_argument("--dtype", choices=DTYPES, help="weights dtype (default float32)")
    p.add_argument("--quantize", choices=QUANTIZE, help="quantised base (QLoRA's)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="optimizer (default adamw)")
    p.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute each block in backward"
    )
    p.add_argument("--task", choices=["sequence-classification", "causal-lm"], help="model head")
    p.add_argument("--device", help="device to estimate for (default: cuda if present, else cpu)")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="also run one real step (random weights, same shapes) and print estimated vs measured",
    )
    p.add_argument(
        "--fit-gib",
        type=float,
        help="print the largest batch size whose peak fits in this many GiB",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_estimate)


def _cli_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Resolve (config file, overrides, flags) into estimate()'s arguments."""
    from deltatune.config import apply_overrides

    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path and not Path(config_path).exists():
        overrides.insert(0, config_path)
        config_path = None
    settings: dict[str, Any] = {}
    if config_path is not None:
        from deltatune.run import load_run_config

        cfg = load_run_config(config_path, overrides)
        settings = {
            "model": cfg.model.name_or_path,
            "method": dict(cfg.method),
            "batch_size": cfg.train.batch_size,
            "seq_len": cfg.data.max_length,
            "dtype": cfg.model.dtype,
            "quantize": cfg.model.quantize,
            "optimizer": cfg.train.optimizer,
            "gradient_checkpointing": cfg.train.gradient_checkpointing,
            "task_type": cfg.model.task,
        }
    else:
        from deltatune.run import default_method

        data = apply_overrides({"method": {}}, overrides)
        unknown = [k for k in data if k != "method"]
        if unknown:
            raise ConfigError(
                f"override '{unknown[0]}...': without a config file only method.<key>=value "
                "overrides apply; use --model, --batch-size, --seq-len, --dtype, --quantize, "
                "--optimizer (or give a run config YAML)"
            )
        method = dict(data["method"])
        if args.method is not None:
            method["name"] = args.method
        if "name" not in method:
            method = {**default_method(), **method}
        settings = {"model": "embedded-minilm", "method": method}
    flags = {
        "model": args.model,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "dtype": args.dtype,
        "quantize": args.quantize,
        "optimizer": args.optimizer,
        "task_type": args.task,
        "device": args.device,
    }
    settings.update({k: v for k, v in flags.items() if v is not None})
    if args.gradient_checkpointing:
        settings["gradient_checkpointing"] = True
    if args.method is not None and config_path is not None:
        settings["method"] = {"name": args.method}
    if isinstance(settings.get("method"), dict) and settings["method"].get("name") == "full":
        settings["method"] = {k: v for k, v in settings["method"].items()}
    return settings


def _cmd_estimate(args: argparse.Namespace) -> int:
    settings = _cli_settings(args)
    model = settings.pop("model")
    method = settings.pop("method")
    if args.fit_gib is not None and args.fit_gib <= 0:
        raise ConfigError(f"--fit-gib {args.fit_gib}: give a positive number of GiB (e.g. 4)")
    measured: Measured | None = None
    if args.calibrate:
        est, measured = calibrate(model, method, **settings)
    else:
        est = estimate(model, method, **settings)
    fit: int | None = None
    if args.fit_gib is not None:
        kwargs = {k: v for k, v in settings.items() if k != "batch_size"}
        fit = max_batch_size(model, method, int(args.fit_gib * GiB), **kwargs)
    if args.json:
        out: dict[str, Any] = {"estimate": est.to_dict()}
        if measured is not None:
            out["measured"] = dataclasses.asdict(measured)
        if fit is not None:
            out["fit"] = {"gib": args.fit_gib, "max_batch_size": fit}
        print(json.dumps(out, indent=2))
        return 0
    print(est.table())
    if measured is not None:
        print()
        print(_calibration_table(est, measured))
    if fit is not None:
        print()
        if fit == 0:
            print(
                f"batch size 1 does not fit in {args.fit_gib:g} GiB (peak "
                f"{_fmt_bytes(estimate(model, method, **{**settings, 'batch_size': 1}).peak)}); "
                "try a smaller --seq-len, --quantize nf4, --gradient-checkpointing or a smaller "
                "method"
            )
        else:
            print(
                f"largest batch size that fits in {args.fit_gib:g} GiB at {est.seq_len} tokens: "
                f"{fit}"
            )
    return 0


def _calibration_table(est: Estimate, m: Measured) -> str:
    rows = [
        ("weights (frozen)", est.weights, m.weights),
        ("adapter (trainable)", est.adapter, m.adapter),
        ("gradients", est.gradients, m.gradients),
        ("optimizer state", est.optimizer_state, m.optimizer_state),
        ("activations", est.activations, m.activations),
        ("counted peak", est.counted_peak, m.counted_peak),
        ("peak", est.peak, m.allocator_peak),
    ]
    lines = [f"{'calibration (one real step)':<28}{'estimated':>12}{'measured':>12}{'error':>9}"]
    for name, e, r in rows:
        err = f"{100.0 * (e - r) / r:+.1f}%" if r else "-"
        lines.append(f"{name:<28}{_fmt_bytes(e):>12}{_fmt_bytes(r):>12}{err:>9}")
    err_t = 100.0 * (est.step_time_s - m.step_time_s) / m.step_time_s
    lines.append(
        f"{'step time':<28}{_fmt_seconds(est.step_time_s):>12}"
        f"{_fmt_seconds(m.step_time_s):>12}{err_t:+8.0f}%"
    )
    return "\n".join(lines)


class _CallableModule(types.ModuleType):
    """``deltatune.estimate`` is this module and also callable as :func:`estimate`.

    The package exports the module (so ``deltatune.estimate.max_batch_size`` and
    ``import deltatune.estimate`` keep working) rather than a function of the same name, which
    would shadow the module as an attribute of ``deltatune``.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Estimate:
        return estimate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
