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
are never recomputed. A reply ends at <end_of_turn> (or <eos>, which base models may emit instead);
whichever way it ended, the next turn first closes it with `<end_of_turn>\\n`, so the history the model
sees always has the template's shape.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import TextIO

import torch
from torch import Tensor

from .decoding import SamplingParams, TextStream, stop_ids_for
from .errors import NanogemmaError
from .files import check_text
from .generation import DEFAULT_PREFILL_CHUNK, Session
from .model import Gemma
from .sampling import Sampler
from .speculative import DraftHead, Speculation, SpeculativeDecoder

# Gemma's recommended sampling for chat; plain greedy decoding tends to loop in long replies.
CHAT_DEFAULTS = SamplingParams(temperature=1.0, top_k=64, top_p=0.95)
DEFAULT_CONTEXT = 8192  # tokens of history kept per conversation (the cache is preallocated for it)


class Chat:
    """A conversation: `chat.send("Hi")` returns the model's reply; the history lives in the KV cache."""

    def __init__(self, model: Gemma, tok, system: str | None = None, params: SamplingParams | None = None,
                 max_new_tokens: int = 1024, context: int | None = None, compile: bool | str = False,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, speculation: Speculation | None = None,
                 plain_text: bool = False):
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
                               spare=speculation.draft_tokens if speculation else 0)
        self.draft = DraftHead(model, speculation.common_ids) if speculation else None
        self.stop_ids = stop_ids_for(tok)
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
        text = TextStream(self.tok)
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
        finally:
            tokens.close()  # a speculative decoder takes back the drafts it fed past the last token used
        tail = text.flush()
        if tail and stream:
            stream(tail)
        return text.text

    def _reply_tokens(self, ids: list[int], logits: Tensor, limit: int) -> Iterator[int]:
        """The reply's tokens; each one is fed to the cache when the next is asked for (the last never is)."""
        if self.speculation:
            decoder = SpeculativeDecoder(self.session, self.draft, self.params, self.speculation.draft_tokens,
                                         self.sampler)
            yield from decoder.run(ids, logits, limit)
            return
        for i in range(limit):
            token = self.sampler(logits)
            yield int(token)
            if i + 1 < limit:
                logits = self.session.step(token)


HELP = "Type a message and press Enter. Commands: /reset (forget the conversation), /exit (or Ctrl-D)."


def run_chat(chat: Chat, read: Callable[[str], str] = input, out: TextIO = sys.stdout, prompt: str = "> ",
             err: TextIO | None = None) -> int:
    """The interactive loop: read a line, stream the reply; /reset and /exit. Returns the exit status: 1 if
    a turn failed (its error went to stderr, and the conversation went on), else 0."""
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
