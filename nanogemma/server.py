"""`nanogemma serve`: an OpenAI-compatible HTTP server over the continuous-batching engine (`engine.py`).

The pieces:

* **One engine thread** runs `Engine.run`: all model work happens there, so requests never contend for
  the model. The event loop (uvicorn's) only parses, tokenizes, detokenizes and writes.
* **Per request** the handler submits an `engine.Request` whose callbacks hand each new token to the
  event loop (`call_soon_threadsafe`). Detokenisation and stop strings reuse `decoding.TextStream`; when a
  stop string matches, the client goes away or the request times out, the handler cancels the request
  and the engine frees its slot at its next step.
* **Bad input never reaches the engine**: every field is checked first (`api.py`) and answered, as OpenAI
  does, with an error body and the matching status; the body's size, the API key and the model's name are
  checked here, before the fields.
* **Routes**: `POST /v1/chat/completions`, `POST /v1/completions` (both with `stream`), `GET /v1/models`,
  `GET /health`, `GET /metrics` (Prometheus text) and the chat page at `/` (`nanogemma/static/chat.html`).

The chat prompt is the model folder's own chat template where it has one, else Gemma's (`api.py`).
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations at runtime.
import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from .api import ApiError, chat_prompt, completion_options, load_chat_template, render_chat_template
from .decoding import SamplingParams, TextStream, stop_ids_for
from .engine import (
    DEFAULT_PREFILL_SHARE,
    DEFAULT_PREFIX_CACHE,
    DEFAULT_SLOTS,
    DEFAULT_STEP_TOKENS,
    Engine,
    QueueFull,
    Request,
    check_settings,
)
from .errors import NanogemmaError
from .metrics import Metrics, prometheus_text

DEFAULT_MAX_TOKENS = 512  # when a request does not say (bounded by the room left in the context)
DEFAULT_MAX_BODY = 1 << 20  # bytes
DEFAULT_TIMEOUT = 600.0  # seconds per request
STATIC = Path(__file__).resolve().parent / "static"


# ------------------------------------------------------------------------------------------ the state


class ServerState:
    """The model, tokenizer and engine (None until loaded), the engine thread, the server's settings."""

    def __init__(self, model_id: str, api_key: str | None = None, max_body: int = DEFAULT_MAX_BODY,
                 timeout: float = DEFAULT_TIMEOUT):
        self.model_id, self.api_key, self.max_body, self.timeout = model_id, api_key, max_body, timeout
        self.engine: Engine | None = None
        self.tok = None
        self.chat_template: str | None = None  # a Hugging Face folder's own; else Gemma's turns (`chat_prompt`)
        self.load_error: str | None = None
        self.metrics = Metrics()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, engine: Engine, tok) -> None:
        """Begin serving with this engine: its loop runs in a background thread."""
        self.tok, self.engine = tok, engine
        self.stop_ids = frozenset(stop_ids_for(tok))
        self._thread = threading.Thread(target=engine.run, args=(self._stop,), name="nanogemma-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.engine is not None:
            self.engine.wake()
        if self._thread is not None:
            self._thread.join(timeout=10)


# ------------------------------------------------------------------------------------------ one job


class Job:
    """The requests of one HTTP call (n choices, or several prompts), their text streams and events."""

    def __init__(self, state: ServerState, prompts: list[list[int]], n: int, max_tokens: int | None,
                 params: SamplingParams, stop: list[str]):
        self.state, self.loop = state, asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        engine = state.engine
        self.requests: list[Request] = []
        self.streams: list[TextStream] = []
        self.reasons: list[str | None] = []
        for p in prompts:
            room = engine.max_len - len(p)
            want = max_tokens if max_tokens is not None else min(DEFAULT_MAX_TOKENS, room)
            try:
                engine.check(len(p), want)
            except NanogemmaError as e:
                param = "max_tokens" if max_tokens is not None and len(p) < engine.max_len else "messages"
                raise ApiError(400, str(e), param, code="context_length_exceeded") from None
            for j in range(n):
                seeded = params if params.seed is None or j == 0 else \
                    SamplingParams(**{**params.__dict__, "seed": params.seed + j})
                index = len(self.requests)
                self.requests.append(Request(p, want, seeded, state.stop_ids,
                                             on_token=self._forward(index), on_finish=self._forward(index)))
                self.streams.append(TextStream(state.tok, stop))
                self.reasons.append(None)

    def _forward(self, index: int):
        def callback(req: Request, token: int | None = None) -> None:  # on the engine thread
            self.loop.call_soon_threadsafe(self.events.put_nowait, (index, token))
        return callback

    def submit(self) -> None:
        try:
            for r in self.requests:
                self.state.engine.submit(r)
        except QueueFull as e:
            self.cancel()
            self.state.metrics.rejected += 1
            raise ApiError(429, str(e), kind="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) \
                from None

    def cancel(self) -> None:
        for r in self.requests:
            if r.finish_reason is None:
                self.state.engine.cancel(r)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt) for r in self.requests)

    @property
    def completion_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.requests)

    async def pieces(self, request) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice, text, finish_reason or None) as the tokens come; cancels everything if the client leaves."""
        deadline = time.monotonic() + self.state.timeout
        next_check = time.monotonic() + 0.25
        open_ = len(self.requests)
        metrics = self.state.metrics
        try:
            while open_:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ApiError(504, f"the request took longer than {self.state.timeout:g} s",
                                   kind="timeout_error", code="timeout")
                if time.monotonic() > next_check:  # a client waiting for a whole answer may leave too
                    next_check = time.monotonic() + 0.25
                    if await request.is_disconnected():
                        return
                try:
                    index, token = await asyncio.wait_for(self.events.get(), timeout=min(0.25, left))
                except TimeoutError:
                    continue
                req, stream = self.requests[index], self.streams[index]
                if self.reasons[index] is not None:
                    continue  # finished by a stop string: what the engine still sends is dropped
                if token is not None:  # a new token
                    if not stream.ids:
                        metrics.observe_ttft(req.first_token_at - req.submitted)
                    metrics.token(time.monotonic())
                    piece = stream.push(token)
                    if stream.stopped:
                        self.reasons[index] = "stop"
                        self.state.engine.cancel(req)
                        open_ -= 1
                        yield index, piece, "stop"
                    elif piece:
                        yield index, piece, None
                    continue
                # finished
                if req.finish_reason == "error":
                    raise ApiError(500, f"the engine failed: {req.error}", kind="server_error")
                if req.first_token_at is not None and not stream.ids:
                    metrics.observe_ttft(req.first_token_at - req.submitted)  # stopped on its first token
                self.reasons[index] = "stop" if req.finish_reason in ("stop", "cancelled") else "length"
                open_ -= 1
                yield index, stream.flush(), self.reasons[index]
        finally:
            self.cancel()


# ------------------------------------------------------------------------------------------ the app


def create_app(state: ServerState):
    """The FastAPI application over `state` (whose engine may still be loading)."""
    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="nanogemma", docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, e: StarletteHTTPException):
        message = "no such route" if e.status_code == 404 else str(e.detail)
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(e.status_code, message, kind=kind))

    @app.exception_handler(Exception)
    async def _crash(_request, e: Exception):  # a bug answers 500; the server carries on
        return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error"))

    @app.middleware("http")
    async def _count_and_guard(request: HttpRequest, call_next):
        try:
            if request.url.path.startswith("/v1/"):
                if state.api_key is not None:
                    auth = request.headers.get("authorization", "")
                    if auth != f"Bearer {state.api_key}":
                        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                       kind="authentication_error", code="invalid_api_key")
                if state.engine is None and request.url.path != "/v1/models":
                    raise ApiError(503, state.load_error or "the model is still loading",
                                   kind="server_error", headers={"Retry-After": "2"})
            response = await call_next(request)
        except ApiError as e:
            response = error_response(e)
        state.metrics.http[response.status_code] = state.metrics.http.get(response.status_code, 0) + 1
        return response

    async def read_json(request: HttpRequest) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > state.max_body:
            raise ApiError(413, f"the body is over {state.max_body} bytes", kind="invalid_request_error")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > state.max_body:
                raise ApiError(413, f"the body is over {state.max_body} bytes", kind="invalid_request_error")
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != state.model_id:
            raise ApiError(404, f"the model '{model}' does not exist; this server has '{state.model_id}'",
                           "model", kind="not_found_error", code="model_not_found")
        return body

    async def run(request: HttpRequest, body: dict, prompts: list[list[int]], chat: bool):
        max_tokens, params, stop, n, stream, include_usage = completion_options(body)
        job = Job(state, prompts, n, max_tokens, params, stop)
        job.submit()
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def usage() -> dict:
            return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
                    "total_tokens": job.prompt_tokens + job.completion_tokens}

        def choice(i: int, text: str | None, reason: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}
            if delta:
                return {"index": i, "delta": {} if text is None else {"content": text}, "logprobs": None,
                        "finish_reason": reason}
            return {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": reason}

        if not stream:
            texts = [""] * len(job.requests)
            reasons: list[str | None] = [None] * len(job.requests)
            async for i, piece, reason in job.pieces(request):
                texts[i] += piece
                reasons[i] = reason or reasons[i]
            if any(r is None for r in reasons):  # the client left: nobody reads the answer
                return JSONResponse({}, status_code=499)
            return {"id": ident, "object": kind, "created": created, "model": state.model_id,
                    "choices": [choice(i, texts[i], reasons[i], False) for i in range(len(texts))],
                    "usage": usage()}

        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list[dict], **extra) -> str:
            payload = {"id": ident, "object": chunk_kind, "created": created, "model": state.model_id,
                       "choices": choices, **extra}
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            if chat:
                yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(len(job.requests))])
            try:
                async for i, piece, reason in job.pieces(request):
                    if piece:
                        yield event([choice(i, piece, None, True)])
                    if reason is not None:
                        yield event([choice(i, None, reason, True)])
            except ApiError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
            if include_usage:
                yield event([], usage=usage())
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        body = await read_json(request)
        if "messages" not in body:
            raise ApiError(400, "'messages' is required", "messages")
        if state.chat_template is None:
            ids = state.tok.encode(chat_prompt(body["messages"]), add_bos=True)
        else:
            bos = state.tok.id_to_token(state.tok.bos_id) or "<bos>"
            text = render_chat_template(state.chat_template, body["messages"], bos)
            ids = state.tok.encode(text, add_bos=not text.startswith(bos))  # templates write <bos> themselves
        return await run(request, body, [ids], chat=True)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = await read_json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            vocab = state.engine.model.config.vocab_size
            if not all(0 <= t < vocab for t in prompt):
                raise ApiError(400, f"token ids must be in [0, {vocab})", "prompt")
            return await run(request, body, [list(prompt)], chat=False)
        else:
            raise ApiError(400, "'prompt' must be a string, a list of strings or a list of token ids", "prompt")
        if len(prompts) > 16:
            raise ApiError(400, "at most 16 prompts per request", "prompt")
        ids = [state.tok.encode(p, add_bos=True) for p in prompts]
        return await run(request, body, ids, chat=False)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": 0,
                                            "owned_by": "nanogemma"}]}

    @app.get("/health")
    async def health():
        if state.engine is None:
            status = 500 if state.load_error else 503
            return JSONResponse({"status": "error" if state.load_error else "loading",
                                 "error": state.load_error}, status_code=status, headers={"Retry-After": "2"})
        e = state.engine
        return {"status": "ok", "model": state.model_id, "slots": e.slots, "busy_slots": e.busy_slots,
                "queue_depth": e.queue_depth, "context": e.max_len}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(state.metrics, state.engine), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "chat.html", media_type="text/html")

    return app


# ------------------------------------------------------------------------------------------ running


def load_engine(model: str | None, dtype: str = "float32", device: str = "cpu", quantize: str | None = None,
                slots: int = DEFAULT_SLOTS, max_queue: int = 64, context: int | None = None,
                step_tokens: int = DEFAULT_STEP_TOKENS, compile: bool = False,
                prefix_cache: int = DEFAULT_PREFIX_CACHE, adapter: str | None = None,
                prefill_share: float | None = DEFAULT_PREFILL_SHARE):
    """Load a model as `generate` does (a LoRA `adapter` merged in first) and wrap it in an engine:
    (engine, tokenizer)."""
    from .weights import load_for_inference

    m, tok = load_for_inference(model, dtype, device, quantize, pack=not compile, adapter=adapter)
    return Engine(m, slots=slots, max_len=context, step_tokens=step_tokens, max_queue=max_queue,
                  compile=compile, pad_id=getattr(tok, "pad_id", 0) or 0, prefix_cache=prefix_cache,
                  prefill_share=prefill_share), tok


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 8000, dtype: str = "float32",
          device: str = "cpu", quantize: str | None = None, slots: int = DEFAULT_SLOTS, max_queue: int = 64,
          api_key: str | None = None, context: int | None = None, step_tokens: int = DEFAULT_STEP_TOKENS,
          timeout: float = DEFAULT_TIMEOUT, max_body: int = DEFAULT_MAX_BODY, compile: bool = False,
          log_level: str = "info", prefix_cache: int = DEFAULT_PREFIX_CACHE, adapter: str | None = None,
          prefill_share: float | None = DEFAULT_PREFILL_SHARE) -> int:
    """Run the server until interrupted. The port opens at once; /health answers 503 until the model is loaded.
    `adapter`, a LoRA folder (peft's or a LoRA run), is merged into the model as `generate --adapter` does."""
    try:
        import uvicorn
    except ImportError:
        raise NanogemmaError("the server needs FastAPI and uvicorn: pip install 'nanogemma[serve]'") from None
    check_settings(slots, step_tokens, max_queue, prefix_cache, prefill_share)
    if not 0 < port < 65536:
        raise NanogemmaError(f"--port must be in 1..65535, got {port}")
    if not timeout > 0:
        raise NanogemmaError(f"--timeout must be > 0 seconds, got {timeout}")
    if adapter is not None:  # read here too (adapters are small): a wrong folder is one line, not a 500 at /health
        from .lora import read_adapter

        read_adapter(adapter)
    state = ServerState(model_id=model_name(model, adapter), api_key=api_key or None, max_body=max_body, timeout=timeout)
    state.chat_template = load_chat_template(model)

    def load() -> None:
        try:
            state.start(*load_engine(model, dtype, device, quantize, slots, max_queue, context, step_tokens, compile,
                                    prefix_cache, adapter, prefill_share))
        except Exception as e:  # reported by /health and every call, as a NanogemmaError would be
            state.load_error = f"the model failed to load: {e}"

    threading.Thread(target=load, name="nanogemma-load", daemon=True).start()
    config = uvicorn.Config(create_app(state), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run()
    finally:
        state.stop()
    return 0


def model_name(model: str | None, adapter: str | None = None) -> str:
    """The id /v1/models reports: the preset name, or the file or folder's name (a run's checkpoint as
    RUN/last); with an adapter, BASE+ADAPTER (gemma3-270m+my-lora)."""
    if adapter is not None:
        return f"{model_name(model)}+{model_name(adapter)}"
    if model is None:
        return "gemma3-270m"
    path = Path(model.rstrip("/") or model)
    if path.suffix == ".gguf":
        return path.stem
    if (path / "nanogemma.json").is_file() and path.parent.name and (path.parent / "nanogemma.json").is_file():
        return f"{path.parent.name}/{path.name}"  # RUN_DIR/last, RUN_DIR/best: "last" alone names nothing
    return path.name or model
