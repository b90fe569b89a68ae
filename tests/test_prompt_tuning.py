"""Prompt tuning (and the virtual-token machinery it shares with P-Tuning): the formula, masks,
positions and labels, cached generation, padding, PEFT interop, hooks and bad input."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from conftest import make_bert, make_cnn, make_gpt2, make_llama
from deltatune.virtual_tokens import VirtualTokenLayer

N = 4
MAKERS = {"llama": make_llama, "gpt2": make_gpt2, "bert": make_bert}


def ids(batch: int = 2, seq: int = 6, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))


def table(model: torch.nn.Module, name: str = "default") -> torch.Tensor:
    layer = next(m for m in model.modules() if isinstance(m, VirtualTokenLayer))
    return layer.prompts([name]).detach()


def with_prompts(kind: str, config: dt.MethodConfig | None = None) -> torch.nn.Module:
    model = MAKERS[kind]()
    torch.manual_seed(0)
    dt.inject(model, config or dt.PromptTuningConfig(num_virtual_tokens=N))
    return model


# --- the formula: h_0 = [P ; E(x)], mask [1 ; m], logits of the input positions --------------


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_output_is_base_model_on_prompt_then_input(kind: str) -> None:
    x = ids()
    mask = torch.ones_like(x)
    mask[1, -2:] = 0  # right padding
    model = with_prompts(kind)
    base = MAKERS[kind]()
    p = table(model)
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=mask).logits
        emb = base.get_input_embeddings()(x)
        h0 = torch.cat([p.expand(2, -1, -1), emb], dim=1)
        ref = base(inputs_embeds=h0, attention_mask=torch.cat([torch.ones(2, N), mask], 1))
        ref_logits = ref.logits if kind == "bert" else ref.logits[:, N:]
    assert out.shape == ref_logits.shape
    assert (out - ref_logits).abs().max().item() <= 1e-6


def test_loss_uses_labels_with_ignored_prompt_positions() -> None:
    x = ids()
    model = with_prompts("llama")
    base = make_llama()
    with torch.no_grad():
        loss = model(input_ids=x, labels=x).loss
        h0 = torch.cat([table(model).expand(2, -1, -1), base.get_input_embeddings()(x)], 1)
        logits = base(inputs_embeds=h0).logits
    labels = torch.cat([torch.full((2, N), -100), x], 1)
    # Next-token cross-entropy over the extended sequence, prompt positions ignored.
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 100), labels[:, 1:].reshape(-1))
    assert abs(loss.item() - ref.item()) <= 1e-5


def test_token_type_and_position_ids_are_extended() -> None:
    x = ids()
    model = with_prompts("bert")
    base = make_bert()
    tt = torch.zeros_like(x)
    tt[:, 3:] = 1
    pos = torch.arange(6).expand(2, -1)
    with torch.no_grad():
        out = model(input_ids=x, token_type_ids=tt, position_ids=pos).logits
        h0 = torch.cat([table(model).expand(2, -1, -1), base.get_input_embeddings()(x)], 1)
        ref = base(
            inputs_embeds=h0,
            token_type_ids=torch.cat([torch.zeros(2, N, dtype=torch.long), tt], 1),
            position_ids=torch.arange(N + 6).expand(2, -1),
        ).logits
    assert (out - ref).abs().max().item() <= 1e-6


def test_training_moves_only_the_prompt_and_lowers_the_loss() -> None:
    model = with_prompts("gpt2").train()
    x = ids(batch=4, seq=8)
    params = dt.trainable_parameters(model)
    assert [p.shape for p in params] == [torch.Size([N, 32])]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam(params, lr=0.5)
    losses = []
    for _ in range(20):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # (a random tiny model predicts near-uniformly; the prompt still lowers the loss)
    assert losses[-1] < losses[0] - 0.02
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


# --- generation with the key/value cache, padding -----------------------------------------


def _generate(
    model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, cache: bool
) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(  # type: ignore[operator,no-any-return]
            input_ids=x,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            use_cache=cache,
            pad_token_id=0,
        )


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_greedy_generation_same_with_and_without_cache(kind: str, method: str) -> None:
    config = dt.config_from_dict({"name": method, "num_virtual_tokens": N})
    model = with_prompts(kind, config)
    x = ids(batch=3, seq=5)
    mask = torch.ones_like(x)
    mask[0, :2] = 0  # left padding, as for generation
    x[0, :2] = 0
    cached = _generate(model, x, mask, cache=True)
    plain = _generate(model, x, mask, cache=False)
    assert torch.equal(cached, plain)
    # The prompt changes what is generated.
    base = _generate(MAKERS[kind](), x, mask, cache=True)
    assert not torch.equal(cached, base)
    # A left-padded row generates what the row alone generates.
    alone = _generate(model, x[:1, 2:], mask[:1, 2:], cache=True)
    new = alone[0, 3:]  # (the single row may stop early at EOS; the batch pads after it)
    assert torch.equal(cached[0, 5 : 5 + len(new)], new)


def test_manual_cached_decoding_matches_full_forward() -> None:
    """Step-by-step use of past_key_values (no generate): the cache holds the prompt."""
    model = with_prompts("llama")
    x = ids(batch=2, seq=7)
    with torch.no_grad():
        full = model(input_ids=x).logits
        first = model(input_ids=x[:, :4], attention_mask=torch.ones(2, 4), use_cache=True)
        assert first.logits.shape[1] == 4
        past = first.past_key_values
        assert past.get_seq_length() == N + 4
        steps = []
        for t in range(4, 7):
            out = model(
                input_ids=x[:, t : t + 1],
                attention_mask=torch.ones(2, t + 1),
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            steps.append(out.logits)
    assert (torch.cat(steps, 1) - full[:, 4:]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_single_examples(kind: str, side: str) -> None:
    model = with_prompts(kind)
    lengths = [6, 3, 5]
    rows = [ids(batch=1, seq=n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    x = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for i, row in enumerate(rows):
        sl = slice(6 - len(row), 6) if side == "left" else slice(0, len(row))
        x[i, sl], mask[i, sl] = row, 1
    kwargs = {}
    if kind != "bert":
        # Positions count real tokens only (what generate() passes for padded batches).
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = model(input_ids=x, attention_mask=mask, **kwargs).logits
        for i, row in enumerate(rows):
            single = model(input_ids=row[None]).logits[0]
            got = batch[i] if kind == "bert" else batch[i][mask[i].bool()]
            if kind == "bert" and side == "left":
                continue  # BERT's absolute positions count pads on the left, as for the base
            assert (got - single).abs().max().item() <= 1e-5, (kind, side, i)


# --- several adapters, disable, hooks ----------------------------------------------------


def test_two_active_adapters_concatenate_their_prompts() -> None:
    model = make_llama()
    torch.manual_seed(1)
    dt.inject(model, dt.PromptTuningConfig(num_virtual_tokens=3), "a")
    dt.inject(model, dt.PromptTuningConfig(num_virtual_tokens=2), "b")
    dt.set_active(model, ["a", "b"])
    both = torch.cat([table(model, "a"), table(model, "b")])
    x = ids()
    base = make_llama()
    with torch.no_grad():
        out = model(input_ids=x).logits
        h0 = torch.cat([both.expand(2, -1, -1), base.get_input_embeddings()(x)], 1)
        ref = base(inputs_embeds=h0).logits[:, 5:]
    assert (out - ref).abs().max().item() <= 1e-6


def test_hooks_removed_on_unload_and_delete_and_copy_is_independent() -> None:
    x = ids()
    base = make_llama()
    with torch.no_grad():
        ref = base(input_ids=x).logits
    model = with_prompts("llama")
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(input_ids=x).logits, model(input_ids=x).logits)
    dt.unload(model)
    assert not model._forward_pre_hooks and not model._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, ref)
    # The copy kept its own hook, bound to its own layer.
    with torch.no_grad():
        assert twin(input_ids=x).logits.shape == ref.shape
        assert not torch.equal(twin(input_ids=x).logits, ref)
    dt.delete(twin, "default")
    assert not twin._forward_pre_hooks and not twin._forward_hooks
    assert not any(isinstance(m, VirtualTokenLayer) for m in twin.modules())
    with torch.no_grad():
        assert torch.equal(twin(input_ids=x).logits, ref)


def test_tied_embeddings_stay_tied() -> None:
    model = make_gpt2()  # lm_head is tied to wte
    dt.inject(model, dt.PromptTuningConfig(num_virtual_tokens=N))
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.get_input_embeddings().num_embeddings == 100


# --- initialisation ----------------------------------------------------------------------


def test_text_init_copies_the_words_embeddings() -> None:
    transformers = pytest.importorskip("transformers")
    from deltatune.data.assets import embedded_encoder_path

    try:
        path = embedded_encoder_path()
    except dt.DeltatuneError:
        pytest.skip("embedded MiniLM encoder not installed")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    cfg = transformers.BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    text = "classify the topic"
    dt.inject(
        model,
        dt.PromptTuningConfig(
            num_virtual_tokens=7,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=text,
            tokenizer_name_or_path=str(path),
        ),
    )
    want = tok(text)["input_ids"]  # [CLS] classify the topic [SEP] -> 5 ids, repeated to 7
    want = (want * 2)[:7]
    emb = model.get_input_embeddings().weight
    assert torch.equal(table(model), emb[torch.tensor(want)].detach())


def test_sample_vocab_init_rows_are_vocabulary_rows() -> None:
    model = with_prompts(
        "llama", dt.PromptTuningConfig(num_virtual_tokens=6, prompt_tuning_init="SAMPLE_VOCAB")
    )
    vocab = model.get_input_embeddings().weight.detach()
    for row in table(model):
        assert (vocab == row).all(-1).any()


# --- Hugging Face PEFT: same file format, same outputs -----------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_peft_loads_our_adapter_with_same_outputs(kind: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    task = "SEQ_CLS" if kind == "bert" else "CAUSAL_LM"
    model = with_prompts(kind, dt.PromptTuningConfig(num_virtual_tokens=N, task_type=task))
    if kind == "bert":
        with torch.no_grad():  # a trained head travels too
            model.classifier.modules_to_save["default"].weight.add_(0.3)
    x = ids()
    mask = torch.ones_like(x)
    mask[0, -2:] = 0
    with torch.no_grad():
        ours = model(input_ids=x, attention_mask=mask).logits
    dt.save_adapter(model, tmp_path)
    theirs_model = peft.PeftModel.from_pretrained(MAKERS[kind](), tmp_path).eval()
    with torch.no_grad():
        theirs = theirs_model(input_ids=x, attention_mask=mask).logits
    if kind != "bert":
        theirs = theirs[:, N:]
    assert (ours - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_we_load_peft_adapter_with_same_outputs(kind: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    task = "SEQ_CLS" if kind == "bert" else "CAUSAL_LM"
    torch.manual_seed(0)
    pm = peft.get_peft_model(
        MAKERS[kind](), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N)
    ).eval()
    x = ids()
    with torch.no_grad():
        theirs = pm(input_ids=x).logits
    pm.save_pretrained(str(tmp_path))
    model = MAKERS[kind]()
    dt.load_adapter(model, tmp_path)
    with torch.no_grad():
        ours = model(input_ids=x).logits
    if kind != "bert":
        theirs = theirs[:, N:]
    assert (ours - theirs).abs().max().item() <= 1e-5


# --- bad input -----------------------------------------------------------------------------


def test_bad_input_raises_clear_errors() -> None:
    with pytest.raises(dt.ConfigError, match="num_virtual_tokens=0"):
        dt.PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(dt.ConfigError, match="tokenizer_name_or_path"):
        dt.PromptTuningConfig(prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")
    with pytest.raises(dt.ConfigError, match="prompt_tuning_init_text"):
        dt.PromptTuningConfig(prompt_tuning_init="TEXT", tokenizer_name_or_path="x")
    with pytest.raises(dt.ConfigError, match="prompt_tuning_init"):
        dt.config_from_dict({"name": "prompt_tuning", "prompt_tuning_init": "WORDS"})
    with pytest.raises(dt.ConfigError, match="token_dim=64"):
        dt.inject(make_llama(), dt.PromptTuningConfig(token_dim=64))
    with pytest.raises(dt.ConfigError, match="get_input_embeddings"):
        dt.inject(make_cnn(), dt.PromptTuningConfig())
    with pytest.raises(dt.ConfigError, match="tokenizer_name_or_path='/nonexistent'"):
        dt.inject(
            make_llama(),
            dt.PromptTuningConfig(
                prompt_tuning_init="TEXT",
                prompt_tuning_init_text="hi",
                tokenizer_name_or_path="/nonexistent",
            ),
        )
    model = with_prompts("llama")
    with pytest.raises(dt.ConfigError, match="2-D"):
        model(input_ids=ids(), attention_mask=torch.ones(2, 1, 6, 6))
    # a failed inject leaves no wrapper and no hook behind
    plain = make_llama()
    with pytest.raises(dt.ConfigError):
        dt.inject(plain, dt.PromptTuningConfig(token_dim=8))
    assert not plain._forward_pre_hooks
    assert not any(isinstance(m, VirtualTokenLayer) for m in plain.modules())


# --- real asset: the embedded MiniLM encoder -------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_minilm_real_text_peft_parity_and_padding(method: str, tmp_path: Path) -> None:
    """On the real MiniLM with its tokenizer: TEXT init (prompt tuning), a padded batch of real
    sentences equals each sentence alone, and PEFT loads the adapter with the same logits."""
    peft = pytest.importorskip("peft")
    from transformers import AutoTokenizer, BertForSequenceClassification

    from deltatune.data.assets import embedded_encoder_path

    try:
        path = embedded_encoder_path()
    except dt.DeltatuneError:
        pytest.skip("embedded MiniLM encoder not installed")

    def load() -> torch.nn.Module:
        torch.manual_seed(0)  # the new head is random: the same one for both libraries
        return BertForSequenceClassification.from_pretrained(path, num_labels=5).eval()

    tok = AutoTokenizer.from_pretrained(path)
    texts = ["Shares rose sharply after the results.", "The match ended in a draw.", "Hi"]
    batch = tok(texts, padding=True, return_tensors="pt")
    options = (
        {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "Topic:"}
        | {"tokenizer_name_or_path": "embedded-minilm"}
        if method == "prompt_tuning"
        else {"encoder_hidden_size": 64}
    )
    model = load()
    torch.manual_seed(1)
    cfg = {"name": method, "num_virtual_tokens": 8, "task_type": "SEQ_CLS", **options}
    dt.inject(model, dt.config_from_dict(cfg))
    with torch.no_grad():
        out = model(**batch).logits
        for i, text in enumerate(texts):
            alone = model(**tok([text], return_tensors="pt")).logits[0]
            assert (out[i] - alone).abs().max().item() <= 1e-5
    dt.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(load(), tmp_path).eval()
    with torch.no_grad():
        ref = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (out - ref).abs().max().item() <= 1e-5
