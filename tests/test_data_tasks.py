"""The fine-tuning tasks (nanogemma/data/tasks.py): reproducible, train and test disjoint, answers that follow
from the sentences; and the task file reader of `nanogemma eval --task` (nanogemma/tools/task_eval.py)."""

from __future__ import annotations

import json

import pytest

from nanogemma.data.tasks import MONTHS, write_task
from nanogemma.errors import NanogemmaError
from nanogemma.tools.task_eval import read_task


def test_extract_task(tmp_path):
    train, test = write_task("extract", tmp_path / "a", train=300, test=50, seed=1)
    again, _ = write_task("extract", tmp_path / "b", train=300, test=50, seed=1)
    assert train.read_bytes() == again.read_bytes()
    records = {s: [json.loads(line) for line in p.read_text().splitlines()] for s, p in (("train", train), ("test", test))}
    assert len(records["train"]) == 300 and len(records["test"]) == 50
    prompts = {s: {r["messages"][0]["content"] for r in rs} for s, rs in records.items()}
    assert not prompts["train"] & prompts["test"]
    for r in records["train"] + records["test"]:
        sentence, answer = r["messages"][0]["content"].split("\n\n", 1)[1], json.loads(r["messages"][1]["content"])
        assert list(answer) == ["customer", "item", "quantity", "total", "city", "date"]
        assert answer["customer"] in sentence and answer["city"] in sentence and str(answer["quantity"]) in sentence
        y, m, d = (int(x) for x in answer["date"].split("-"))
        assert str(y) in sentence and (MONTHS[m - 1] in sentence or answer["date"] in sentence)
        t = answer["total"]
        written = [f"{t:.2f}", f"{t:,.2f}"] + ([f"{t}"] if isinstance(t, int) else [])
        assert any(w in sentence for w in written)
    pairs = read_task(test)
    assert len(pairs) == 50 and pairs[0][0][-1][0] == "user" and pairs[0][1] == records["test"][0]["messages"][1]["content"]


def test_task_file_errors(tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"messages": []}\n', encoding="utf-8")
    with pytest.raises(NanogemmaError, match="line 2"):
        read_task(bad)
    with pytest.raises(NanogemmaError, match="not found"):
        read_task(tmp_path / "missing.jsonl")
    with pytest.raises(NanogemmaError, match="unknown task"):
        write_task("nope", tmp_path)
