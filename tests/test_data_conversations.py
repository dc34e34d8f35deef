"""Chat data (nanogemma/data/conversations.py and `prepare` on conversations) against transformers' rendering
of Gemma 3's official chat template (tests/data/gemma3_chat_template.jinja: the bundled GGUF carries none)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import DATA

from nanogemma.data import prepare, read_meta, read_tokens
from nanogemma.data.conversations import Renderer, messages_of
from nanogemma.data.encoders import load_gemma
from nanogemma.data.store import read_mask
from nanogemma.errors import NanogemmaError
from nanogemma.tools.task_eval import prompt_ids

TEMPLATE = (DATA / "gemma3_chat_template.jinja").read_text(encoding="utf-8")

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "  What is 2+2?\n"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
     {"role": "assistant", "content": " 6 \n\n"}],
    [{"role": "user", "content": "Extract:\n\nAlice, 34, Paris."},
     {"role": "assistant", "content": '{"name": "Alice", "age": 34, "city": "Paris"}'}],
    [{"role": "user", "content": [{"type": "text", "text": "日本語 émoji 🎉 "}, {"type": "text", "text": "tabs\tand\n\n"}]},
     {"role": "assistant", "content": "\n```python\nprint('x')\n```"}],
]


@pytest.fixture(scope="module")
def renderer():
    return Renderer(load_gemma())


def _reference(ref_tokenizer, conversation, **kw) -> list[int]:
    out = ref_tokenizer.apply_chat_template(conversation, chat_template=TEMPLATE, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_rendering_matches_transformers(ref_tokenizer, renderer):
    tok = renderer.tok
    for conv in CONVERSATIONS:
        r = renderer.render_many([messages_of({"messages": conv})])[0]
        assert r.ids.tolist() == _reference(ref_tokenizer, conv)
        assert (r.ids == tok.bos_id).sum() == 1 and r.ids[0] == tok.bos_id
        # The mask covers exactly each reply (trimmed) and the <end_of_turn> closing it.
        trained = tok.decode([i for i, m in zip(r.ids, r.mask, strict=True) if m])
        replies = [m["content"].strip() for m in conv if m["role"] == "assistant"]
        assert trained == "".join(f"{t}<end_of_turn>" for t in replies)
    # prompt / completion pairs are a user turn and a reply.
    pair = renderer.render_many([messages_of({"prompt": "Hi there", "completion": "Hello! How can I help?"})])[0]
    assert pair.ids.tolist() == _reference(ref_tokenizer, CONVERSATIONS[0])
    # The evaluation prompt is the template with add_generation_prompt.
    prompt = messages_of({"messages": CONVERSATIONS[1]})[:-1]
    assert prompt_ids(renderer, prompt) == _reference(ref_tokenizer, CONVERSATIONS[1][:-1],
                                                      add_generation_prompt=True)


BAD = [
    ('{"messages": [{"role": "user", "content": "Hi"}]}', "no assistant reply"),
    ("not json", "not valid JSON"),
    ('{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}', "is empty"),
    ('{"messages": [{"content": "a"}, {"role": "assistant", "content": "x"}]}', "has no role"),
    ('{"messages": [{"role": "bot", "content": "a"}]}', "role 'bot'"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}', "int, not text"),
    ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}', "expected user"),
    ('{"text": "plain"}', "neither 'messages'"),
    ('[1, 2]', "JSON object"),
    ('{"prompt": "long", "completion": "' + "word " * 80 + '"}', "longer than the context"),
]


def test_prepare_writes_masks_and_lists_bad_records(tmp_path):
    good = [json.dumps({"messages": [{**m, "content": f"{m['content']} #{i}"} if m["role"] == "user" and
                                     isinstance(m["content"], str) else m for m in c]})
            for i in range(6) for c in CONVERSATIONS] + [json.dumps({"prompt": "p", "completion": "c"})]
    lines = [good[0], *[b for b, _ in BAD], "", *good[1:]]
    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    warnings: list[str] = []
    r = prepare(str(src), tmp_path / "out", "gemma", val_fraction=0.2, warn=warnings.append, context=64)
    meta = read_meta(r.folder)
    chat = meta["chat"]
    assert chat["records"] == len(good) + len(BAD) and chat["bad_records"] == len(BAD)
    assert chat["conversations"] == len(good)
    listed = {b["line"]: b["reason"] for b in chat["bad_listed"]}
    assert sorted(listed) == list(range(2, 2 + len(BAD)))  # line 1 is good, the blank line is not a record
    for n, (_, why) in enumerate(BAD, 2):
        assert why in listed[n], (n, listed[n])
    assert len(warnings) == 1 and "line 2" in warnings[0] and str(len(BAD)) in warnings[0]
    tok = load_gemma()
    for split in ("train", "val"):
        ids, mask = read_tokens(r.folder, split), read_mask(r.folder, split)
        assert len(ids) == len(mask) and mask.dtype == np.uint8
        assert (ids == tok.bos_id).sum() == meta["splits"][split]["documents"]  # one <bos> per conversation
        assert int(mask.sum()) == meta["splits"][split]["loss_tokens"] > 0
    # Re-running is a no-op; a text tokenizer is refused for chat data.
    assert prepare(str(src), tmp_path / "out", "gemma", val_fraction=0.2, context=64).skipped
    with pytest.raises(NanogemmaError, match="--tokenizer gemma"):
        prepare(str(src), tmp_path / "other", "gpt2", format="chat")
