"""The training data pipeline: packing, chat loss masks, determinism, sharding, exact resume, a
finite pass training on every token once whatever the batch size, bad input named by file and
line, and the held-out language reference never trained on.

Most tests use a byte tokenizer (token = UTF-8 byte, EOS = 256), so every row decodes back to
the text it came from; the chat test uses SmolLM2's real tokenizer and chat template.
"""

import json
import re

import numpy as np
import pytest

from compress.data import corpus
from compress.data.docstrings import stdlib_modules
from compress.data.examples import encode_document
from compress.data.pipeline import BATCH_KEYS, DataConfig, train_batches
from compress.data.sources import TextDocument, read_sources
from compress.errors import InputError

EOS = 256


class ByteTokenizer:
    """Token ids are UTF-8 bytes; a chat renders as <role>content</> with <assistant> as the generation prompt."""

    eos_token_id = EOS

    def encode(self, text, add_special_tokens=True):
        return list(text.encode("utf-8"))

    def apply_chat_template(self, conversation, *, tokenize, add_generation_prompt):
        text = "".join(f"<{m['role']}>{m['content']}</>" for m in conversation)
        return text + ("<assistant>" if add_generation_prompt else "")


def _text(ids) -> str:
    return bytes(int(i) for i in ids if i < 256).decode("utf-8", errors="replace")


def _batches(config, count=None, tokenizer=None, **kwargs):
    """The first `count` batches (all of them when None) of a fresh iterator."""
    iterator = iter(train_batches(config, tokenizer or ByteTokenizer(), **{"shard_index": 0, "shard_count": 1, **kwargs}))
    try:
        return [next(iterator) for _ in range(count)] if count is not None else list(iterator)
    finally:
        iterator.close()


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _documents(texts):
    return [TextDocument(text, f"doc {i}") for i, text in enumerate(texts)]


def _uneven_texts(count=37, seed=0):
    """`count` distinct documents from 3 to ~300 bytes: rows of 16 take from under one to many of them."""
    rng = np.random.default_rng(seed)
    return [f"{i:02d}:" + "".join(rng.choice(list("abcdefgh"), rng.integers(0, 300 if i % 5 == 0 else 40)))
            for i in range(count)]


def _trained_documents(batches):
    """The loss-counted targets of the batches' rows in order (row by row), cut after each EOS:
    one text per document (its bytes but the first, as targets are)."""
    targets = np.concatenate([batch["targets"][batch["loss_mask"] > 0] for batch in batches])
    pieces = np.split(targets, np.flatnonzero(targets == EOS) + 1)
    assert len(pieces[-1]) == 0  # the stream ends with a document's EOS
    return [_text(piece) for piece in pieces[:-1]]


def _rows(batches):
    """The batches' rows in order, each a dict of [seq_len] arrays."""
    return [{key: batch[key][i] for key in BATCH_KEYS} for batch in batches for i in range(len(batch["inputs"]))]


def _assert_equal_batches(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(g[key], w[key], err_msg=key)


# ----------------------------------------------------------------------------- packing


def test_rows_pack_documents_with_segments_positions_targets_and_mask():
    texts = ["ab", "cdefghijklmnopq", "r", "stuvw"]  # the second is longer than a row: split, not dropped
    config = DataConfig(seq_len=8, batch_size=1, shuffle=False, epochs=1, prefetch=0)
    batches = _batches(config, documents=_documents(texts))
    for batch in batches:
        assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
            "inputs": ((1, 8), "int32"), "targets": ((1, 8), "int32"), "segment_ids": ((1, 8), "int32"),
            "positions": ((1, 8), "int32"), "loss_mask": ((1, 8), "float32"),
        }
    rows = {key: np.concatenate([b[key][0] for b in batches]) for key in BATCH_KEYS}
    real = rows["segment_ids"] > 0

    # Every document's tokens (text then EOS) arrive whole and in order: inputs are all but
    # the last token, targets all but the first, so no prediction is lost at a row's end.
    tokens = [list(t.encode()) + [EOS] for t in texts]
    assert rows["inputs"][real].tolist() == sum((t[:-1] for t in tokens), [])
    assert rows["targets"][real].tolist() == sum((t[1:] for t in tokens), [])
    np.testing.assert_array_equal(rows["loss_mask"], real.astype(np.float32))  # only padding is masked
    assert real[: real.sum()].all() and not real[real.sum() :].any()  # padding only where the stream ends
    assert (rows["inputs"][~real] == 0).all() and (rows["positions"][~real] == 0).all()

    for batch in batches:
        segments, positions = batch["segment_ids"][0], batch["positions"][0]
        numbers = segments[segments > 0]
        assert numbers[0] == 1 and set(np.diff(numbers)) <= {0, 1}  # 1, 2, ... in order
        for number in set(numbers.tolist()):
            assert positions[segments == number].tolist() == list(range((segments == number).sum()))
    # The 15-byte document fills rows: its piece in the second row restarts at position 0.
    assert batches[1]["segment_ids"][0].tolist() == [1] * 8 and batches[1]["positions"][0, 0] == 0


