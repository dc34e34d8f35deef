"""Multi-turn chat with Gemma's template, the whole conversation kept in one KV cache.

Gemma's chat format (what `tokenizer_config.json`'s template produces) is

    <bos><start_of_turn>user
    {system}\\n\\n{first user message}<end_of_turn>
    <start_of_turn>model
    {reply}<end_of_turn>
    <start_of_turn>user
    ...

Gemma has no system role: a system prompt is folded into the first user turn, followed by a blank line.
Messages are stripped of surrounding whitespace, as the template does. Control tokens written in a message
("<end_of_turn>", "<start_of_turn>model") are read as control tokens, as the reference tokenizer reads
them, so a message can forge a turn; `plain_text=True` (`chat --plain-text`) encodes the user's text as
plain text (transformers' `split_special_tokens=True`).

Each turn feeds the cache only what is new: the end of the previous reply, the user's message and the
`<start_of_turn>model\\n` header. The reply's own tokens were fed while it was generated, so earlier turns
are never recomputed. A reply ends at <end_of_turn> (or <eos>, which base models may emit instead, or
<start_of_turn>, or for a base model a stop string of `TURN_STOPS`: where it starts a turn of its own);
whichever way it ended, the next turn first closes it with `<end_of_turn>\\n`, so the history the model
sees always has the template's shape.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

import torch
from torch import Tensor

from .decoding import SamplingParams, TextStream, stop_ids_for
from .errors import NanogemmaError
from .files import check_text
from .generation import DEFAULT_PREFILL_CHUNK, Session
from .model import Gemma
from .sampling import Sampler
from .speculative import DraftHead, Speculation

# Gemma's recommended sampling for chat; plain greedy decoding tends to loop in long replies.
CHAT_DEFAULTS = SamplingParams(temperature=1.0, top_k=64, top_p=0.95)
DEFAULT_CONTEXT = 8192  # tokens of history kept per conversation (the cache is preallocated for it)
# A base (pretrained) model was never taught where a reply ends: it runs on into a next turn of its own,
# written as the template's "<start_of_turn>user\n" or as the bare word (what the 270M writes). A reply
# stops there. An instruction-tuned model ends on <end_of_turn> and never writes these.
TURN_STOPS = ("<start_of_turn>", "\nuser\n", "user\n")
INSTRUCT_MODEL = "google/gemma-3-270m-it"  # what to use instead of a base model, for chat


def repeats_a_line(text: str, times: int = 3) -> bool:
    """Whether `text` ends with the same non-empty line `times` times in a row (a base model in a loop)."""
    lines = text.split("\n")[:-1]  # complete lines only
    return len(lines) >= times and bool(lines[-1].strip()) and len(set(lines[-times:])) == 1


def model_kind(name: str | None, path: Path) -> tuple[bool, str]:
    """(instruction-tuned?, why) as the model's files tell: Gemma names the tuned checkpoints "-it" (and
    the pretrained ones "-pt" or nothing); otherwise a chat template in the tokenizer files says tuned.
    A run folder is what it was trained from (from scratch: base)."""
    path = Path(path)
    if (path / "nanogemma.json").is_file():
        try:
            init = json.loads((path / "nanogemma.json").read_text(encoding="utf-8"))["train"]["init_from"]
        except (OSError, ValueError, KeyError, TypeError):
            init = "scratch"
        if init in (None, "", "scratch"):
            return False, "trained from scratch by nanogemma"
        tuned, why = model_kind(str(init), Path(str(init)))
        return tuned, f"fine-tuned from {init}, {why}"
    names = [n for n in (name, path.name, *(p.name for p in path.parents if p.name.startswith("models--"))) if n]
    for n in names:
        if re.search(r"(^|[-_.])(it|instruct|chat)([-_.]|$)", n.lower()):
            return True, f"its name {n} says instruction-tuned"
    for n in names:
        if re.search(r"(^|[-_.])pt([-_.]|$)", n.lower()) or re.search(r"gemma-?3", n.lower()):
            return False, f"its name {n} has no -it"
    folder = path if path.is_dir() else path.parent
    for f in ("chat_template.jinja", "tokenizer_config.json"):
        if (folder / f).is_file() and (f.endswith(".jinja") or "chat_template" in (folder / f).read_text("utf-8")):
            return True, f"{f} holds a chat template"
    return False, "no chat template and no -it in its name"


class Chat:
    """A conversation: `chat.send("Hi")` returns the model's reply; the history lives in the KV cache."""

    def __init__(self, model: Gemma, tok, system: str | None = None, params: SamplingParams | None = None,
                 max_new_tokens: int = 1024, context: int | None = None, compile: bool | str = False,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, speculation: Speculation | None = None,
                 stop: Sequence[str] = (), stop_loops: bool = False, plain_text: bool = False):
        if tok.start_of_turn_id is None or tok.end_of_turn_id is None:
            raise NanogemmaError("this model's tokenizer has no <start_of_turn> / <end_of_turn> tokens (a model "
                                 "trained from scratch on gpt2 or bpe:N data), so it cannot hold Gemma's chat "
                                 "format; continue text with `nanogemma generate` instead")
        self.model, self.tok = model, tok
        # Control tokens typed in a message are parsed as such by default, as the reference tokenizer does
        # (so a message can forge a turn); `plain_text` encodes the user's text as plain text instead.
        self.plain_text = plain_text
        self.system = system.strip() if system and system.strip() else None
        self.params = (params or CHAT_DEFAULTS).validate()
        if max_new_tokens < 1:
            raise NanogemmaError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        self.max_new_tokens = max_new_tokens
        context = min(context or DEFAULT_CONTEXT, model.config.max_seq_len)
        self.speculation = speculation
        self.session = Session(model, 1, context, compile, prefill_chunk,
                               spare=speculation.spare if speculation else 0)
        self.draft = DraftHead(model, speculation.common_ids) if speculation and speculation.common_ids else None
        self.stop_ids = stop_ids_for(tok)
        if tok.start_of_turn_id is not None:  # a reply never opens a turn: a model that does has gone on too long
            self.stop_ids.add(tok.start_of_turn_id)
        self.stop = list(stop)  # stop strings (TURN_STOPS for a base model): the reply ends before them
        self.stop_loops = stop_loops  # a base model's reply also ends once it repeats a line three times
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the cache is emptied, not reallocated)."""
        self.session.reset()
        self.sampler = Sampler(self.params, 1, self.model.config.vocab_size, self.model.device)
        self.turns = 0
        self.pending: int | None = None  # the reply's last sampled token, not yet fed to the cache
        self.fed: list[int] = []  # every token in the cache, in order (for inspection and tests)

    def turn_tokens(self, message: str) -> list[int]:
        """The tokens this turn adds to the cache: close the last reply, the user's turn, the model header."""
        text = message.strip()
        if self.turns == 0:
            prefix, lead = [self.tok.bos_id], ""
            if self.system:
                text = f"{self.system}\n\n{text}"
        else:
            # A reply that stopped on <end_of_turn> is closed by feeding that token; one that stopped otherwise
            # (length, <eos>, interrupted) gets the <end_of_turn> the template would have written.
            keep = self.pending is not None and self.pending not in self.stop_ids
            prefix, lead = ([self.pending] if keep else []) + [self.tok.end_of_turn_id], "\n"
        if self.plain_text:
            sot, eot = self.tok.start_of_turn_id, self.tok.end_of_turn_id
            head = self.tok.encode(lead, add_bos=False) if lead else []
            # The same pieces as below, but the segment holding the user's text is encoded as plain text.
            return (prefix + head + [sot] + self.tok.encode_plain(f"user\n{text}") + [eot]
                    + self.tok.encode("\n", add_bos=False) + [sot] + self.tok.encode("model\n", add_bos=False))
        body = f"{lead}<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"
        return prefix + self.tok.encode(body, add_bos=False)

    @torch.inference_mode()
    def send(self, message: str, stream: Callable[[str], None] | None = None) -> str:
        """Add a user message, generate the reply (streamed piece by piece to `stream`), return its text."""
        if not message.strip():
            raise NanogemmaError("the message is empty")
        ids = self.turn_tokens(message)
        room = self.session.max_len - self.session.length - len(ids)
        if room < 1:
            raise NanogemmaError(f"the conversation would exceed the {self.session.max_len}-token context: "
                                 "/reset to start over (or start chat with a larger --context)")
        self.sampler.observe([ids])
        logits = self.session.prefill([ids])
        self.fed += ids
        self.turns += 1
        text = TextStream(self.tok, self.stop)
        self.pending = None
        tokens = self._reply_tokens(ids, logits, min(self.max_new_tokens, room))
        try:
            for token in tokens:
                if self.pending is not None:  # the previous token is in the cache now
                    self.fed.append(self.pending)
                self.pending = token
                if token in self.stop_ids:
                    break
                piece = text.push(token)
                if piece and stream:
                    stream(piece)
                if text.stopped or (self.stop_loops and piece and "\n" in piece and repeats_a_line(text.text)):
                    break
        finally:
            tokens.close()  # a speculative decoder takes back the drafts it fed past the last token used
        tail = text.flush()
        if tail and stream:
            stream(tail)
        return text.text

    def _reply_tokens(self, ids: list[int], logits: Tensor, limit: int) -> Iterator[int]:
        """The reply's tokens; each one is fed to the cache when the next is asked for (the last never is)."""
        if self.speculation:
            decoder = self.speculation.decoder(self.session, self.params, self.sampler, self.draft)
            # drafts from the text look in the whole conversation; the head's need only the new tokens
            yield from decoder.run(self.fed if self.speculation.lookup else ids, logits, limit)
            return
        for i in range(limit):
            token = self.sampler(logits)
            yield int(token)
            if i + 1 < limit:
                logits = self.session.step(token)


