"""The OpenAI side of `nanogemma serve`: a request's fields checked, its chat messages made a prompt, and the
errors answered as OpenAI does.

Nothing here touches the model, the engine or the web framework: each function takes the parsed JSON body
(or a part of it) and returns plain values, or raises `ApiError`, which the app (`server.py`) answers as
`{"error": {"message", "type", "param", "code"}}` with its status (400 bad value, 401 key, 404 model or
route, 413 body too large, 429 queue full with Retry-After, 503 still loading).

The chat prompt is a Hugging Face folder's own `chat_template` where it has one (rendered with Jinja in a
sandbox, as transformers does); otherwise Gemma's template (see `chat.py`): `<start_of_turn>user ...
<end_of_turn>` turns, the assistant's as `model`, a system message folded into the first user turn.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .decoding import SamplingParams
from .errors import NanogemmaError


class ApiError(Exception):
    """An error answered to the client as OpenAI-style JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _get(body: dict, name: str, kind: type | tuple[type, ...], default: Any = None, lo: float | None = None,
         hi: float | None = None, lo_open: bool = False) -> Any:
    """body[name], checked: of `kind` (bools are not numbers) and within [lo, hi] (or (lo, hi])."""
    value = body.get(name, default)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__.replace("str", "string").replace("float", "number") for k in kinds)
        raise ApiError(400, f"'{name}' must be {names}, got {type(value).__name__}", name)
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a finite number", name)
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ApiError(400, f"'{name}' must be {'>' if lo_open else '>='} {lo}, got {value}", name)
    if hi is not None and value > hi:
        raise ApiError(400, f"'{name}' must be <= {hi}, got {value}", name)
    return value


def sampling_from(body: dict) -> SamplingParams:
    """OpenAI's sampling fields (plus top_k, min_p, repetition_penalty) -> SamplingParams."""
    number = (int, float)
    top_p = _get(body, "top_p", number, None, 0.0, 1.0, lo_open=True)
    params = SamplingParams(
        temperature=float(_get(body, "temperature", number, 1.0, 0.0, 2.0)),
        top_k=_get(body, "top_k", int, None, 1) or None,
        top_p=None if top_p is None or top_p == 1 else float(top_p),
        min_p=_get(body, "min_p", number, None, 0.0, 1.0),
        repetition_penalty=float(_get(body, "repetition_penalty", number, 1.0, 0.0, 10.0, lo_open=True)),
        seed=_get(body, "seed", int, None),
    )
    try:
        return params.validate()
    except NanogemmaError as e:
        raise ApiError(400, str(e).replace("--", "")) from None


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
    return stop


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")


def chat_prompt(messages: Any) -> str:
    """Gemma's chat template, up to the model's turn header (the tokenizer adds <bos>)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    turns: list[tuple[str, str]] = []
    system: list[str] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be system, user or assistant, got {role!r}", "messages")
        text = _content(m, i).strip()
        if role in ("system", "developer"):
            if turns:
                raise ApiError(400, f"messages[{i}]: a system message must come before the conversation", "messages")
            system.append(text)
            continue
        kind = "user" if role == "user" else "model"
        if (turns[-1][0] if turns else "model") == kind:
            raise ApiError(400, f"messages[{i}]: roles must alternate user/assistant, starting with user",
                           "messages")
        turns.append((kind, text))
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last message must be the user's", "messages")
    if system and any(system):
        turns[0] = ("user", "\n\n".join(s for s in system if s) + "\n\n" + turns[0][1])
    body = "".join(f"<start_of_turn>{kind}\n{text}<end_of_turn>\n" for kind, text in turns)
    return body + "<start_of_turn>model\n"


def load_chat_template(model: str | None) -> str | None:
    """A Hugging Face folder's own chat template (`chat_template.jinja`, else `tokenizer_config.json`'s)."""
    if model is None:
        return None
    if not Path(model).is_dir():  # a hub repository id: its snapshot folder (already fetched by the load)
        from .weight_files import HUB_ID, resolve_model

        if not HUB_ID.fullmatch(str(model).removeprefix("hf:")):
            return None
        model = str(resolve_model(model)[1])
    folder = Path(model)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except ValueError:
            return None
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return template if isinstance(template, str) else None
    return None


def render_chat_template(template: str, messages: Any, bos: str = "<bos>") -> str:
    """The folder's template over the messages (checked as for the built-in one), up to the model's turn."""
    chat_prompt(messages)  # the same checks: roles, contents, order
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def fail(message: str) -> None:
        raise ApiError(400, f"the model's chat template refused the messages: {message}", "messages")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = fail
    plain = [{"role": "system" if m["role"] == "developer" else m["role"], "content": _content(m, i)}
             for i, m in enumerate(messages)]
    try:
        return env.from_string(template).render(messages=plain, bos_token=bos, add_generation_prompt=True)
    except jinja2.TemplateError as e:
        raise ApiError(500, f"the model's chat template failed: {e}", kind="server_error") from None


def completion_options(body: dict) -> tuple[int | None, SamplingParams, list[str], int, bool, bool]:
    """The fields both completion routes read: (max_tokens, sampling, stop strings, n, stream, include_usage)."""
    max_tokens = _get(body, "max_completion_tokens", int, None, 1)
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", int, None, 1)
    n = _get(body, "n", int, 1, 1, 16)
    stream = _get(body, "stream", bool, False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    usage = bool(_get(options, "include_usage", bool, False))
    return max_tokens, sampling_from(body), stop_strings(body), n, stream, usage