def test_chat_loss_mask_covers_only_the_assistant_turns(tmp_path):
    from compress.formats.registry import resolve
    from compress.formats.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve("smollm2-135m-instruct"))
    chats = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                      {"role": "assistant", "content": "Hello! How can I help?"},
                      {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]},
        {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
    ]
    path = _write_jsonl(tmp_path / "chats.jsonl", chats)
    documents = read_sources([path])
    example = encode_document(documents[0], tokenizer)
    trained = example["targets"][example["loss_mask"] > 0]
    assert tokenizer.decode(trained) == "Hello! How can I help?<|im_end|>\nIt is 4.<|im_end|>\n"
    untrained = tokenizer.decode(example["targets"][example["loss_mask"] == 0])
    assert "Hi there" in untrained and "What is 2+2?" in untrained and "<|im_start|>assistant\n" in untrained
    # Inputs and targets are the template's whole rendering, shifted by one token.
    rendered = tokenizer.apply_chat_template(chats[0]["messages"], tokenize=False)
    assert tokenizer.decode(example["inputs"]) + tokenizer.decode(example["targets"][-1:]) == rendered

    # Through the pipeline (rows of 16 split the chats): the masked targets are the answers, in order.
    config = DataConfig(sources=(path,), seq_len=16, batch_size=1, shuffle=False, epochs=1, prefetch=0)
    batches = _batches(config, tokenizer=tokenizer)
    targets = np.concatenate([b["targets"][0] for b in batches])
    mask = np.concatenate([b["loss_mask"][0] for b in batches])
    assert tokenizer.decode(targets[mask > 0]) == (
        "Hello! How can I help?<|im_end|>\nIt is 4.<|im_end|>\nBlue.<|im_end|>\n"
    )


# ----------------------------------------------------------------------------- order, shards, resume


def test_a_seed_gives_the_same_batches_and_another_seed_others():
    config = DataConfig(sources=("pydoc",), seq_len=32, batch_size=4, seed=3)
    first = _batches(config, 6)
    _assert_equal_batches(_batches(config, 6), first)
    other = _batches(DataConfig(sources=("pydoc",), seq_len=32, batch_size=4, seed=4), 6)
    assert not all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other))


@pytest.mark.parametrize("epochs", [2, None])
def test_shards_split_each_batch_disjointly_and_cover_every_document(epochs):
    # 12 documents of 7 bytes + EOS = 7 (input, target) pairs each; rows of 21 hold exactly
    # three, so one batch of 4 rows is one whole epoch, finite (one stream) or not (a stream per row).
    texts = [f"doc {i:02d}." for i in range(12)]
    config = DataConfig(seq_len=21, batch_size=4, epochs=epochs, seed=5, prefetch=0)
    count = None if epochs else 2  # all the batches of a finite pass
    whole = _batches(config, count, documents=_documents(texts))
    assert len(whole) == 2  # one batch per epoch
    shards = [_batches(config, count, documents=_documents(texts), shard_index=i, shard_count=2) for i in range(2)]
    assert [len(shard) for shard in shards] == [2, 2]

    for epoch, batch in enumerate(whole):
        seen = []
        for index, shard in enumerate(shards):
            part = shard[epoch]
            for key in BATCH_KEYS:  # process i yields rows [2i, 2i + 2) of the one-process batch
                np.testing.assert_array_equal(part[key], batch[key][2 * index : 2 * index + 2])
            seen.append({_text(document) for row in part["inputs"] for document in np.split(row, 3)})
        assert not seen[0] & seen[1]  # disjoint
        assert seen[0] | seen[1] == set(texts)  # together, every document
    assert not np.array_equal(whole[0]["inputs"], whole[1]["inputs"])  # each epoch in a new order


