"""`nanogemma serve` with real clients: the official `openai` package, raw HTTP for the error cases.

Each server is a real uvicorn on 127.0.0.1 with an ephemeral port, serving a random tiny Gemma 3 with the real
262,144-token tokenizer (fast to run, real text handling). Greedy answers are compared with `generate_ids`
on the same prompt alone.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import write_tiny_hf

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from nanogemma.api import chat_prompt  # noqa: E402
from nanogemma.decoding import stop_ids_for  # noqa: E402
from nanogemma.engine import Engine  # noqa: E402
from nanogemma.generation import generate_ids  # noqa: E402
from nanogemma.server import ServerState, create_app, load_engine  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf_folder(tmp_path_factory) -> Path:
    return write_tiny_hf(tmp_path_factory.mktemp("serve-tiny-hf"))


class Running:
    """A uvicorn server in a thread on an ephemeral port of 127.0.0.1, around a ServerState."""

    def __init__(self, state: ServerState):
        import uvicorn

        self.state = state
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.state.stop()
        self.sock.close()

    def request(self, method: str, path: str, body: object = None, headers: dict | None = None,
                raw: bytes | None = None) -> tuple[int, dict, dict | str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        text = r.read().decode()
        conn.close()
        try:
            payload = json.loads(text)
        except ValueError:
            payload = text
        return r.status, {k.lower(): v for k, v in r.getheaders()}, payload


_LOADED: dict[Path, tuple] = {}


class PacedEngine(Engine):
    """An engine that takes at least `pace` seconds a step: the tiny model writes 400 tokens in well under a
    second, faster than a browser can click "stop", so a test of stopping midway needs a reply that lasts."""

    pace = 0.02

    def step(self) -> bool:
        worked = super().step()
        if worked:
            time.sleep(self.pace)
        return worked


def start(folder: Path, slots: int = 4, max_queue: int = 64, api_key: str | None = None, context: int = 512,
          step_tokens: int = 64, timeout: float = 60.0, engine_type: type[Engine] = Engine) -> Running:
    """A server on the tiny model; the model is loaded once (`load_engine`), each server has its own engine."""
    state = ServerState("serve-tiny-hf", api_key=api_key, max_body=64 * 1024, timeout=timeout)
    if folder not in _LOADED:
        engine, tok = load_engine(str(folder), slots=slots, max_queue=max_queue, context=context,
                                  step_tokens=step_tokens)
        _LOADED[folder] = (engine.model, tok)
    model, tok = _LOADED[folder]
    state.start(engine_type(model, slots=slots, max_len=context, step_tokens=step_tokens, max_queue=max_queue), tok)
    return Running(state)


@pytest.fixture(scope="module")
def server(tiny_hf_folder):
    torch.set_num_threads(1)
    running = start(tiny_hf_folder)
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def lone_text(server: Running, ids: list[int], n: int) -> str:
    engine, tok = server.state.engine, server.state.tok
    new = list(generate_ids(engine.model, ids, n, stop_ids=stop_ids_for(tok)))
    return tok.decode(new)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]


# ------------------------------------------------------------------------------------------ with openai


def test_chat_completion_equals_generate_alone(server, client):
    r = client.chat.completions.create(model="serve-tiny-hf", messages=MESSAGES, max_tokens=20, temperature=0)
    ids = server.state.tok.encode(chat_prompt(MESSAGES), add_bos=True)
    assert r.choices[0].message.content == lone_text(server, ids, 20)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 20
    assert r.model == "serve-tiny-hf" and r.id.startswith("chatcmpl-")


def test_chat_template_folds_the_system_prompt_into_the_first_turn():
    assert chat_prompt(MESSAGES) == ("<start_of_turn>user\nBe brief.\n\nHello there!<end_of_turn>\n"
                                     "<start_of_turn>model\n")
    three = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": [
        {"type": "text", "text": "c"}]}]
    assert chat_prompt(three) == ("<start_of_turn>user\na<end_of_turn>\n<start_of_turn>model\nb<end_of_turn>\n"
                                  "<start_of_turn>user\nc<end_of_turn>\n<start_of_turn>model\n")


def test_streamed_chat_adds_up_to_the_whole_answer_and_reports_usage(server, client):
    whole = client.chat.completions.create(model="serve-tiny-hf", messages=MESSAGES, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="serve-tiny-hf", messages=MESSAGES, max_tokens=16,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_completions_stream_and_not(server, client):
    prompt = "Once upon a time"
    ids = server.state.tok.encode(prompt, add_bos=True)
    r = client.completions.create(model="serve-tiny-hf", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == lone_text(server, ids, 12)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="serve-tiny-hf", prompt=prompt, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_seeded_sampling_reproduces_and_n_gives_choices(client):
    def ask(**kw):
        return client.completions.create(model="serve-tiny-hf", prompt="Hi", max_tokens=10, temperature=1.0,
                                         top_p=0.9, extra_body={"top_k": 40, "min_p": 0.01,
                                                                "repetition_penalty": 1.1}, **kw)
    a, b = ask(seed=7), ask(seed=7)
    assert a.choices[0].text == b.choices[0].text
    three = ask(seed=7, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.choices[0].text == a.choices[0].text and three.usage.completion_tokens == 30


def test_stop_strings_cut_the_answer(server, client):
    full = client.completions.create(model="serve-tiny-hf", prompt="Once", max_tokens=20, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2] if len(text) > 4 else text
    r = client.completions.create(model="serve-tiny-hf", prompt="Once", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == text[:text.find(stop)] and r.choices[0].finish_reason == "stop"


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["serve-tiny-hf"]
    status, _, health = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["slots"] == 4
    status, headers, text = server.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("requests_total", "queue_depth", "active_slots", "generation_tokens_per_second",
                 "time_to_first_token_seconds_bucket", "time_to_first_token_seconds_count", "prefix_hits_total",
                 "prefix_tokens_total"):
        assert f"nanogemma_{name}" in text
    count = next(line for line in text.splitlines() if line.startswith("nanogemma_time_to_first_token_seconds_count"))
    assert int(count.split()[-1]) >= 1


def test_openai_errors(client):
    import openai

    for bad in ({"temperature": -1}, {"top_p": 1.5}, {"max_tokens": 0}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="serve-tiny-hf", messages=MESSAGES, **bad)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)


# ------------------------------------------------------------------------------------------ raw HTTP


@pytest.mark.parametrize("body, needle", [
    ({"messages": []}, "non-empty"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": 3}]}, "content"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "alternate"),
    ({"messages": MESSAGES, "temperature": "hot"}, "temperature"),
    ({"messages": MESSAGES, "temperature": -0.5}, "temperature"),
    ({"messages": MESSAGES, "top_p": 1.01}, "top_p"),
    ({"messages": MESSAGES, "top_k": 0}, "top_k"),
    ({"messages": MESSAGES, "max_tokens": 1.5}, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": 600}, "context holds 512"),
    ({"messages": MESSAGES, "stream": "yes"}, "stream"),
    ({"messages": MESSAGES, "stop": [1, 2]}, "stop"),
    ({"messages": MESSAGES, "n": 0}, "'n'"),
    ({"messages": "hello"}, "messages"),
    ({}, "messages"),
])
def test_invalid_chat_requests_are_400(server, body, needle):
    status, _, payload = server.request("POST", "/v1/chat/completions", body)
    assert status == 400, payload
    assert needle in payload["error"]["message"] and payload["error"]["type"] == "invalid_request_error"


def test_invalid_json_routes_and_sizes(server):
    status, _, payload = server.request("POST", "/v1/completions", raw=b"{not json")
    assert status == 400 and "JSON" in payload["error"]["message"]
    status, _, payload = server.request("POST", "/v1/completions", {"prompt": {"a": 1}})
    assert status == 400
    status, _, payload = server.request("POST", "/v1/completions", {"prompt": "x" * 5000, "max_tokens": 5})
    assert status == 400 and payload["error"]["code"] == "context_length_exceeded"
    status, _, payload = server.request("POST", "/v1/completions", {"prompt": [1, 2, 10**9]})
    assert status == 400
    status, _, payload = server.request("GET", "/v1/nothing")
    assert status == 404 and "error" in payload
    status, _, payload = server.request("POST", "/v1/completions", raw=b'{"prompt": "' + b"a" * 70_000 + b'"}')
    assert status == 413
    status, _, _ = server.request("GET", "/health")
    assert status == 200


def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "Go", "max_tokens": 400, "stream": True,
                                                             "temperature": 0}),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    assert r.readline().startswith(b"data: ")  # the first event: it is running
    assert server.state.engine.busy_slots == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.time() + 5
    while server.state.engine.busy_slots and time.time() < deadline:
        time.sleep(0.02)
    assert server.state.engine.busy_slots == 0
    assert server.state.engine.stats.finished["cancelled"] >= 1


def test_api_key(tiny_hf_folder):
    openai = pytest.importorskip("openai")
    running = start(tiny_hf_folder, slots=1, api_key="sesame")
    try:
        status, _, payload = running.request("GET", "/v1/models")
        assert status == 401 and payload["error"]["type"] == "authentication_error"
        status, _, _ = running.request("GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert status == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=running.url + "/v1", api_key="sesame", max_retries=0)
        assert ok.completions.create(model="serve-tiny-hf", prompt="Hi", max_tokens=3).usage.completion_tokens
        assert running.request("GET", "/health")[0] == 200  # health needs no key
    finally:
        running.close()


def test_full_queue_is_429_with_retry_after_and_loading_is_503(tiny_hf_folder):
    running = start(tiny_hf_folder, slots=1, max_queue=1)
    try:
        engine = running.state.engine
        long = {"prompt": "Go", "max_tokens": 80, "temperature": 0}
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(running.request("POST", "/v1/completions", long)[0]))
                   for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.time() + 10
        while engine.busy_slots + engine.queue_depth < 2 and time.time() < deadline:
            time.sleep(0.01)
        status, headers, payload = running.request("POST", "/v1/completions", long)
        assert status == 429 and headers["retry-after"] == "1" and payload["error"]["code"] == "queue_full"
        for t in threads:
            t.join(60)
        assert results == [200, 200]
    finally:
        running.close()
    loading = Running(ServerState("x"))
    try:
        status, headers, payload = loading.request("POST", "/v1/completions", {"prompt": "hi"})
        assert status == 503 and "retry-after" in headers and "loading" in payload["error"]["message"]
        assert loading.request("GET", "/health")[0] == 503
    finally:
        loading.close()


def test_request_timeout(tiny_hf_folder):
    running = start(tiny_hf_folder, slots=1, timeout=0.5)
    try:
        status, _, payload = running.request("POST", "/v1/completions", {"prompt": "Go", "max_tokens": 480})
        if status == 200:  # a fast machine finished in time: then a longer ask must time out
            pytest.skip("finished within the timeout")
        assert status == 504 and payload["error"]["code"] == "timeout"
        deadline = time.time() + 5
        while running.state.engine.busy_slots and time.time() < deadline:
            time.sleep(0.02)
        assert running.state.engine.busy_slots == 0
    finally:
        running.close()


# ------------------------------------------------------------------------------------------ the command


def test_cli_serve_binds_localhost_and_answers(tiny_hf_folder):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nanogemma", "serve", "--model", str(tiny_hf_folder),
                             "--port", str(port), "--slots", "2", "--context", "256", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, status = time.time() + 60, None
        while time.time() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                status = conn.getresponse().status
                conn.close()
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert status == 200, proc.stderr.read() if proc.poll() is not None else "no answer"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/chat/completions", body=json.dumps({"messages": MESSAGES, "max_tokens": 4}),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["usage"]["completion_tokens"] >= 1
        conn.close()
        other = socket.gethostbyname(socket.gethostname())
        if other != "127.0.0.1":  # bound to 127.0.0.1 only: this machine's other address is refused
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=1).close()
    finally:
        proc.terminate()
        proc.wait(20)


def test_cli_serve_bad_flags():
    proc = subprocess.run([sys.executable, "-m", "nanogemma", "serve", "--slots", "0"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("nanogemma: error:") and "--slots" in proc.stderr


@pytest.fixture(scope="module")
def tiny_adapter(tiny_hf_folder, tmp_path_factory) -> Path:
    """A peft folder for the tiny model: rank-2 adapters on every projection, B random (a real correction)."""
    from nanogemma import lora
    from nanogemma.weights import build_model, load_state

    model = lora.apply_lora(build_model(*load_state(tiny_hf_folder)[:2]), lora.LoRAConfig(rank=2, alpha=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, p in lora.adapter_state(model).items():
            if k.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return lora.save_peft(tmp_path_factory.mktemp("serve-adapter") / "my-lora", lora.LoRAConfig(rank=2, alpha=4),
                          lora.adapter_state(model), str(tiny_hf_folder))


def test_served_adapter_equals_generate_with_it(server, tiny_hf_folder, tiny_adapter, capsys):
    """serve's loader applies --adapter as generate's does: the greedy completions agree token for token
    (one loader, `load_for_inference`), and differ from the base model's; /v1/models names base+adapter."""
    from nanogemma import cli
    from nanogemma.server import model_name

    prompt, n = "Once upon a time", 12
    engine, tok = load_engine(str(tiny_hf_folder), slots=2, context=256, step_tokens=64, adapter=str(tiny_adapter))
    state = ServerState(model_name(str(tiny_hf_folder), str(tiny_adapter)), max_body=64 * 1024, timeout=60)
    state.start(engine, tok)
    running = Running(state)
    try:
        assert running.request("GET", "/v1/models")[2]["data"][0]["id"] == f"{tiny_hf_folder.name}+my-lora"
        status, _, payload = running.request("POST", "/v1/completions", {"prompt": prompt, "max_tokens": n,
                                                                          "temperature": 0})
        assert status == 200, payload
        served = payload["choices"][0]["text"]
    finally:
        running.close()
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(tiny_hf_folder), "--adapter", str(tiny_adapter),
                     "--max-new-tokens", str(n), prompt]) == 0
    assert capsys.readouterr().out == served + "\n"
    base = server.request("POST", "/v1/completions", {"prompt": prompt, "max_tokens": n, "temperature": 0})[2]
    assert base["choices"][0]["text"] != served  # the adapter is applied, not ignored


