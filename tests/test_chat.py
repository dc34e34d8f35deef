"""`Chat` and `nanogemma chat`: Gemma's template, history kept in the cache (never recomputed), /reset, /exit."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import cli

from nanogemma.chat import Chat, run_chat
from nanogemma.config import get_preset
from nanogemma.decoding import SamplingParams
from nanogemma.errors import NanogemmaError
from nanogemma.model import Gemma

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def tok():
    from nanogemma.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def model() -> Gemma:
    """Random tiny weights over Gemma's real vocabulary, so the real tokenizer and template apply."""
    return Gemma(get_preset("tiny").replace(vocab_size=262_144, max_seq_len=512)).init_weights(seed=0).eval()


def test_template_and_system_prompt(model, tok):
    chat = Chat(model, tok, system="Be brief.", params=GREEDY, max_new_tokens=5)
    chat.send("  Hi there \n")  # stripped, as the template does
    first = tok.encode("<start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n")
    assert chat.fed[:len(first)] == first and first[0] == tok.bos_id
    generated = chat.fed[len(first):] + ([chat.pending] if chat.pending is not None else [])
    chat.send("And now?")
    # The reply's tokens stay as generated; the next turn closes it with <end_of_turn> as the template does.
    second = tok.encode("\n<start_of_turn>user\nAnd now?<end_of_turn>\n<start_of_turn>model\n", add_bos=False)
    closing = generated if generated[-1] not in chat.stop_ids else generated[:-1]
    assert chat.fed[:len(first) + len(closing) + 1 + len(second)] == first + closing + [tok.end_of_turn_id] + second


def test_turns_are_not_recomputed_and_match_a_full_forward(model, tok):
    chat = Chat(model, tok, params=GREEDY, max_new_tokens=6)
    fed_tokens = []
    original = model.hidden  # what both prefill (through forward) and decode steps run

    def counting(ids, *args, **kwargs):
        fed_tokens.append(ids.shape[1])
        return original(ids, *args, **kwargs)

    model.hidden = counting
    try:
        for message in ("Hello", "Tell me more", "Thanks"):
            chat.send(message)
    finally:
        del model.hidden
    assert sum(fed_tokens) == len(chat.fed) == chat.session.length  # every token went through the model once
    # The cache now holds exactly what a fresh forward over the whole conversation computes.
    with torch.inference_mode():
        nxt = chat.pending if chat.pending is not None else tok.end_of_turn_id
        cached = chat.session.step(torch.tensor([nxt]))
        full = model(torch.tensor([chat.fed + [nxt]]), last_only=True)[:, -1]
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-4)


def test_reset_exit_and_streaming_loop(model, tok):
    chat = Chat(model, tok, params=GREEDY, max_new_tokens=4)
    lines = iter(["Hello", "", "/reset", "/what", "Hi again", "/exit", "never read"])
    out = io.StringIO()
    streamed = []
    original = chat.send
    chat.send = lambda text, stream=None: streamed.append(original(text, stream))
    assert run_chat(chat, read=lambda _prompt: next(lines), out=out) == 0
    text = out.getvalue()
    assert "(conversation reset)" in text and "unknown command /what" in text
    assert len(streamed) == 2 and chat.turns == 1  # the reset forgot the first exchange
    assert all(s in text for s in streamed)


def test_end_of_input_exits_and_errors_are_reported(model, tok):
    chat = Chat(model, tok, params=GREEDY, max_new_tokens=4, context=24)
    out = io.StringIO()
    feed = iter(["word " * 40])

    def reader(_prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    err = io.StringIO()
    assert run_chat(chat, read=reader, out=out, err=err) == 1  # a failed turn: said on stderr, exit status 1
    assert "exceed the 24-token context" in err.getvalue() and "error" not in out.getvalue()
    with pytest.raises(NanogemmaError, match="empty"):
        chat.send("   ")


@pytest.mark.parametrize("extra", [(), ("--speculate", "--draft-tokens", "3")])
def test_cli_chat_session(tiny_hf, extra):
    proc = cli("chat", "--model", str(tiny_hf), "--max-new-tokens", "4", "--system", "Be kind.", *extra,
               stdin="Hello\n/reset\nHi\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert "(conversation reset)" in proc.stdout and "/exit" in proc.stdout  # the help line


@pytest.mark.slow
def test_base_model_chats(model_and_tok):
    model, tok = model_and_tok
    chat = Chat(model, tok, params=GREEDY, max_new_tokens=12, context=256)
    first = chat.send("What is the capital of France?")
    second = chat.send("And of Italy?")
    assert first.strip() and second.strip()
    assert chat.session.length == len(chat.fed)


@pytest.mark.parametrize("stop_early", [False, True])
def test_speculative_chat_equals_plain_chat(model, tok, stop_early):
    """`chat --speculate`: the same greedy replies, and the same cache, also when a reply stops mid-round."""
    from nanogemma.speculative import Speculation

    plain = Chat(model, tok, params=GREEDY, max_new_tokens=20)
    fast = Chat(model, tok, params=GREEDY, max_new_tokens=20,
                speculation=Speculation(list(range(5000)) + [tok.end_of_turn_id], draft_tokens=4))
    messages = ("Hello", "Tell me more", "Thanks")
    if stop_early:  # a token the first reply holds at its 6th place ends every reply there or earlier
        probe = Chat(model, tok, params=GREEDY, max_new_tokens=20)
        turn = probe.turn_tokens(messages[0])
        probe.send(messages[0])
        reply = probe.fed[len(turn):] + [probe.pending]
        assert len(reply) == 20
        plain.stop_ids = fast.stop_ids = plain.stop_ids | {reply[5]}
    for message in messages:
        assert fast.send(message) == plain.send(message)
        assert fast.fed == plain.fed and fast.pending == plain.pending
        assert fast.session.length == plain.session.length == len(plain.fed)
    with torch.inference_mode():
        nxt = torch.tensor([plain.pending])
        torch.testing.assert_close(fast.session.step(nxt), plain.session.step(nxt), rtol=0, atol=1e-4)