@pytest.mark.parametrize(
    "epochs, layout",
    [(1, [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]),  # one stream, cut batch_size rows at a time
     (None, [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11]])],  # row r reads documents r, r + B, r + 2B
)
def test_rows_take_the_documents_the_docstring_says(epochs, layout):
    texts = [f"doc {i:02d}." for i in range(12)]  # 7 (input, target) pairs each: three fill a row of 21
    config = DataConfig(seq_len=21, batch_size=4, epochs=epochs, shuffle=False, prefetch=0)
    batch = _batches(config, 1, documents=_documents(texts))[0]
    assert [[_text(document) for document in np.split(row, 3)] for row in batch["inputs"]] == [
        [texts[i] for i in row] for row in layout
    ]


def test_a_finite_pass_trains_on_every_token_once_whatever_the_batch_size_and_processes():
    texts = _uneven_texts()
    documents = _documents(texts)
    want = sorted(text[1:] for text in texts)  # each document's targets: its bytes but the first, then EOS

    def run(batch_size, epochs=1, **kwargs):
        config = DataConfig(seq_len=16, batch_size=batch_size, epochs=epochs, seed=3, prefetch=0)
        return _batches(config, documents=documents, **kwargs)

    one = run(1)
    assert sorted(_trained_documents(one)) == want  # every document's tokens, once
    assert _trained_documents(one) != [text[1:] for text in texts]  # in the seed's order, not the order read

    # Batches of 8: the same rows in the same order, 8 at a time, the last batch completed with
    # padding rows; so the same tokens, every one trained on once.
    eight = run(8)
    assert all(batch["inputs"].shape == (8, 16) for batch in eight) and len(eight) == -(-len(one) // 8)
    rows = _rows(eight)
    padding = len(rows) - len(one)
    assert 0 < padding < 8  # (these documents leave a partial last batch)
    for got, row in zip(rows, _rows(one)):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(got[key], row[key], err_msg=key)
    for row in rows[len(one) :]:
        for key in BATCH_KEYS:
            assert not row[key].any(), key
    real = np.concatenate([row["segment_ids"] for row in rows]) > 0
    assert real[: real.sum()].all()  # padding only at the end: in the last real row and the rows after it
    np.testing.assert_array_equal(np.concatenate([row["loss_mask"] for row in rows]), real.astype(np.float32))
    assert sorted(_trained_documents(eight)) == want

    # Two processes: each yields its half of every one of those batches, padding rows included.
    halves = [run(8, shard_index=i, shard_count=2) for i in range(2)]
    assert [len(half) for half in halves] == [len(eight)] * 2
    for batch, first, second in zip(eight, *halves):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), batch[key], err_msg=key)

    # Two epochs: every document twice, each epoch in its own order, packed across the boundary.
    first, second = np.split(np.asarray(_trained_documents(run(8, epochs=2)), dtype=object), [len(texts)])
    assert sorted(first) == want and sorted(second) == want and list(first) != list(second)

    # Fewer documents than rows: a finite pass still takes them all (padding rows fill the batch).
    few = _batches(DataConfig(seq_len=16, batch_size=8, epochs=1, prefetch=0), documents=documents[:3])
    assert sorted(_trained_documents(few)) == sorted(text[1:] for text in texts[:3])


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("data", ["pydoc", "exact_fit", "one_epoch"])
def test_a_restored_iterator_yields_exactly_the_next_batches(tmp_path, prefetch, data):
    import grain
    from etils import epath

    count = 12
    if data == "exact_fit":  # documents of 7 (input, target) pairs, two per row: rows end at document ends
        kwargs = dict(documents=_documents([f"doc {i:02d}." for i in range(40)]))
        config = DataConfig(seq_len=14, batch_size=2, seed=1, prefetch=prefetch)
    elif data == "one_epoch":  # a finite pass, saved inside a document and read to its padded end
        kwargs = dict(documents=_documents(_uneven_texts()))
        config = DataConfig(seq_len=16, batch_size=4, seed=1, epochs=1, prefetch=prefetch)
        count = None
    else:
        kwargs = {}
        config = DataConfig(sources=("pydoc",), seq_len=48, batch_size=4, seed=1, prefetch=prefetch)
    uninterrupted = _batches(config, count, **kwargs)
    if data == "one_epoch":
        assert len(uninterrupted) > 12 and uninterrupted[6]["targets"][-1, -1] != EOS  # a document continues at 7
        assert not uninterrupted[-1]["segment_ids"][-1].any()  # the last batch ends with a padding row

    # Saved and restored by Grain's checkpoint handler (JSON on disk), as a training run's checkpoints are.
    iterator = iter(train_batches(config, ByteTokenizer(), shard_index=0, shard_count=1, **kwargs))
    for _ in range(7):
        next(iterator)
    grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), item=iterator)
    iterator.close()

    restored = iter(train_batches(config, ByteTokenizer(), shard_index=0, shard_count=1, **kwargs))
    grain.checkpoint.CheckpointHandler().restore(epath.Path(tmp_path), item=restored)
    rest = list(restored) if count is None else [next(restored) for _ in range(5)]
    _assert_equal_batches(rest, uninterrupted[7 : count and 12])
    restored.close()


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "fine"', r"not valid JSON \(Expecting ',' delimiter at column 16\)"),
        ('{"content": "x"}', r"no 'text', 'messages' or 'prompt'/'response' key \(keys: 'content'\)"),
        ('{"prompt": "x"}', r"a 'prompt' needs a 'response' .* \(no 'response'\)"),
        ('{"prompt": "x", "response": 3}', r"'response' must be a string, got a number"),
        ('{"text": 5}', r"'text' must be a string, got a number"),
        ('["text"]', r"expected a JSON object .* got an array"),
        ('{"text": "a\\ud800b"}', r"'text' holds a lone surrogate \(U\+D800 at character 1\)"),
        ('{"messages": "hi"}', r"'messages' must be a non-empty list .* got a string"),
        ('{"messages": [{"role": "user"}]}', r"messages\[0\] has no 'content'"),
        ('{"messages": [{"role": "user", "content": "x\\udfffy"}, {"role": "assistant", "content": "z"}]}',
         r"messages\[0\].content holds a lone surrogate"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', r"the chat has no 'assistant' message"),
    ],
)
def test_bad_jsonl_lines_fail_naming_file_and_line(tmp_path, line, message):
    path = _write_jsonl(tmp_path / "data.jsonl", ['{"text": "a good line"}', "", line])
    with pytest.raises(InputError, match=rf"^{re.escape(path)}:3: {message}"):
        read_sources([path])


