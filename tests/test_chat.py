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


@pytest.mark.parametrize("extra", [(), ("--speculate", "--draft-tokens", "3"), ("--lookup",)])
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


@pytest.mark.parametrize("lookup", [False, True])
@pytest.mark.parametrize("stop_early", [False, True])
def test_speculative_chat_equals_plain_chat(model, tok, stop_early, lookup):
    """`chat --speculate` / `--lookup`: the same greedy replies, and the same cache, also when a reply stops
    mid-round (lookup drafts from the whole conversation; its k + 1-row checks round like the head's)."""
    from nanogemma.speculative import Speculation

    plain = Chat(model, tok, params=GREEDY, max_new_tokens=20)
    speculation = (Speculation([], draft_tokens=4, lookup=True) if lookup else
                   Speculation(list(range(5000)) + [tok.end_of_turn_id], draft_tokens=4))
    fast = Chat(model, tok, params=GREEDY, max_new_tokens=20, speculation=speculation)
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


def test_model_kind_from_the_files(tmp_path):
    """Base or instruction-tuned, as the files say: Gemma's -it names, else a chat template; a run folder is
    what it was trained from."""
    import json

    from nanogemma.chat import model_kind

    hub = tmp_path / "models--google--gemma-3-270m-it" / "snapshots" / "abc"
    hub.mkdir(parents=True)
    assert model_kind("google/gemma-3-270m-it", hub)[0] is True
    assert model_kind(None, hub)[0] is True  # the hub cache folder keeps the name
    assert model_kind(None, tmp_path / "gemma-3-270m-q4_k_m.gguf") == (False, "its name gemma-3-270m-q4_k_m.gguf "
                                                                              "has no -it")
    assert model_kind("google/gemma-3-1b-pt", tmp_path)[0] is False
    plain = tmp_path / "mine"
    plain.mkdir()
    assert model_kind(str(plain), plain)[0] is False
    (plain / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert model_kind(str(plain), plain) == (True, "tokenizer_config.json holds a chat template")
    run = tmp_path / "run"
    run.mkdir()
    (run / "nanogemma.json").write_text(json.dumps({"train": {"init_from": "scratch"}}))
    assert model_kind(str(run), run)[0] is False
    (run / "nanogemma.json").write_text(json.dumps({"train": {"init_from": "google/gemma-3-270m-it"}}))
    assert model_kind(str(run), run)[0] is True


def test_stop_strings_end_a_reply_at_a_new_turn(model, tok):
    """A base model's reply ends where it starts writing a turn of its own: the text stops before it, and the
    next turn closes the reply as the template would."""
    free = Chat(model, tok, params=GREEDY, max_new_tokens=12)
    full = free.send("Hello")
    assert len(full) > 4
    marker = full[2:4]  # a piece of what the model writes, standing in for "user\n"
    stopped = Chat(model, tok, params=GREEDY, max_new_tokens=12, stop=[marker])
    pieces = []
    reply = stopped.send("Hello", stream=pieces.append)
    assert reply == full[:full.index(marker)] == "".join(pieces)
    stopped.send("Again")  # the conversation goes on, its cache consistent
    assert stopped.session.length == len(stopped.fed)
    assert tok.start_of_turn_id in stopped.stop_ids  # a reply never opens a turn, for any model
    from nanogemma.chat import repeats_a_line

    assert repeats_a_line("Hi\n-\n-\n-\n") and not repeats_a_line("-\n-\n-") and not repeats_a_line("\n\n\n\n")
    assert not repeats_a_line("a\nb\na\nb\n")


def test_cli_chat_banner_help_and_flags(tiny_hf, capsys, monkeypatch):
    from nanogemma import cli as cli_mod

    with pytest.raises(SystemExit):
        cli_mod.main(["chat", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default 1.0)" in help_text and "(default 64)" in help_text and "(default 0.95)" in help_text
    monkeypatch.setattr("sys.stdin", io.StringIO("/help\nHello\n/exit\n"))
    assert cli_mod.main(["chat", "--model", str(tiny_hf), "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    banner = err.splitlines()
    assert banner[0].startswith(f"nanogemma chat: {tiny_hf} (float32, cpu, packed; temperature 1, top-k 64")
    assert "a base model" in banner[0] and "--model google/gemma-3-270m-it" in banner[1]
    assert out.count("/help (this list)") == 2  # on start, and for /help