def test_served_model_names(tmp_path):
    from nanogemma.server import model_name

    run = tmp_path / "my-run"
    (run / "last").mkdir(parents=True)
    for folder in (run, run / "last"):
        (folder / "nanogemma.json").write_text("{}")
    assert model_name(None) == "gemma3-270m" and model_name(str(tmp_path / "m.Q8_0.gguf")) == "m.Q8_0"
    assert model_name(str(run)) == "my-run" and model_name(str(run / "last") + "/") == "my-run/last"
    assert model_name(None, str(run)) == "gemma3-270m+my-run"


def test_cli_serve_bad_adapter_is_one_line(capsys):
    """A folder that is no adapter fails before the port opens (nothing is loaded): one line, exit 1."""
    from nanogemma import cli

    assert cli.main(["serve", "--adapter", str(Path(__file__).parent), "--port", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nanogemma: error:") and "is not a LoRA adapter" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------ under load


def settled_rss(process) -> int:
    """Resident memory after a garbage collection and handing freed heap pages back to the system."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the reading is just noisier
        pass
    return process.memory_info().rss


def test_load_32_clients_256_requests(tiny_hf_folder):
    """32 concurrent clients, 256 requests of mixed lengths, streamed or not, some leaving early: every
    request gets its complete lone-prompt answer or a clean 429; no slot stays busy; memory stays flat."""
    import random

    import psutil

    torch.set_num_threads(1)
    running = start(tiny_hf_folder, slots=8, max_queue=8, step_tokens=64)
    engine, tok = running.state.engine, running.state.tok
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge".split()
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(words) for _ in range(n)) for n in (1, 3, 6, 12, 25, 50, 80, 120)]
    jobs = []
    for i in range(256):
        p, n = prompts[i % len(prompts)], (2, 5, 9)[i % 3]
        jobs.append({"prompt": p, "max_tokens": n, "stream": i % 2 == 0, "leave": i % 11 == 5,
                     "seed": 3 if i % 7 == 0 else None})
    t_lone = time.time()
    expected = {(p, n): lone_text(running, tok.encode(p, add_bos=True), n) for p in prompts for n in (2, 5, 9)}
    print(f"lone answers: {time.time() - t_lone:.1f} s")
    process = psutil.Process()

    def one(job: dict) -> tuple[str, str | None]:
        for _ in range(200):  # a client told 429 retries shortly (the queue is kept small on purpose)
            kind, text = attempt(job)
            if kind != "429":
                return kind, text
            rejected.append(1)
            time.sleep(0.1)
        return "429", None

    rejected: list[int] = []

    def attempt(job: dict) -> tuple[str, str | None]:
        body = {"prompt": job["prompt"], "max_tokens": job["max_tokens"], "stream": job["stream"]}
        body.update({"temperature": 1.0, "seed": job["seed"]} if job["seed"] is not None else {"temperature": 0})
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=120)
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status == 429:
            payload = json.loads(r.read())
            conn.close()
            assert r.getheader("Retry-After") == "1" and payload["error"]["code"] == "queue_full"
            return "429", None
        assert r.status == 200, r.read()
        if not job["stream"]:
            text = json.loads(r.read())["choices"][0]["text"]
            conn.close()
            return "ok", text
        text, done = "", False
        while True:
            line = r.readline()
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)
            assert "error" not in event, event
            text += "".join(c["text"] for c in event["choices"])
            if job["leave"]:
                conn.sock.shutdown(socket.SHUT_RDWR)
                conn.close()
                return "left", None
        conn.close()
        assert done
        return "ok", text

    def run_all(batch: list[dict]) -> list[tuple[str, str | None]]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(32) as pool:
            return list(pool.map(one, batch))

    try:
        t0 = time.time()
        run_all(jobs[:128])  # warm up: allocators, thread arenas and caches reach their working size
        before = settled_rss(process)
        rejected.clear()
        start_time = time.time()
        results = run_all(jobs)
        elapsed = time.time() - start_time
        kinds = [k for k, _ in results]
        assert kinds.count("ok") + kinds.count("429") + kinds.count("left") == len(jobs)
        assert kinds.count("ok") >= 200 and rejected, (kinds.count("ok"), len(rejected))
        seeded: dict[tuple, str] = {}
        for job, (kind, text) in zip(jobs, results, strict=True):
            if kind != "ok":
                continue
            if job["seed"] is None:
                assert text == expected[job["prompt"], job["max_tokens"]]
            else:  # the same seed, the same text, whatever ran beside it
                assert seeded.setdefault((job["prompt"], job["max_tokens"]), text) == text
        deadline = time.time() + 5
        while (engine.busy_slots or engine.queue_depth) and time.time() < deadline:
            time.sleep(0.02)
        assert engine.busy_slots == 0 and engine.queue_depth == 0
        grown = settled_rss(process) - before
        assert grown < 48 * 2**20, f"RSS grew by {grown / 2**20:.0f} MB over the run"
        status, _, health = running.request("GET", "/health")
        assert status == 200 and health["status"] == "ok"
        print(f"load: {kinds.count('ok')} ok, {len(rejected)} answers 429 (then retried), {kinds.count('left')} "
              f"left early, {elapsed:.1f} s (warm-up {start_time - t0:.1f} s), RSS {grown / 2**20:+.1f} MB")
    finally:
        running.close()


# ------------------------------------------------------------------------------------------ the page


CHROMIUM = "/usr/bin/chromium"  # Debian's package (the Makefile installs it when missing)


def test_chat_page_in_a_headless_browser(tiny_hf_folder, tmp_path):
    """Load the page, send a message, see the streamed reply (the API's greedy answer), stop a long one."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (make test does)")
    running = start(tiny_hf_folder, slots=2, engine_type=PacedEngine)  # 400 tokens take 8 s: stop comes first
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
                args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page()
            page.goto(running.url + "/")
            page.wait_for_function("document.getElementById('status').textContent.includes('serve-tiny-hf')",
                                   timeout=20_000)
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "12")
            page.fill("#input", "Hello there!")
            page.press("#input", "Enter")
            reply = page.locator(".msg.assistant").nth(0)
            page.wait_for_function("document.querySelector('.msg.assistant').dataset.state === 'length'",
                                   timeout=30_000)
            ids = running.state.tok.encode(chat_prompt([{"role": "user", "content": "Hello there!"}]), add_bos=True)
            expected = lone_text(running, ids, 12)
            note = reply.locator(".note").inner_text()
            assert reply.evaluate("e => e.firstChild.textContent") == expected  # the text node, before the note
            assert "tokens/s" in note and "12 tokens" in note
            # A long reply, stopped midway: the page keeps what came, and the server frees the slot.
            page.fill("#max_tokens", "400")
            page.fill("#input", "Tell me more.")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.msg.assistant')[1].textContent.length > 3",
                                   timeout=30_000)
            page.click("#stop")
            page.wait_for_function("document.querySelectorAll('.msg.assistant')[1].dataset.state === 'stopped'",
                                   timeout=10_000)
            assert page.evaluate("conversation.length") == 4  # both turns kept for the next message
            deadline = time.time() + 5
            while running.state.engine.busy_slots and time.time() < deadline:
                time.sleep(0.05)
            assert running.state.engine.busy_slots == 0
            assert running.state.engine.stats.finished["cancelled"] >= 1
            browser.close()
    finally:
        running.close()


# A template of our own in Hugging Face's form: system turns kept as their own role, to tell it from Gemma's.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' and m.content == 'forbidden' %}"
            "{{ raise_exception('no forbidden words') }}{% endif %}<start_of_turn>"
            "{{ 'model' if m.role == 'assistant' else m.role }}\n{{ m.content | trim }}<end_of_turn>\n{% endfor %}"
            "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def test_a_folder_chat_template_is_used(tiny_hf_folder, tmp_path):
    import shutil

    from nanogemma.api import load_chat_template, render_chat_template

    folder = tmp_path / "templated"
    shutil.copytree(tiny_hf_folder, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    assert load_chat_template(str(folder)) == TEMPLATE and load_chat_template(str(tiny_hf_folder)) is None
    text = render_chat_template(TEMPLATE, MESSAGES)
    assert text == ("<bos><start_of_turn>system\nBe brief.<end_of_turn>\n<start_of_turn>user\nHello there!"
                    "<end_of_turn>\n<start_of_turn>model\n")
    running = start(tiny_hf_folder, slots=1)
    running.state.chat_template = load_chat_template(str(folder))
    try:
        status, _, payload = running.request("POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3,
                                                                             "temperature": 0})
        ids = running.state.tok.encode(text, add_bos=False)
        assert status == 200 and payload["usage"]["prompt_tokens"] == len(ids)
        assert payload["choices"][0]["message"]["content"] == lone_text(running, ids, 3)
        status, _, payload = running.request("POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "forbidden"}]})
        assert status == 400 and "no forbidden words" in payload["error"]["message"]
    finally:
        running.close()