def test_with_an_errors_file_bad_lines_are_recorded_there_and_the_good_ones_kept(tmp_path):
    lines = ['{"text": "first"}', '{"text": 5}', "not json", b'{"text": "caf\xe9"}', '{"prompt": "p", "response": "r"}']
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    errors = str(tmp_path / "out" / "bad-lines.jsonl")
    documents = read_sources([str(path)], errors=errors)
    assert [getattr(d, "text", None) for d in documents] == ["first", None]
    assert documents[1].messages == ({"role": "user", "content": "p"}, {"role": "assistant", "content": "r"})
    bad = [json.loads(line) for line in open(errors)]
    assert [b["where"] for b in bad] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert "'text' must be a string" in bad[0]["error"] and bad[1]["line"] == "not json"
    assert "not UTF-8" in bad[2]["error"] and bad[2]["line"] == '{"text": "caf\ufffd"}'
    read_sources(["pydoc"], errors=errors)  # a clean read leaves an empty record
    assert open(errors).read() == ""


def test_prompt_response_lines_train_on_the_response_only(tmp_path):
    from compress.formats.registry import resolve
    from compress.formats.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve("smollm2-135m-instruct"))
    path = _write_jsonl(tmp_path / "pairs.jsonl", [{"system": "Be brief.", "prompt": "Name a colour.",
                                                    "response": "Blue."}])
    example = encode_document(read_sources([path])[0], tokenizer)
    assert tokenizer.decode(example["targets"][example["loss_mask"] > 0]) == "Blue.<|im_end|>\n"
    assert "Be brief." in tokenizer.decode(example["inputs"])


