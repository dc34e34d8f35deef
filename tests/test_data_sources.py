"""Reading documents from every source kind: text, JSON lines, Parquet (plain and gzipped), folders laid
out as the Hugging Face hub, the `datasets` adapter on such a folder, and the bad inputs of each."""

from __future__ import annotations

import gzip
import json

import pytest
from helpers import DOCS, hub_layout, write_parquet  # tests/ is on sys.path (pytest's rootdir import mode)

from nanogemma.data.chunks import split_file
from nanogemma.data.sources import HubSource, LocalSource, SyntheticSource, open_source
from nanogemma.errors import NanogemmaError


def read_all(src, split="train"):
    texts, bad, empty = [], 0, 0
    for chunk in src.chunks(split):
        d = chunk.read()
        texts += d.texts
        bad += d.bad_bytes
        empty += d.empty
    return texts, bad, empty


def test_txt_one_document_per_line(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("\n".join(DOCS).encode() + b"\r\n\n   \nlast line without newline\r\n")
    texts, bad, empty = read_all(open_source(str(p), delimiter="line"))  # auto: one document (blank lines)
    assert texts == DOCS + ["last line without newline"]
    assert (bad, empty) == (0, 2)  # the blank and the whitespace-only line


def test_txt_delimited_and_gzipped(tmp_path):
    text = "\n<|endoftext|>\n".join(["Story one.\nWith two lines.", "Story two.", "", "Story three."])
    p = tmp_path / "stories.txt.gz"
    p.write_bytes(gzip.compress((text + "\n<|endoftext|>\n").encode()))
    texts, _, empty = read_all(open_source(str(p), delimiter="<|endoftext|>"))
    assert texts == ["Story one.\nWith two lines.", "Story two.", "Story three."]
    assert empty == 1


def test_split_file_cuts_only_after_separators(tmp_path):
    p = tmp_path / "x.txt"
    lines = [f"line {i} " + "é" * (i % 50) for i in range(3000)]
    p.write_text("\n".join(lines), encoding="utf-8")
    pieces = list(split_file(p, b"\n", block=1000))
    assert len(pieces) > 10 and all(d.endswith(b"\n") for d, _ in pieces[:-1])
    assert b"".join(d for d, _ in pieces).decode() == "\n".join(lines)
    assert [n for _, n in pieces[:3]] == [0, pieces[0][0].count(b"\n"), sum(d.count(b"\n") for d, _ in pieces[:2])]


def test_a_missing_delimiter_stops_early(tmp_path, monkeypatch):
    monkeypatch.setattr("nanogemma.data.chunks.MAX_DOCUMENT_BYTES", 5000)
    p = tmp_path / "a.txt"
    p.write_text("no delimiter here " * 1000)
    with pytest.raises(NanogemmaError, match=r"no '<\|endoftext\|>' in the first 6,000 bytes; is the --delimiter right\?"):
        list(split_file(p, b"<|endoftext|>", block=1000))


def test_jsonl_plain_and_gzipped_with_field(tmp_path):
    rows = [{"story": t, "n": i} for i, t in enumerate(DOCS)] + [{"story": None}, {"story": ""}]
    body = "\n".join(json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(rows)) + "\n\n"
    (tmp_path / "a.jsonl").write_text(body, encoding="utf-8")
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(body.encode()))
    for name in ("a.jsonl", "b.jsonl.gz"):
        texts, _, empty = read_all(open_source(str(tmp_path / name), text_column="story"))
        assert texts == DOCS and empty == 2


