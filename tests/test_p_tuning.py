"""P-Tuning (v1): the prompt encoder's formula, PEFT interop and resuming from a saved adapter.

Masks, positions, labels, cached generation and padding are shared with prompt tuning and
tested in test_prompt_tuning.py (generation is parametrised over both methods there)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import deltatune as dt
from conftest import make_bert, make_llama
from deltatune.methods.p_tuning import load_peft_p_tuning
from deltatune.virtual_tokens import PromptEncoder, VirtualTokenLayer

N = 4


def ids(batch: int = 2, seq: int = 6, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))


def encoder_of(model: torch.nn.Module, name: str = "default") -> PromptEncoder:
    layer = next(m for m in model.modules() if isinstance(m, VirtualTokenLayer))
    enc = layer.prompt_encoder[name]
    assert isinstance(enc, PromptEncoder)
    return enc


def test_mlp_encoder_formula_and_model_output() -> None:
    model = make_llama()
    torch.manual_seed(0)
    dt.inject(model, dt.PromptEncoderConfig(num_virtual_tokens=N, encoder_hidden_size=16))
    enc = encoder_of(model)
    u = enc.embedding.weight
    (w1, b1), (w2, b2), (w3, b3) = [
        (enc.mlp_head[i].weight, enc.mlp_head[i].bias) for i in (0, 2, 4)
    ]
    # P = W3 relu(W2 relu(W1 U + b1) + b2) + b3
    p = torch.relu(torch.relu(u @ w1.T + b1) @ w2.T + b2) @ w3.T + b3
    assert p.shape == (N, 32)
    x = ids()
    base = make_llama()
    with torch.no_grad():
        out = model(input_ids=x).logits
        h0 = torch.cat([p.expand(2, -1, -1), base.get_input_embeddings()(x)], 1)
        ref = base(inputs_embeds=h0).logits[:, N:]
    assert (out - ref).abs().max().item() <= 1e-6


def test_lstm_encoder_matches_peft_prompt_encoder() -> None:
    """Our bidirectional-LSTM encoder against PEFT's own implementation, same weights."""
    peft = pytest.importorskip("peft")
    from peft.tuners.p_tuning.model import PromptEncoder as PeftPromptEncoder

    torch.manual_seed(0)
    ours = PromptEncoder(N, 32, 8, "LSTM", 2, 0.0)
    cfg = peft.PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=N,
        token_dim=32,
        num_transformer_submodules=1,
        encoder_reparameterization_type="LSTM",
        encoder_hidden_size=8,
        encoder_num_layers=2,
    )
    theirs = PeftPromptEncoder(cfg)
    theirs.load_state_dict(
        ours.state_dict()
    )  # same parameter names: embedding, lstm_head, mlp_head
    with torch.no_grad():
        want = theirs(torch.arange(N)[None])[0]
        got = ours()
    assert (got - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_peft_loads_our_adapter_with_same_outputs(encoder: str, kind: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    make = make_llama if kind == "llama" else make_bert
    task = "CAUSAL_LM" if kind == "llama" else "SEQ_CLS"
    model = make()
    torch.manual_seed(0)
    dt.inject(
        model,
        dt.PromptEncoderConfig(
            num_virtual_tokens=N,
            encoder_reparameterization_type=encoder,
            encoder_hidden_size=12,
            task_type=task,
        ),
    )
    x = ids()
    mask = torch.ones_like(x)
    mask[1, -1] = 0
    with torch.no_grad():
        ours = model(input_ids=x, attention_mask=mask).logits
    dt.save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    with torch.no_grad():
        theirs = loaded(input_ids=x, attention_mask=mask).logits
    if kind == "llama":
        theirs = theirs[:, N:]
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_resume_training_from_saved_adapter_is_exact(tmp_path: Path) -> None:
    model = make_llama().train()
    torch.manual_seed(0)
    dt.inject(model, dt.PromptEncoderConfig(num_virtual_tokens=N, encoder_hidden_size=16))
    x = ids(batch=4, seq=8)
    opt = torch.optim.SGD(dt.trainable_parameters(model), lr=0.5)
    for _ in range(2):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    dt.save_adapter(model, tmp_path)
    again = make_llama().train()
    dt.load_adapter(again, tmp_path, is_trainable=True)
    # The encoder (not only its output) came back: same trainable parameters, same values.
    ours = dict(encoder_of(model).named_parameters())
    theirs = dict(encoder_of(again).named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert dt.trainable_report(again).trainable == dt.trainable_report(model).trainable == 1472
    with torch.no_grad():
        assert torch.equal(again(input_ids=x).logits, model(input_ids=x).logits)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_peft_written_p_tuning_folder(kind: str, tmp_path: Path) -> None:
    """PEFT keeps only the encoder's output: load_adapter refuses it clearly (no encoder to
    train); load_peft_p_tuning loads it as a table with PEFT's outputs."""
    peft = pytest.importorskip("peft")
    make = make_llama if kind == "llama" else make_bert
    task = "CAUSAL_LM" if kind == "llama" else "SEQ_CLS"
    torch.manual_seed(0)
    pm = peft.get_peft_model(
        make(), peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=N)
    ).eval()
    x = ids()
    with torch.no_grad():
        theirs = pm(input_ids=x).logits
    pm.save_pretrained(str(tmp_path))
    with pytest.raises(dt.CheckpointError, match="missing: prompt_encoder"):
        dt.load_adapter(make(), tmp_path)
    model = make()
    load_peft_p_tuning(model, tmp_path)
    with torch.no_grad():
        ours = model(input_ids=x).logits
    if kind == "llama":
        theirs = theirs[:, N:]
    assert (ours - theirs).abs().max().item() <= 1e-5
    with pytest.raises(dt.CheckpointError, match="not 'P_TUNING'"):
        dt.save_adapter(model, tmp_path / "pt")
        load_peft_p_tuning(make(), tmp_path / "pt")


def test_bad_input_raises_clear_errors() -> None:
    with pytest.raises(dt.ConfigError, match=r"encoder_dropout=1\.0"):
        dt.PromptEncoderConfig(encoder_dropout=1.0)
    with pytest.raises(dt.ConfigError, match="encoder_hidden_size=0"):
        dt.PromptEncoderConfig(encoder_hidden_size=0)
    with pytest.raises(dt.ConfigError, match="encoder_num_layers=0"):
        dt.PromptEncoderConfig(encoder_num_layers=0)
    with pytest.raises(dt.ConfigError, match="encoder_reparameterization_type"):
        dt.config_from_dict({"name": "p_tuning", "encoder_reparameterization_type": "GRU"})
    with pytest.raises(dt.ConfigError, match="num_transformer_submodules=2"):
        dt.PromptEncoderConfig(num_transformer_submodules=2)
