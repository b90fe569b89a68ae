"""Shared fixtures: tiny random-init models (fixed seed, eval mode), their inputs, and the
registry-driven list of (model, method, config) cases that the generic test matrix runs.

Every factory builds the same weights on every call (seeded), so "a fresh copy of the base" is
simply another call of the factory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import deltatune as dt

SEED = 0

# The models are tiny: one thread is several times faster than two busy ones on a 2-core box.
torch.set_num_threads(1)

# --- tiny models ----------------------------------------------------------------------------


def make_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(SEED)
    return BertForSequenceClassification(cfg).eval()


def make_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(cfg).eval()


def make_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=100,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(SEED)
    return GPT2LMHeadModel(cfg).eval()


class TinyCNN(nn.Module):
    """Conv-BN-ReLU, Conv-ReLU, global average pool, Linear head ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 4)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(pixel_values)))
        h = torch.relu(self.conv2(h))
        return self.fc(self.pool(h).flatten(1))


def make_cnn() -> nn.Module:
    torch.manual_seed(SEED)
    model = TinyCNN()
    # Non-trivial running statistics so that eval-mode BatchNorm is not the identity.
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 1.5)
    return model.eval()


# --- inputs ---------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def text_inputs(batch: int = 3, seq: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 100, (batch, seq), generator=_gen(seed))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


def image_inputs(batch: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, 8, 8, generator=_gen(seed))}


MODELS: dict[str, Callable[[], nn.Module]] = {
    "bert": make_bert,
    "llama": make_llama,
    "gpt2": make_gpt2,
    "cnn": make_cnn,
}
INPUTS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "bert": text_inputs,
    "llama": text_inputs,
    "gpt2": text_inputs,
    "cnn": image_inputs,
}


def make_quantized(kind: str, scheme: str) -> nn.Module:
    """A tiny model whose linear layers (not the head) are frozen NF4 / int8, computing in fp32
    so that reruns and merges compare exactly."""
    from deltatune.quant import quantize_model

    model = MODELS[kind]()
    quantize_model(model, scheme, compute_dtype="float32")  # type: ignore[arg-type]
    return model


# Quantised bases for the qlora cases (the base a QLoRA adapter is trained, disabled, unloaded on).
for _kind, _scheme in (("llama", "nf4"), ("bert", "int8"), ("gpt2", "nf4")):
    MODELS[f"{_kind}-{_scheme}"] = lambda k=_kind, s=_scheme: make_quantized(k, s)
    INPUTS[f"{_kind}-{_scheme}"] = INPUTS[_kind]


def labelled_batches(model_kind: str, n_batches: int = 3) -> list[dict[str, torch.Tensor]]:
    """Small labelled batches (for fitted methods); every class of the head appears."""
    n_classes = 3 if model_kind == "bert" else 4
    out = []
    for i in range(n_batches):
        batch = INPUTS[model_kind](batch=4, seed=100 + i)
        batch["labels"] = torch.arange(4) % n_classes
        out.append(batch)
    return out


def run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's output tensor (``logits`` for transformers models)."""
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture
def bert() -> nn.Module:
    return make_bert()


@pytest.fixture
def llama() -> nn.Module:
    return make_llama()


@pytest.fixture
def gpt2() -> nn.Module:
    return make_gpt2()


@pytest.fixture
def cnn() -> nn.Module:
    return make_cnn()