def test_other_bad_input_fails_before_training(tmp_path):
    binary = tmp_path / "latin1.jsonl"
    binary.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InputError, match=rf"^{re.escape(str(binary))}:2: not UTF-8"):
        read_sources([str(binary)])
    with pytest.raises(InputError, match="no such file or directory.*built-in corpora: pydoc, stdlib"):
        train_batches(DataConfig(sources=(str(tmp_path / "missing.txt"),)), ByteTokenizer(), shard_index=0, shard_count=1)
    few = _write_jsonl(tmp_path / "few.jsonl", [{"text": "one"}, {"text": "two"}])
    with pytest.raises(InputError, match="2 documents for batches of 4 rows; with epochs None every row"):
        train_batches(DataConfig(sources=(few,), batch_size=4), ByteTokenizer(), shard_index=0, shard_count=1)
    with pytest.raises(InputError, match="the documents given: no documents to train on"):
        train_batches(DataConfig(epochs=1), ByteTokenizer(), shard_index=0, shard_count=1, documents=[])
    with pytest.raises(InputError, match="batch_size=6 rows cannot be shared by 4 processes"):
        train_batches(DataConfig(batch_size=6), ByteTokenizer(), shard_index=1, shard_count=4)
    with pytest.raises(InputError, match="seq_len must be an integer >= 1"):
        DataConfig(seq_len=0)


def test_directories_and_text_files_are_read_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n\nstill the second document", encoding="utf-8")
    (tmp_path / "a.md").write_text("first", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text('{"text": "third"}\n\n{"text": "  "}\n', encoding="utf-8")  # a blank text is skipped
    (tmp_path / "notes.bin").write_bytes(b"\xff")  # neither text nor JSONL: not read
    documents = read_sources([str(tmp_path)])
    assert [d.text for d in documents] == ["first", "second file\n\nstill the second document", "third"]
    assert documents[2].where == f"{tmp_path / 'c.jsonl'}:1"


# ----------------------------------------------------------------------------- the default corpus


def test_the_held_out_language_reference_is_never_in_the_training_stream():
    train, held_out = corpus.pydoc_split()
    window = 48
    train_windows = {train[i : i + window] for i in range(len(train) - window + 1)}
    # Windows of each held-out topic that the train part does not also contain (topics share
    # boilerplate), 16 per topic: any held-out topic in the stream would show them.
    held_out_topics = [t for i, t in enumerate(corpus.pydoc_topics().values()) if corpus.is_held_out(i)]
    probes = []
    for topic in held_out_topics:
        unique = [topic[i : i + window] for i in range(0, len(topic) - window + 1, 7) if topic[i : i + window] not in train_windows]
        probes += unique[:: max(1, len(unique) // 16)][:16]
    assert len(probes) > 200

    config = DataConfig(seq_len=1024, batch_size=8, epochs=1)  # the default sources: pydoc and stdlib
    assert config.sources == ("pydoc", "stdlib")
    stream = "\0".join(
        _text(row[segments == s])
        for batch in _batches(config)
        for row, segments in zip(batch["inputs"], batch["segment_ids"])
        for s in np.unique(segments[segments > 0])
    )
    assert not [p for p in probes if p in stream]
    # The probe can find text: windows of the train part are in the stream.
    train_probes = [t[100 : 100 + window] for t in train.split("\n\n") if len(t) > 200][:50]
    assert sum(p in stream for p in train_probes) >= 45  # a few may straddle a row's end


def test_stdlib_docstrings_are_walked_in_order_without_tests_gui_or_the_language_reference():
    modules = stdlib_modules()
    names = [m.module for m in modules]
    assert names == [m.module for m in stdlib_modules()] and len(names) > 300
    assert [m.path for m in modules] == sorted(m.path for m in modules)
    assert "json.decoder" in names and "asyncio.events" in names
    banned = ("test", "idlelib", "tkinter", "turtledemo", "pydoc_data", "encodings", "ensurepip")
    assert not [n for n in names if n.split(".")[0] in banned or ".test" in n or n.split(".")[-1].startswith("test_")]
    text = next(m for m in modules if m.module == "json.decoder").text
    assert text.startswith("json.decoder\nImplementation of JSONDecoder") and "json.decoder.JSONDecoder\n" in text