@pytest.mark.parametrize("line, message", [
    ('{"body": "x"}', "line 2 has no field 'text' (it has: body); name the text field with --text-column"),
    ('{"text": 3}', "line 2: field 'text' is int, not text"),
    ("{not json", "line 2 is not valid JSON"),
    ("[1, 2]", "line 2 is not a JSON object"),
])
def test_jsonl_bad_records(tmp_path, line, message):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(NanogemmaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_all(open_source(str(p)))


def test_parquet_plain_gzipped_and_binary(tmp_path):
    write_parquet(tmp_path / "p" / "a.parquet", DOCS + [None])
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "a.parquet.gz").write_bytes(gzip.compress((tmp_path / "p" / "a.parquet").read_bytes()))
    write_parquet(tmp_path / "b" / "a.parquet", [t.encode() for t in DOCS[:2]] + [b"bad \xff"])
    assert read_all(open_source(str(tmp_path / "p"))) == (DOCS, 0, 1)
    src = open_source(str(tmp_path / "g"))
    assert read_all(src) == (DOCS, 0, 1)
    temp = list(src._temp.values())
    src.close()
    assert temp and not temp[0].exists()
    assert read_all(open_source(str(tmp_path / "b"))) == (DOCS[:2] + ["bad \ufffd"], 1, 0)


def test_parquet_missing_or_wrong_column(tmp_path):
    write_parquet(tmp_path / "a.parquet", DOCS, column="content")
    with pytest.raises(NanogemmaError, match=r"has no column 'text' \(it has: content\); name the text column"):
        open_source(str(tmp_path / "a.parquet"))
    write_parquet(tmp_path / "b.parquet", [1, 2])
    with pytest.raises(NanogemmaError, match="column 'text' holds int64, not text"):
        open_source(str(tmp_path / "b.parquet"))


def test_hub_layout_folder_has_splits(tmp_path):
    src = open_source(str(hub_layout(tmp_path / "hub")))
    assert isinstance(src, LocalSource) and src.has_val
    assert read_all(src)[0] == DOCS
    assert read_all(src, "val")[0] == ["A val story.", "Another one."]


def test_split_words_in_file_names(tmp_path):
    for name, text in [("TinyStories-train.txt", "t"), ("TinyStories-valid.txt", "v"), ("test.txt", "x"),
                       ("extra.txt", "e"), ("notes.csv", "ignored")]:
        (tmp_path / name).write_text(text + "\n")
    src = open_source(str(tmp_path))
    assert read_all(src)[0] == ["t", "e"] and read_all(src, "val")[0] == ["v"]
    assert any("ignored 1 file" in w for w in src.warnings()) and any("test file" in w for w in src.warnings())
    # A single file named for validation is used for training, with a held-out validation split.
    only = open_source(str(tmp_path / "TinyStories-valid.txt"))
    assert not only.has_val and read_all(only)[0] == ["v"]


def test_hub_adapter_reads_the_same_documents(tmp_path):
    """`hf:FOLDER` goes through `datasets.load_dataset`, as a hub name would, and yields the same texts."""
    root = hub_layout(tmp_path / "hub")
    hub = open_source(f"hf:{root}")
    hub.open()
    assert isinstance(hub, HubSource) and hub.val_split == "validation"
    assert read_all(hub) == read_all(open_source(str(root)))
    assert read_all(hub, "val")[0] == ["A val story.", "Another one."]
    with pytest.raises(NanogemmaError, match=r"has no column 'story' \(it has: text, id\)"):
        open_source(f"hf:{root}", text_column="story").open()
    with pytest.raises(NanogemmaError, match=r"has no split 'training' \(it has: train, validation\)"):
        open_source(f"hf:{root}", split="training").open()


def test_hub_unreachable_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail at once instead of retrying the network
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(NanogemmaError, match=r"cannot open Hugging Face dataset 'nobody/nothing-here' .*--source PATH"):
        open_source("nobody/nothing-here").open()


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"good line\nbad \xff\xfe bytes\ncut \xe2\x82\n")
    texts, bad, _ = read_all(open_source(str(p)))
    assert texts == ["good line", "bad \ufffd\ufffd bytes", "cut \ufffd"]
    assert bad == 4
    j = tmp_path / "bad.jsonl"
    j.write_bytes(b'{"text": "a \xc3"}\n{"text": "lone \\ud800 surrogate"}\n')
    assert read_all(open_source(str(j))) == (["a \ufffd", "lone \ufffd surrogate"], 2, 0)