# --- the registry-driven case list ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One (model, method, config) combination of the test matrix.

    ``trainable`` is the number of trainable parameters counted by hand from the tiny
    models' shapes (see the arithmetic beside each case). ``in_place`` methods train base
    parameters directly (their total stays the base total); ``fitted`` ones train nothing by
    gradient (their trainable count is 0).

    ``prerequisites`` are adapters the method builds on (the task adapters a fusion fuses):
    ``(name, {"name": method, ...options})`` pairs that :meth:`make_model` adds to the base,
    moved away from their identity start, frozen and inactive (so the model still computes
    the base). ``starts_like`` is what a freshly injected adapter computes: ``()`` the base,
    a tuple of prerequisite names the model with those active, ``None`` nothing fixed.
    """

    id: str
    model: str
    method: str
    options: dict[str, Any]
    trainable: int
    in_place: bool = False
    prerequisites: tuple[tuple[str, dict[str, Any]], ...] = ()
    starts_like: tuple[str, ...] | None = ()

    def config(self, **changes: Any) -> dt.MethodConfig:
        return dt.config_from_dict({"name": self.method, **self.options, **changes})

    def make_base(self) -> nn.Module:
        return MODELS[self.model]()

    def make_model(self) -> nn.Module:
        model = self.make_base()
        for i, (name, options) in enumerate(self.prerequisites):
            dt.inject(model, dt.config_from_dict(options), name)
            gen = torch.Generator().manual_seed(100 + i)
            with torch.no_grad():
                for t in dt.adapter_state_dict(model, name).values():
                    t.add_(0.2 * torch.randn(t.shape, generator=gen, dtype=t.dtype))
        if self.prerequisites:
            dt.set_active(model, [])
        return model

    @property
    def prerequisite_names(self) -> list[str]:
        return [name for name, _ in self.prerequisites]

    def inputs(self) -> dict[str, torch.Tensor]:
        return INPUTS[self.model]()


NO_INIT = {"init_lora_weights": False}

# Shapes used in the hand counts (r = 4 everywhere unless stated):
#   BERT:  hidden 32, intermediate 64, 2 layers, 3 labels; a 32->32 LoRA has 4*(32+32) = 256.
#   LLaMA: hidden 32, head_dim 16, 1 kv head (k/v: 32->16), intermediate 64, vocab 100.
#   GPT-2: n_embd 32, c_attn 32->96, attn.c_proj 32->32, c_fc 32->128, mlp.c_proj 128->32.
#   CNN:   conv1 3->8 k3, bn1 8, conv2 8->16 k3, fc 16->4.
CASES_BY_METHOD: dict[str, list[Case]] = {
    "lora": [
        # 2 layers * (query + value) * 256
        Case(
            "bert-qv",
            "bert",
            "lora",
            {"r": 4, "target_modules": ["query", "value"], **NO_INIT},
            1024,
        ),
        # per layer: q,k,v,o 4*256 + intermediate 4*(32+64) + output 4*(64+32) = 1792; *2 = 3584;
        # + pooler.dense 256 + classifier copy (32*3+3 = 99) = 3939
        Case(
            "bert-all-linear-seqcls",
            "bert",
            "lora",
            {"r": 4, "target_modules": "all-linear", "task_type": "SEQ_CLS", **NO_INIT},
            3939,
        ),
        # 1024 + magnitude 32 per module * 4 modules = 1152
        Case(
            "bert-dora",
            "bert",
            "lora",
            {"r": 4, "target_modules": ["query", "value"], "use_dora": True, **NO_INIT},
            1152,
        ),
        # 2 layers * (query, key, value) * 256 = 1536
        Case(
            "bert-rslora-dropout",
            "bert",
            "lora",
            {
                "r": 4,
                "lora_alpha": 8,
                "target_modules": ["query", "key", "value"],
                "use_rslora": True,
                "lora_dropout": 0.1,
                **NO_INIT,
            },
            1536,
        ),
        # per layer q 4*(32+32) + v 4*(32+16) = 448; *2 = 896
        Case(
            "llama-qv",
            "llama",
            "lora",
            {"r": 4, "target_modules": ["q_proj", "v_proj"], **NO_INIT},
            896,
        ),
        # per layer q 256 + k 192 + v 192 + o 256 + gate/up/down 3*4*(32+64) = 2048; *2 = 4096
        Case(
            "llama-all-linear",
            "llama",
            "lora",
            {"r": 4, "target_modules": "all-linear", **NO_INIT},
            4096,
        ),
        # embed_tokens A 4*100 + B 32*4 = 528; q_proj 2*256 = 512; total 1040
        Case(
            "llama-embedding",
            "llama",
            "lora",
            {"r": 4, "target_modules": ["embed_tokens", "q_proj"], **NO_INIT},
            1040,
        ),
        # 896 + magnitudes 2 * (32 + 16) = 992
        Case(
            "llama-dora",
            "llama",
            "lora",
            {"r": 4, "target_modules": ["q_proj", "v_proj"], "use_dora": True, **NO_INIT},
            992,
        ),
        # 2 layers * c_attn 4*(32+96) = 1024
        Case(
            "gpt2-c_attn", "gpt2", "lora", {"r": 4, "target_modules": ["c_attn"], **NO_INIT}, 1024
        ),
        # per layer c_attn 512+96, attn.c_proj 256+32, c_fc 4*160+128, mlp.c_proj 4*160+32
        #   = 2336; *2 = 4672 (lm_head is the output layer, left alone)
        Case(
            "gpt2-all-linear-dora",
            "gpt2",
            "lora",
            {"r": 4, "target_modules": "all-linear", "use_dora": True, **NO_INIT},
            4672,
        ),
        # conv1: A 4*3*3*3 = 108, B 8*4 = 32; conv2: A 4*8*3*3 = 288, B 16*4 = 64; total 492
        Case("cnn-conv2d", "cnn", "lora", {"r": 4, "target_modules": r"conv\d", **NO_INIT}, 492),
    ],
    "bitfit": [
        # embeddings LN 32 + per layer (q,k,v,o 128 + LN 32 + intermediate 64 + output 32
        #   + LN 32 = 288) * 2 + pooler 32 + classifier 3 = 643
        Case("bert-bitfit", "bert", "bitfit", {}, 643),
        # per block ln_1 32 + c_attn 96 + c_proj 32 + ln_2 32 + c_fc 128 + c_proj 32 = 352;
        #   *2 + ln_f 32 = 736
        Case("gpt2-bitfit", "gpt2", "bitfit", {}, 736),
        # conv1 8 + bn1 8 + conv2 16 + fc 4 = 36
        Case("cnn-bitfit", "cnn", "bitfit", {}, 36),
    ],
    "full": [
        # all 23619 BERT parameters minus the embeddings (100*32 + 64*32 + 2*32 + LN 64 = 5376)
        Case(
            "bert-full-no-emb",
            "bert",
            "full",
            {"exclude_modules": ["embeddings"]},
            18243,
            in_place=True,
        ),
        # conv1 224 + bn1 16 + conv2 1168 + fc 68 = 1476
        Case("cnn-full", "cnn", "full", {}, 1476, in_place=True),
    ],
    "freeze": [
        # layer.1 8544 + pooler 1056 + classifier 99 = 9699
        Case("bert-freeze", "bert", "freeze", {"train_last_n": 1}, 9699, in_place=True),
        # layers.1: q 1024 + k 512 + v 512 + o 1024 + 3 * 2048 + 2 norms 64 = 9280;
        #   + final norm 32 + lm_head 3200 = 12512
        Case("llama-freeze", "llama", "freeze", {"train_last_n": 1}, 12512, in_place=True),
        # h.1: ln_1 64 + c_attn 3168 + c_proj 1056 + ln_2 64 + c_fc 4224 + c_proj 4128 = 12704;
        #   + ln_f 64 = 12768 (lm_head is tied to wte, which stays frozen)
        Case("gpt2-freeze", "gpt2", "freeze", {"train_last_n": 1}, 12768, in_place=True),
        # the last top-level block is fc: 16*4 + 4 = 68
        Case("cnn-freeze", "cnn", "freeze", {"train_last_n": 1}, 68, in_place=True),
    ],
    "features": [
        # fitted in closed form: nothing trains by gradient
        Case("bert-features", "bert", "features", {}, 0, in_place=True),
        Case("cnn-features", "cnn", "features", {"head": "fc"}, 0, in_place=True),
    ],
    # Bottleneck adapters on hidden size 32: one adapter with bottleneck m has
    #   down 32*m + m and up m*32 + 32 parameters (m = 8: 264 + 288 = 552; m = 2: 66 + 96 = 162;
    #   m = 4: 132 + 160 = 292); ln_before adds 2*32 = 64.
    "houlsby": [
        # 2 blocks * (attn_out + ffn_out) * 552
        Case("bert-houlsby", "bert", "houlsby", {"bottleneck_size": 8}, 2208),
        # reduction_factor 4 -> m = 8; (552 + 64) * 4
        Case(
            "llama-houlsby-ln",
            "llama",
            "houlsby",
            {"reduction_factor": 4, "ln_before": True, "non_linearity": "gelu"},
            2464,
        ),
        # block 1 only: 2 * 552
        Case(
            "gpt2-houlsby-layer1",
            "gpt2",
            "houlsby",
            {"bottleneck_size": 8, "layers_to_transform": [1]},
            1104,
        ),
    ],
    "pfeiffer": [
        # 2 blocks * 552 + classifier copy 99
        Case(
            "bert-pfeiffer-seqcls",
            "bert",
            "pfeiffer",
            {"reduction_factor": 4, "task_type": "SEQ_CLS"},
            1203,
        ),
        # 2 blocks * 292
        Case("llama-pfeiffer", "llama", "pfeiffer", {"bottleneck_size": 4}, 584),
        # default reduction 16 -> m = 2; 2 blocks * 162
        Case("gpt2-pfeiffer", "gpt2", "pfeiffer", {}, 324),
    ],
    "parallel_adapter": [
        # BERT's output(hidden, x) module; 2 blocks * 552
        Case("bert-parallel", "bert", "parallel_adapter", {"bottleneck_size": 8}, 1104),
        # default reduction 2 -> m = 16: 32*16 + 16 + 16*32 + 32 = 1072; 2 blocks = 2144
        Case("llama-parallel", "llama", "parallel_adapter", {"scaling": 2.0}, 2144),
        # 2 blocks * (552 + 64)
        Case(
            "gpt2-parallel-ln",
            "gpt2",
            "parallel_adapter",
            {"bottleneck_size": 8, "ln_before": True, "non_linearity": "tanh"},
            1232,
        ),
    ],
    "ia3": [
        # PEFT defaults key, value (out 32 each), output.dense: both attention.output.dense
        #   (in 32) and the FFN output.dense (in 64) scale their input: 160 per block; *2 = 320
        #   + classifier copy 99 = 419
        Case("bert-ia3-seqcls", "bert", "ia3", {"task_type": "SEQ_CLS"}, 419),
        # k_proj, v_proj (out 16 each), down_proj (in 64): 96 per block; *2 = 192
        Case("llama-ia3", "llama", "ia3", {}, 192),
        # c_attn (out 96), mlp.c_proj (in 128): 224 per block; *2 = 448
        Case("gpt2-ia3", "gpt2", "ia3", {}, 448),
        # conv1 output (8), conv2 input (8), fc output (4)
        Case(
            "cnn-ia3",
            "cnn",
            "ia3",
            {"target_modules": ["conv1", "conv2", "fc"], "feedforward_modules": ["conv2"]},
            20,
        ),
    ],
    # One fusion layer on hidden size 32: query 32*32+32, key 32*32+32, value 32*32 = 3136.
    "fusion": [
        # 2 blocks (Pfeiffer: ffn_out) * 3136 + classifier copy 99 = 6371
        Case(
            "bert-fusion-pfeiffer-seqcls",
            "bert",
            "fusion",
            {"adapter_names": ["t1", "t2"], "task_type": "SEQ_CLS"},
            6371,
            prerequisites=(
                ("t1", {"name": "pfeiffer", "bottleneck_size": 8}),
                ("t2", {"name": "pfeiffer", "bottleneck_size": 4, "non_linearity": "gelu"}),
            ),
            starts_like=None,
        ),
        # Houlsby: attn_out + ffn_out in 2 blocks = 4 * 3136 = 12544
        Case(
            "llama-fusion-houlsby",
            "llama",
            "fusion",
            {"adapter_names": ["t1", "t2"], "dropout": 0.1},
            12544,
            prerequisites=(
                ("t1", {"name": "houlsby", "bottleneck_size": 4}),
                ("t2", {"name": "houlsby", "bottleneck_size": 4, "ln_after": True}),
            ),
            starts_like=None,
        ),
        # fusion over one adapter starts as that adapter; 2 blocks * 3136 = 6272
        Case(
            "gpt2-fusion-one",
            "gpt2",
            "fusion",
            {"adapter_names": ["t1"]},
            6272,
            prerequisites=(("t1", {"name": "pfeiffer", "bottleneck_size": 4}),),
            starts_like=("t1",),
        ),
    ],
    # AdaLoRA, init_r 4: a module (in -> out) has A 4*in + E 4 + B out*4 parameters
    #   (32->32: 260; 32->16: 196; 32->96: 516; 32->64 and 64->32: 388; conv k3: A 4*in*9).
    "adalora": [
        # 2 layers * (query + value) * 260
        Case(
            "bert-adalora-qv",
            "bert",
            "adalora",
            {"init_r": 4, "target_r": 2, "target_modules": ["query", "value"], **NO_INIT},
            1040,
        ),
        # per layer q,k,v,o 4*260 + intermediate 388 + output 388 = 1816; *2 = 3632;
        #   + pooler.dense 260 + classifier copy 99 = 3991
        Case(
            "bert-adalora-all-linear-seqcls",
            "bert",
            "adalora",
            {
                "init_r": 4,
                "target_r": 2,
                "target_modules": "all-linear",
                "task_type": "SEQ_CLS",
                "lora_dropout": 0.1,
                **NO_INIT,
            },
            3991,
        ),
        # per layer q 260 + v 196 = 456; *2 = 912
        Case(
            "llama-adalora-qv",
            "llama",
            "adalora",
            {"init_r": 4, "target_r": 2, "target_modules": ["q_proj", "v_proj"], **NO_INIT},
            912,
        ),
        # GPT-2 Conv1D c_attn 516 * 2 = 1032
        Case(
            "gpt2-adalora-c_attn",
            "gpt2",
            "adalora",
            {"init_r": 4, "target_r": 2, "target_modules": ["c_attn"], **NO_INIT},
            1032,
        ),
        # conv1: A 4*3*9 = 108, E 4, B 8*4 = 32; conv2: A 4*8*9 = 288, E 4, B 16*4 = 64; 500
        Case(
            "cnn-adalora-conv2d",
            "cnn",
            "adalora",
            {
                "init_r": 4,
                "target_r": 2,
                "lora_alpha": 0.5,
                "target_modules": r"conv\d",
                **NO_INIT,
            },
            500,
        ),
    ],
    # Virtual tokens on hidden size 32 (n tokens: a 32*n table). They change the output from
    # the start, so starts_like=None.
    "prompt_tuning": [
        # 4 * 32 = 128 + classifier copy 99 = 227
        Case(
            "bert-prompt-seqcls",
            "bert",
            "prompt_tuning",
            {"num_virtual_tokens": 4, "task_type": "SEQ_CLS"},
            227,
            starts_like=None,
        ),
        # 5 * 32 = 160 (rows copied from random vocabulary embeddings)
        Case(
            "llama-prompt-vocab",
            "llama",
            "prompt_tuning",
            {"num_virtual_tokens": 5, "prompt_tuning_init": "SAMPLE_VOCAB"},
            160,
            starts_like=None,
        ),
        Case(
            "gpt2-prompt", "gpt2", "prompt_tuning", {"num_virtual_tokens": 4}, 128, starts_like=None
        ),
    ],
    # P-Tuning, n = 4 (table 128). MLP h=16: 32*16+16 + 16*16+16 + 16*32+32 = 1344 -> 1472.
    # LSTM h=8, 1 layer: per direction 4*8*(32+8) + 2*4*8 = 1344, *2 = 2688; MLP 16*16+16
    #   + 16*32+32 = 816 -> 128 + 2688 + 816 = 3632.
    "p_tuning": [
        # 1472 + classifier copy 99 = 1571
        Case(
            "bert-ptuning-mlp-seqcls",
            "bert",
            "p_tuning",
            {"num_virtual_tokens": 4, "encoder_hidden_size": 16, "task_type": "SEQ_CLS"},
            1571,
            starts_like=None,
        ),
        Case(
            "llama-ptuning-lstm",
            "llama",
            "p_tuning",
            {
                "num_virtual_tokens": 4,
                "encoder_reparameterization_type": "LSTM",
                "encoder_hidden_size": 8,
                "encoder_num_layers": 1,
            },
            3632,
            starts_like=None,
        ),
        Case(
            "gpt2-ptuning-mlp",
            "gpt2",
            "p_tuning",
            {"num_virtual_tokens": 4, "encoder_hidden_size": 16},
            1472,
            starts_like=None,
        ),
    ],
    # QLoRA on already-quantised bases (qlora keeps them; its own quantisation is in
    # tests/test_qlora.py). Counts equal LoRA's on the same targets (all-linear by default).
    "qlora": [
        Case(
            "llama-nf4-qlora",
            "llama-nf4",
            "qlora",
            {"r": 4, "compute_dtype": "float32", **NO_INIT},
            4096,
        ),
        Case(
            "bert-int8-qlora-seqcls",
            "bert-int8",
            "qlora",
            {
                "r": 4,
                "quantize": "int8",
                "compute_dtype": "float32",
                "task_type": "SEQ_CLS",
                **NO_INIT,
            },
            3939,
        ),
        Case(
            "gpt2-nf4-qlora-dora",
            "gpt2-nf4",
            "qlora",
            {"r": 4, "use_dora": True, "compute_dtype": "float32", **NO_INIT},
            4672,
        ),
    ],
    # Key/value prefixes: P has num_layers * 2 * token_dim columns per virtual token; BERT and
    #   GPT-2 token_dim 32 (2 heads x 16): 2 * 2 * 32 = 128; LLaMA (GQA, 1 key/value head of
    #   16): 2 * 2 * 16 = 64. The matrix trains P directly (prefix_projection false: the MLP
    #   is a training aid, folded away on saving; tests/test_prefix_tuning.py covers it).
    "prefix_tuning": [
        # 4 * 128 + classifier copy 99 = 611
        Case(
            "bert-prefix-seqcls",
            "bert",
            "prefix_tuning",
            {"num_virtual_tokens": 4, "prefix_projection": False, "task_type": "SEQ_CLS"},
            611,
            starts_like=None,
        ),
        # 4 * 128
        Case(
            "gpt2-prefix",
            "gpt2",
            "prefix_tuning",
            {"num_virtual_tokens": 4, "prefix_projection": False},
            512,
            starts_like=None,
        ),
        # 4 * 64 (zero start, moved by the matrix's perturbation)
        Case(
            "llama-prefix-gqa-zero",
            "llama",
            "prefix_tuning",
            {"num_virtual_tokens": 4, "prefix_projection": False, "init_weights": "zero"},
            256,
            starts_like=None,
        ),
    ],
    "p_tuning_v2": [
        # 3 * 128 + classifier copy 99 = 483 (the tiny BERT's logits barely move without it)
        Case(
            "bert-ptv2-head",
            "bert",
            "p_tuning_v2",
            {"num_virtual_tokens": 3, "modules_to_save": ["classifier"]},
            483,
            starts_like=None,
        ),
        # 2 * 128
        Case("gpt2-ptv2", "gpt2", "p_tuning_v2", {"num_virtual_tokens": 2}, 256, starts_like=None),
        # 3 * 64
        Case(
            "llama-ptv2", "llama", "p_tuning_v2", {"num_virtual_tokens": 3}, 192, starts_like=None
        ),
    ],
    # LLaMA-Adapter: per adapted block a prompt 1 x adapter_len x 32 and a gate of 1; it starts
    #   exactly at the base (gate 0).
    "llama_adapter": [
        # top block: 3 * 32 + 1 = 97
        Case(
            "llama-adapter-top1",
            "llama",
            "llama_adapter",
            {"adapter_len": 3, "adapter_layers": 1},
            97,
        ),
        # both blocks: 2 * (4 * 32 + 1) = 258
        Case(
            "llama-adapter-all",
            "llama",
            "llama_adapter",
            {"adapter_len": 4, "adapter_layers": 2},
            258,
        ),
    ],
    "combine": [
        # LoRA r=4 on query, value: 2 blocks * 2 * 256 = 1024; IA3 on key (out 32) and both
        #   output.dense (feed-forward style: in 32 + in 64) = 128 per block * 2 = 256;
        #   classifier copy 99 -> 1379
        Case(
            "bert-combine",
            "bert",
            "combine",
            {
                "methods": [
                    {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
                    {
                        "name": "ia3",
                        "target_modules": ["key", "output.dense"],
                        "feedforward_modules": ["output.dense"],
                    },
                ],
                "task_type": "SEQ_CLS",
            },
            1379,
        ),
        # LoRA r=4 on q_proj (32->32): 256 * 2 = 512; IA3 k_proj (out 16) + down_proj (in 64):
        #   80 * 2 = 160 -> 672
        Case(
            "llama-combine",
            "llama",
            "combine",
            {
                "methods": [
                    {"name": "lora", "r": 4, "target_modules": ["q_proj"]},
                    {
                        "name": "ia3",
                        "target_modules": ["k_proj", "down_proj"],
                        "feedforward_modules": ["down_proj"],
                    },
                ],
            },
            672,
        ),
        # LoRA r=4 on c_attn (32->96): 512 * 2 = 1024; IA3 on mlp.c_proj (in 128): 256 -> 1280
        Case(
            "gpt2-combine",
            "gpt2",
            "combine",
            {
                "methods": [
                    {"name": "lora", "r": 4, "target_modules": ["c_attn"]},
                    {
                        "name": "ia3",
                        "target_modules": ["mlp.c_proj"],
                        "feedforward_modules": ["mlp.c_proj"],
                    },
                ],
            },
            1280,
        ),
        # LoRA r=2 on conv1 (3->8, k3): A 2*3*3*3 = 54, B 8*2 = 16; IA3 on conv2's input (8)
        #   -> 78
        Case(
            "cnn-combine",
            "cnn",
            "combine",
            {
                "methods": [
                    {"name": "lora", "r": 2, "target_modules": ["conv1"]},
                    {"name": "ia3", "target_modules": ["conv2"], "feedforward_modules": ["conv2"]},
                ],
            },
            78,
        ),
    ],
    # MAM: a key/value prefix (n = 4, trained directly) + a parallel FFN adapter, one adapter.
    "mam": [
        # prefix 4 * (2 layers * 2 * 32) = 512; adapter m = 8: 2 * (32*8 + 8 + 8*32 + 32) = 1104;
        #   classifier copy 99 -> 1715
        Case(
            "bert-mam-seqcls",
            "bert",
            "mam",
            {
                "num_virtual_tokens": 4,
                "prefix_projection": False,
                "bottleneck_size": 8,
                "task_type": "SEQ_CLS",
            },
            1715,
            starts_like=None,
        ),
        # prefix 4 * (2 * 2 * 32) = 512; adapter m = 8 + LN: 2 * (552 + 64) = 1232 -> 1744
        Case(
            "gpt2-mam-ln",
            "gpt2",
            "mam",
            {
                "num_virtual_tokens": 4,
                "prefix_projection": False,
                "bottleneck_size": 8,
                "ln_before": True,
            },
            1744,
            starts_like=None,
        ),
        # GQA: 1 kv head x 16 -> prefix 4 * (2 * 2 * 16) = 256; default m = 32 // 2 = 16:
        #   2 * (32*16 + 16 + 16*32 + 32) = 2144 -> 2400
        Case(
            "llama-mam-zero",
            "llama",
            "mam",
            {"num_virtual_tokens": 4, "prefix_projection": False, "prefix_init": "zero"},
            2400,
            starts_like=None,
        ),
    ],
    # UniPELT: gated LoRA (r = 4) on q/v + a gated prefix (n = 4, direct) + a gated Pfeiffer
    #   adapter, one adapter. Per layer: gates G_L, G_P (Linear(32, 1): 33 each) = 66 and
    #   G_A 33; the prefix as in the mam cases.
    "unipelt": [
        # LoRA q, v 2 * 256 = 512 + gates 66 + adapter m = 8: 552 + G_A 33 = 1163 per layer;
        #   * 2 = 2326; prefix 4 * (2 * 2 * 32) = 512; classifier copy 99 -> 2937
        Case(
            "bert-unipelt-seqcls",
            "bert",
            "unipelt",
            {
                "r": 4,
                "num_virtual_tokens": 4,
                "prefix_projection": False,
                "bottleneck_size": 8,
                "task_type": "SEQ_CLS",
            },
            2937,
            starts_like=None,
        ),
        # GQA: LoRA q 4*(32+32) = 256, v 4*(32+16) = 192; gates 66; default m = 32 // 16 = 2:
        #   162 + G_A 33 -> 709 per layer, * 2 = 1418; prefix 4 * (2 * 2 * 16) = 256 -> 1674
        Case(
            "llama-unipelt-zero",
            "llama",
            "unipelt",
            {"r": 4, "num_virtual_tokens": 4, "prefix_projection": False, "prefix_init": "zero"},
            1674,
            starts_like=None,
        ),
        # LoRA on the fused c_attn 4*(32+96) = 512; gates 66; adapter m = 8 + LN 616 + G_A 33
        #   -> 1227 per layer, * 2 = 2454; prefix 512 -> 2966
        Case(
            "gpt2-unipelt-ln",
            "gpt2",
            "unipelt",
            {
                "r": 4,
                "num_virtual_tokens": 4,
                "prefix_projection": False,
                "bottleneck_size": 8,
                "ln_before": True,
            },
            2966,
            starts_like=None,
        ),
    ],
}


def all_cases() -> list[Case]:
    """Cases for every registered method, in registry order (a method without cases adds none)."""
    return [case for name in dt.methods() for case in CASES_BY_METHOD.get(name, [])]


ALL_CASES = all_cases()
