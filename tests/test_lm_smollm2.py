"""The embedded decoder (SmolLM2-135M-Instruct from its GGUF) on the real assets, kept small."""

from __future__ import annotations

import pytest
import torch

from deltatune import LoraConfig, inject
from deltatune.data import make_loader
from deltatune.lm import (
    EMBEDDED_DECODER,
    CausalLMCollator,
    CausalLMTask,
    InstructionDataset,
    generate,
    load_causal_lm,
    load_instruction_pairs,
    smollm2_path,
)
from deltatune.train import TrainerConfig, fit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2() -> tuple[torch.nn.Module, object]:
    torch.set_num_threads(1)
    return load_causal_lm(EMBEDDED_DECODER)


def test_converted_folder_holds_the_dequantised_gguf(
    smollm2: tuple[torch.nn.Module, object],
) -> None:
    """The cached float32 weights are the GGUF's blocks dequantised by the gguf package itself
    (Q8_0 embeddings, Q4_1 layers). LLaMA's q/k rows are stored permuted in GGUF, so for q
    only the multiset of values is compared."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    from deltatune.data.assets import smollm2_gguf_path

    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.chat_template and tok.pad_token_id is not None
    tensors = {t.name: t for t in GGUFReader(str(smollm2_gguf_path())).tensors}
    saved = safe_open(str(smollm2_path() / "model.safetensors"), "pt")
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
        "blk.29.ffn_down.weight": "model.layers.29.mlp.down_proj.weight",
        "blk.3.attn_q.weight": "model.layers.3.self_attn.q_proj.weight",
    }
    for gguf_name, hf_name in pairs.items():
        t = tensors[gguf_name]
        ref = dequantize(t.data, t.tensor_type)
        got = saved.get_tensor(hf_name).numpy()
        if "attn_q" in gguf_name:
            assert np.array_equal(np.sort(ref.ravel()), np.sort(got.ravel()))
        else:
            assert np.array_equal(ref.reshape(got.shape), got), hf_name


def test_greedy_generation_cache_and_padding(smollm2: tuple[torch.nn.Module, object]) -> None:
    model, tok = smollm2
    prompts = ["What is AI?", "Say hello."]
    cached = generate(model, tok, prompts, max_new_tokens=8)
    assert cached == generate(model, tok, prompts, max_new_tokens=8, use_cache=False)
    assert cached == [generate(model, tok, [p], max_new_tokens=8)[0] for p in prompts]
    assert all(len(t.split()) >= 3 for t in cached)


def test_a_few_lora_steps_lower_the_loss(smollm2: tuple[torch.nn.Module, object]) -> None:
    import copy

    base, tok = smollm2
    model = copy.deepcopy(base)
    inject(
        model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    pairs = load_instruction_pairs("chatterbot")[:4]
    ds = InstructionDataset(pairs, tok, max_length=48)
    collate = CausalLMCollator(tok.pad_token_id)
    task = CausalLMTask()
    before = task.evaluate(model, make_loader(ds, 8, shuffle=False, seed=0, collate=collate))
    cfg = TrainerConfig(
        epochs=3, batch_size=4, learning_rate=2e-3, warmup_ratio=0.0, progress=False, device="cpu"
    )
    fit(model, task, ds, None, cfg, collate_fn=collate)
    after = task.evaluate(model, make_loader(ds, 8, shuffle=False, seed=0, collate=collate))
    assert after["loss"] < before["loss"] - 0.2