HELP = ("Type a message and press Enter. Commands: /help (this list), /reset (forget the conversation), "
        "/exit (or /quit, Ctrl-D); Ctrl-C stops a reply.")


def run_chat(chat: Chat, read: Callable[[str], str] = input, out: TextIO | None = None, prompt: str = "> ",
             err: TextIO | None = None) -> int:
    """The interactive loop: read a line, stream the reply; /help, /reset and /exit. Returns the exit status:
    1 if a turn failed (its error went to stderr, and the conversation went on), else 0."""
    out = out or sys.stdout  # looked up now, so a redirected stdout is honoured
    print(HELP, file=out, flush=True)
    failed = False

    def error(message: str) -> None:
        nonlocal failed
        failed = True
        print(f"nanogemma: error: {message}", file=err or sys.stderr, flush=True)

    while True:
        try:
            line = read(prompt)
        except EOFError:
            print(file=out)
            return 1 if failed else 0
        except UnicodeDecodeError as e:  # bytes on stdin that are not UTF-8: this line is lost, not the chat
            error(f"the line read is not UTF-8 text (byte 0x{e.object[e.start]:02x}); type it again")
            continue
        try:
            line = check_text(line, "the message")
        except NanogemmaError as e:
            error(str(e))
            continue
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 1 if failed else 0
        if command in ("/help", "/?"):
            print(HELP, file=out, flush=True)
            continue
        if command == "/reset":
            chat.reset()
            print("(conversation reset)", file=out, flush=True)
            continue
        if command.startswith("/") and " " not in command:
            print(f"unknown command {command}; {HELP}", file=out, flush=True)
            continue
        try:
            chat.send(line, stream=lambda piece: (out.write(piece), out.flush()))
        except NanogemmaError as e:
            out.flush()
            error(str(e))
            continue
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            print("\n(interrupted)", file=out, flush=True)
            continue
        print("\n", file=out, flush=True)