def test_unusable_sources(tmp_path):
    with pytest.raises(NanogemmaError, match="source not found: .*nope"):
        open_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NanogemmaError, match="holds no text, .jsonl or .parquet files"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(NanogemmaError, match="unsupported file type"):
        open_source(str(tmp_path / "a.csv"))
    (tmp_path / "z.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(NanogemmaError, match="not a valid gzip file"):
        read_all(open_source(str(tmp_path / "z.txt.gz")))
    with pytest.raises(NanogemmaError, match="synthetic:N with N >= 2"):
        open_source("synthetic:x")


def test_synthetic_source_splits():
    src = open_source("synthetic:5000", seed=3, val_fraction=0.01)
    assert isinstance(src, SyntheticSource) and (src.n_train, src.n_val) == (4950, 50)
    train, val = read_all(src)[0], read_all(src, "val")[0]
    assert len(train) == 4950 and len(val) == 50 and not set(train) & set(val)
    assert read_all(open_source("synthetic:5000", seed=3, val_fraction=0.01), "val")[0] == val


def test_text_rules_auto_and_chosen(tmp_path):
    """auto: prose or code (blank lines) is one document per file, <|endoftext|> markers split, text without
    blank lines is one record per line; file / paragraph / line / a separator choose."""
    prose = "A first paragraph\nwith two lines.\n\nA second one.\n"
    (tmp_path / "prose.txt").write_text(prose)
    (tmp_path / "records.txt").write_text("one\ntwo\nthree\n")
    (tmp_path / "marked.txt").write_text("Story one.\n\nStill one.<|endoftext|>Story two.\n")
    src = open_source([str(tmp_path / n) for n in ("prose.txt", "records.txt", "marked.txt")])
    assert read_all(src)[0] == [prose.strip(), "one", "two", "three", "Story one.\n\nStill one.", "Story two."]
    assert [f["documents"] for f in src.describe()["files"]] == [
        "one document per file", "one document per line", "documents separated by '<|endoftext|>'"]
    p = str(tmp_path / "prose.txt")
    assert read_all(open_source(p, delimiter="paragraph"))[0] == ["A first paragraph\nwith two lines.", "A second one."]
    assert read_all(open_source(p, delimiter="line"))[0] == ["A first paragraph", "with two lines.", "A second one."]
    assert read_all(open_source(str(tmp_path / "records.txt"), delimiter="file"))[0] == ["one\ntwo\nthree"]


def test_split_names_are_whole_folder_names_or_file_name_ends(tmp_path):
    for rel in ("libjpeg-dev/notes.txt", "dev/held.txt", "src/devices.txt", "corpus-valid.txt", "a/train/x.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel + "\n")
    src = open_source(str(tmp_path))
    split = {str(p.path.relative_to(tmp_path)): p.split for p in src.files}
    assert split == {"libjpeg-dev/notes.txt": "train", "dev/held.txt": "val", "src/devices.txt": "train",
                     "corpus-valid.txt": "val", "a/train/x.txt": "train"}
    assert {p.split for p in open_source(str(tmp_path), val_split="none").files} == {"train"}
    named = open_source(str(tmp_path), val_split="devices")
    assert [p.path.name for p in named.files if p.split == "val"] == ["devices.txt"]


def test_other_text_files_by_content_or_glob(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    return 1\n\n\nprint(f())\n")
    (tmp_path / "b.md").write_text("# Title\n\nSome text.\n")
    (tmp_path / "c.bin").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "d.csv").write_text("x,y\n1,2\n")
    (tmp_path / "LICENSE").write_text("Permission is granted.\n")
    src = open_source(str(tmp_path))
    assert sorted(f.path.name for f in src.files) == ["LICENSE", "a.py", "b.md"]
    notes = " ".join(src.warnings())
    assert "read 3 other file(s) as plain text by their content" in notes and "--glob" in notes
    assert "ignored 2 file(s) that are not text" in notes
    picked = open_source(str(tmp_path), glob="*.py")
    assert [f.path.name for f in picked.files] == ["a.py"] and read_all(picked)[0] == ["def f():\n    return 1\n\n\nprint(f())"]
    with pytest.raises(NanogemmaError, match=r"no file in .* matches --glob '\*.rs'"):
        open_source(str(tmp_path), glob="*.rs")
