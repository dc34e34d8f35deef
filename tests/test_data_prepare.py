"""The pipeline: token files that decode back to the source, meta.json, held-out validation, workers,
re-runs (nothing to do, refused, --overwrite), bad inputs, and the gemma and bpe tokenizers end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import DOCS, hub_layout  # tests/ is on sys.path (pytest's rootdir import mode)

from nanogemma.data import load_data_tokenizer, prepare, read_meta, read_tokens, verify
from nanogemma.data.prepare import default_out, held_out
from nanogemma.data.store import sha256_file
from nanogemma.errors import NanogemmaError


@pytest.fixture
def run(gpt2_tiktoken_file, monkeypatch):
    """prepare() with the test defaults: the local GPT-2 ranks file, one process, no progress bar."""
    def offline(name):
        raise ConnectionError("offline")

    monkeypatch.setattr("tiktoken.get_encoding", offline)  # the same on machines with and without network

    def go(source, out, **kw):
        kw = {"tokenizer_file": gpt2_tiktoken_file, "workers": 1, **kw}
        return prepare(source, out, **kw)

    return go


def corpus(tmp_path, n=400, name="corpus.txt"):
    docs = [f"Document {i}: " + DOCS[i % len(DOCS)] for i in range(n)]
    path = tmp_path / name
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path, docs


def test_meta_and_round_trip_gpt2(run, tmp_path):
    path, docs = corpus(tmp_path)
    r = run(str(path), tmp_path / "out", val_fraction=0.1)
    m = read_meta(tmp_path / "out")
    assert m == r.meta and not r.skipped
    assert m["tokenizer"] == {"spec": "gpt2", "vocab_size": 50257, "eot_id": 50256, "bos_id": None,
                              "document": "text <|endoftext|>", "files": ["gpt2.tiktoken"]}
    assert m["dtype"] == "uint16" and m["source"]["files"][0]["path"] == str(path.resolve())
    tok = load_data_tokenizer(folder=tmp_path / "out")
    train, val = read_tokens(tmp_path / "out", "train"), read_tokens(tmp_path / "out", "val")
    assert train.dtype == np.uint16 and m["splits"]["train"]["tokens"] == len(train)
    got_train, got_val = tok.decode_documents(train), tok.decode_documents(val)
    # Validation is the held-out fraction, chosen by content; together the splits are the source, in order.
    assert got_val == [d for d in docs if d in set(got_val)] and got_train == [d for d in docs if d not in got_val]
    assert 20 <= len(got_val) <= 60 and m["splits"]["val"]["documents"] == len(got_val)
    assert m["splits"]["train"]["documents"] + len(got_val) == len(docs)
    for name, digest in m["checksums"].items():
        assert sha256_file(tmp_path / "out" / name) == digest
    verify(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpt2.tiktoken", "meta.json", "train.bin",
                                                                      "val.bin"]


def test_held_out_rule_is_by_content():
    key = b"k" * 32
    picks = [held_out(f"doc {i}", key, int(0.25 * 2**64)) for i in range(4000)]
    assert 900 < sum(picks) < 1100 and picks == [held_out(f"doc {i}", key, int(0.25 * 2**64)) for i in range(4000)]


def test_workers_give_identical_files(run, tmp_path):
    path, _ = corpus(tmp_path, 3000)
    a = run(str(path), tmp_path / "one", workers=1)
    b = run(str(path), tmp_path / "two", workers=2)
    assert a.meta["checksums"] == b.meta["checksums"]


def test_hub_layout_and_hub_adapter_give_the_same_files(run, tmp_path, monkeypatch):
    root = hub_layout(tmp_path / "hub")
    local = run(str(root), tmp_path / "local")
    hub = run(f"hf:{root}", tmp_path / "viahub", workers=2)
    assert local.meta["checksums"] == hub.meta["checksums"]
    assert local.meta["validation"] == "the source's validation split"
    tok = load_data_tokenizer(folder=tmp_path / "viahub")
    assert tok.decode_documents(read_tokens(tmp_path / "viahub", "train")) == DOCS
    assert tok.decode_documents(read_tokens(tmp_path / "viahub", "val")) == ["A val story.", "Another one."]

    def unreachable(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr("datasets.load_dataset", unreachable)  # a finished job is not re-checked online
    assert run(f"hf:{root}", tmp_path / "viahub").skipped


def test_rerun_does_nothing_other_arguments_are_refused(run, tmp_path):
    path, _ = corpus(tmp_path)
    out = tmp_path / "out"
    run(str(path), out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run(str(path), out, workers=2)  # the number of workers is not an argument that changes the data
    assert again.skipped and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(NanogemmaError, match=r"already holds data prepared with other arguments \(val_fraction: "
                                             r"0.01 -> 0.2\); pass --overwrite"):
        run(str(path), out, val_fraction=0.2)
    r = run(str(path), out, val_fraction=0.2, overwrite=True)
    assert not r.skipped and r.meta["recipe"]["val_fraction"] == 0.2
    path.write_text("changed\n" * 10)  # a changed input is other arguments too
    with pytest.raises(NanogemmaError, match="other arguments"):
        run(str(path), out, val_fraction=0.2)


def test_damaged_output_is_redone_foreign_files_refused(run, tmp_path):
    path, _ = corpus(tmp_path)
    out = tmp_path / "out"
    first = run(str(path), out)
    (out / "train.bin").write_bytes(b"\0\0")
    again = run(str(path), out)
    assert not again.skipped and again.meta["checksums"] == first.meta["checksums"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "train.bin").write_bytes(b"mine")
    with pytest.raises(NanogemmaError, match="holds train.bin but no meta.json"):
        run(str(path), other)
    assert (other / "train.bin").read_bytes() == b"mine"


def test_bad_inputs_warn_once_each(run, tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_bytes(b"fine\nbad \xff byte\n\n\nalso fine\n")
    (tmp_path / "src" / "b.txt").write_bytes(b"")
    (tmp_path / "src" / "c.jsonl").write_text('{"text": ""}\n')
    (tmp_path / "src" / "d.txt").write_text("".join(f"line {i}\n" for i in range(40)))
    r = run(str(tmp_path / "src"), tmp_path / "out", val_fraction=0.3, delimiter="line")
    err = capsys.readouterr().err.splitlines()
    assert "nanogemma: warning: replaced 1 invalid UTF-8 byte(s) with U+FFFD (a.txt: 1)" in err
    assert "nanogemma: warning: skipped 3 empty document(s)" in err
    assert sum("holds no documents" in line for line in err) == 2 and len(err) == 4
    assert r.meta["bad_utf8_bytes"] == 1 and r.meta["empty_documents_skipped"] == 3


def test_empty_source_and_empty_validation_are_errors(run, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(NanogemmaError, match="holds no documents for training"):
        run(str(tmp_path / "empty.txt"), tmp_path / "o1")
    (tmp_path / "one.txt").write_text("just one document\n")
    with pytest.raises(NanogemmaError, match=r"no document fell into the held-out validation split.*--val-fraction"):
        run(str(tmp_path / "one.txt"), tmp_path / "o2", val_fraction=0.001)
    assert not (tmp_path / "o2" / "meta.json").exists() and (tmp_path / "o2" / ".partial").exists()
    with pytest.raises(NanogemmaError, match="unknown tokenizer 'gpt-2'"):
        run(str(tmp_path / "one.txt"), tmp_path / "o3", tokenizer="gpt-2")
    assert not (tmp_path / "o3").exists()


def test_bpe_trained_on_the_training_split_only(run, tmp_path):
    path, docs = corpus(tmp_path, 600)
    r = run(str(path), tmp_path / "out", tokenizer="bpe:320", workers=2, val_fraction=0.1)
    m = r.meta
    assert m["tokenizer"]["files"] == ["tokenizer.json"] and m["tokenizer"]["vocab_size"] <= 320
    tok = load_data_tokenizer("bpe:320", tmp_path / "out")
    assert tok.decode_documents(read_tokens(tmp_path / "out", "train")) + \
        tok.decode_documents(read_tokens(tmp_path / "out", "val")) != []
    assert sorted(tok.decode_documents(read_tokens(tmp_path / "out", "train")) +
                  tok.decode_documents(read_tokens(tmp_path / "out", "val"))) == sorted(docs)
    with pytest.raises(NanogemmaError, match="was prepared with the bpe:320 tokenizer, not gpt2"):
        load_data_tokenizer("gpt2", tmp_path / "out")


def test_gemma_end_to_end(run, tmp_path, gguf_path):
    text = "\n<|endoftext|>\n".join(DOCS + ["Two\nlines, and a literal <eos> inside."])
    (tmp_path / "TinyStories-train.txt").write_text(text)
    (tmp_path / "TinyStories-valid.txt").write_text("Valid one.\n<|endoftext|>\nValid two.")
    r = run(str(tmp_path), tmp_path / "out", tokenizer="gemma", delimiter="<|endoftext|>", workers=2)
    m = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert m == r.meta and m["dtype"] == "uint32" and m["tokenizer"]["document"] == "<bos> text <eos>"
    tok = load_data_tokenizer(folder=tmp_path / "out")
    train = read_tokens(tmp_path / "out", "train")
    assert train.dtype == np.uint32 and train[0] == 2 and train[-1] == 1
    # Delimited documents lose the whitespace around them (the delimiter usually sits on its own line).
    assert tok.decode_documents(train) == [d.strip() for d in DOCS] + ["Two\nlines, and a literal <eos> inside."]
    assert tok.decode_documents(read_tokens(tmp_path / "out", "val")) == ["Valid one.", "Valid two."]


def test_default_out_names():
    assert default_out(None, "gpt2").as_posix() == "data/tinystories-gpt2"
    assert default_out("synthetic:1000", "bpe:512").as_posix() == "data/synthetic-1000-bpe512"
    assert default_out(["/x/My Corpus.txt.gz"], "gemma").as_posix() == "data/my-corpus-gemma"


def test_small_corpus_holds_out_one_document_bpe_says_its_size_and_the_bar_has_a_total(run, tmp_path, capsys):
    """168 files at --val-fraction 0.01 may hold out none: one document is held out, and said so; a BPE
    asked for more ids than the text supports says how many it made; the bar counts bytes of a known total."""
    (tmp_path / "src").mkdir()
    for i in range(12):
        (tmp_path / "src" / f"f{i}.md").write_text(f"# Note {i}\n\nA short note about item {i}.\n")
    r = run(str(tmp_path / "src"), tmp_path / "out", val_fraction=1e-9, tokenizer="bpe:3000", progress=True)
    err = capsys.readouterr().err
    assert r.meta["splits"]["val"]["documents"] == 1 and r.meta["splits"]["train"]["documents"] == 11
    assert "--val-fraction 1e-09 of 12 documents holds out none: holding out 1 document(s)" in err
    assert "holding out 1 document(s) for validation" in r.meta["validation"]
    ids = r.meta["tokenizer"]["vocab_size"]
    assert ids < 3000 and f"bpe:3000 produced {ids:,} ids: its training text has no more distinct pairs" in err
    total = sum(p.stat().st_size for p in (tmp_path / "src").iterdir())
    assert f"/{total}" in err.replace(".00", "") or f"{total}/{total}" in err
