"""`nanogemma eval`: LM metrics against a hand computation, and the judge path against a real local HTTP
server that returns OpenAI-style chat completions, some of them unparseable."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from nanogemma.cli import main
from nanogemma.config import get_preset
from nanogemma.errors import NanogemmaError
from nanogemma.model import Gemma
from nanogemma.tools.evaluate import evaluate_lm, text_tokens, windows
from nanogemma.tools.judge import JudgeClient, StoryPrompt, judge_stories, parse_scores

SCORES = {"grammar": 8, "creativity": 6, "consistency": 7, "plot": 5}
MAX_REQUESTS = 50  # the server answers at most this many, then stops by itself


# ------------------------------------------------------------------------------------------ judge server


class _Judge(BaseHTTPRequestHandler):
    """Canned replies in a fixed cycle: two good ones (plain and fenced), then two the parser must reject."""

    def do_POST(self) -> None:  # noqa: N802 (the http.server naming)
        srv = self.server
        length = int(self.headers.get("Content-Length", 0))
        if length > 1 << 20:
            self.send_error(413)
            return
        body = json.loads(self.rfile.read(length))
        with srv.lock:
            srv.seen += 1
            if srv.seen > MAX_REQUESTS:
                threading.Thread(target=srv.shutdown, daemon=True).start()
                self.send_error(503)
                return
            if srv.seen == srv.fail_on:  # one transient error: the client must retry
                self.send_error(503)
                return
            srv.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            n = len(srv.requests) - 1
        want = dict(SCORES)
        if "instruction_following" in body["messages"][-1]["content"]:
            want["instruction_following"] = 9
        content = [json.dumps(want), f"Here you go:\n```json\n{json.dumps(want)}\n```",
                   "What a lovely story! I would give it a high score.",
                   json.dumps({**want, "plot": 11})][n % 4]
        reply = json.dumps({"id": f"chat-{n}", "object": "chat.completion", "model": body["model"],
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)  # loopback only, a free port
    server.lock, server.seen, server.requests, server.fail_on = threading.Lock(), 0, [], 2
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    deadline = threading.Timer(300, server.shutdown)  # stops by itself even if the test hangs
    deadline.daemon = True
    deadline.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    deadline.cancel()
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_judge_through_the_cli(judge_server, tmp_path, monkeypatch, capsys):
    server, url = judge_server
    monkeypatch.setenv("NANOGEMMA_TEST_JUDGE_KEY", "sk-test")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("Once upon a time, a small fox\n"
                       + json.dumps({"prompt": "Write a story about a boat.\n\nStory:", "instruction": "a boat"}) + "\n")
    out = tmp_path / "judge.json"
    rc = main(["eval", "--judge-url", url, "--judge-model", "test-judge", "--judge-key-env", "NANOGEMMA_TEST_JUDGE_KEY",
               "--prompts", str(prompts), "--samples", "4", "--max-new-tokens", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "unparseable replies: 4" in printed and "scored: 4" in printed

    assert len(server.requests) == 8 and server.seen == 9  # 8 stories, one retried after a 503
    assert {r["path"] for r in server.requests} == {"/v1/chat/completions"}
    assert {r["auth"] for r in server.requests} == {"Bearer sk-test"}
    assert {r["body"]["model"] for r in server.requests} == {"test-judge"}

    results = json.loads(out.read_text())["judge"]
    stories, summary = results["stories"], results["summary"]
    assert len(stories) == 8 and all(s["reply"] is not None for s in stories)  # nothing dropped
    for s, r in zip(stories, server.requests, strict=True):
        assert s["story"] in r["body"]["messages"][-1]["content"]
    bad = [s for s in stories if s["scores"] is None]
    assert len(bad) == summary["unparseable"] == 4 and all(s["error"] for s in bad)
    assert summary["request_failed"] == 0 and summary["scored"] == 4
    assert summary["criteria"]["grammar"] == {"mean": 8.0, "std": 0.0, "n": 4}
    assert summary["criteria"]["instruction_following"]["n"] == 2  # only the instruction prompt's stories
    assert summary["overall_mean"] == pytest.approx(6.5)


def test_all_replies_unparseable_is_an_error(judge_server, tmp_path, capsys):
    server, url = judge_server
    server.requests = [None, None]  # the cycle now starts at the unparseable replies
    server.fail_on = 0
    out = tmp_path / "judge.json"
    rc = main(["eval", "--judge-url", url, "--judge-model", "m", "--num-prompts", "1", "--samples", "2",
               "--max-new-tokens", "1", "--out", str(out), "--no-progress"])
    assert rc == 1
    assert "no judge reply could be read as scores" in capsys.readouterr().err
    assert json.loads(out.read_text())["judge"]["summary"]["unparseable"] == 2  # still written


def test_unreachable_judge_fails_fast():
    with socket_closed_port() as port:
        client = JudgeClient(f"http://127.0.0.1:{port}/v1", "m", retries=0, timeout=5)
        with pytest.raises(NanogemmaError, match="failed the first 3 requests"):
            judge_stories(lambda text, k: "story", client, [StoryPrompt("x")], samples=5, progress=False)


class socket_closed_port:  # noqa: N801 (used as a context manager)
    """A port nothing listens on: bind, note it, close."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc) -> None:
        pass


@pytest.mark.parametrize("reply, ok", [
    ('{"grammar": 7, "creativity": 6, "consistency": 8, "plot": 5}', True),
    ('Sure! {"Grammar": "7", "creativity": 6.5, "consistency": 8, "plot": 5} Hope it helps.', True),
    ('{"grammar": 7, "creativity": 6, "consistency": 8}', False),
    ('{"grammar": 0, "creativity": 6, "consistency": 8, "plot": 5}', False),
    ('{"grammar": true, "creativity": 6, "consistency": 8, "plot": 5}', False),
    ("grammar: 7, creativity: 6", False),
    ("{not json}", False),
])
def test_parse_scores(reply, ok):
    scores, error = parse_scores(reply, instruction=False)
    assert (scores is not None, error is None) == (ok, ok)


def test_parse_scores_requires_instruction_following_when_asked():
    assert parse_scores(json.dumps(SCORES), instruction=True)[1] == "missing score(s): instruction_following"


# ------------------------------------------------------------------------------------------- LM metrics


def test_windows_predict_every_token_once():
    for n, s in ((2, 4), (10, 3), (13, 4), (100, 100)):
        spans = windows(n, s)
        assert sum(length for _, length in spans) == n - 1
        assert all(start + length <= n - 1 for start, length in spans)


def test_metrics_match_a_hand_computation():
    cfg = get_preset("tiny")
    model = Gemma(cfg).init_weights(seed=0).eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 40).astype(np.uint16)
    res = evaluate_lm(model, tokens, seq_len=16, batch_size=2, progress=False)
    t = torch.from_numpy(tokens.astype(np.int64))
    logits = torch.cat([model(t[s:s + n][None])[0] for s, n in ((0, 16), (16, 16), (32, 7))])
    with torch.no_grad():
        loss = F.cross_entropy(logits, t[1:]).item()
    assert res.tokens == 39
    assert res.loss == pytest.approx(loss, rel=1e-5)
    assert res.accuracy == pytest.approx((logits.argmax(-1) == t[1:]).float().mean().item())


def test_real_model_on_english_text(model_and_tok, tmp_path):
    model, tok = model_and_tok
    f = tmp_path / "story.txt"
    f.write_text("The sun rose over the quiet village. Children ran to the river to play, and their mothers "
                 "called after them to be careful near the water.")
    res = evaluate_lm(model, text_tokens([f], lambda s: tok.encode(s)), progress=False)
    assert res.tokens == len(tok.encode(f.read_text())) - 1
    assert res.perplexity < 100 and res.accuracy > 0.2  # a real language model, not noise (vocab 262,144)


def test_cli_on_a_prepared_dataset_and_a_run_folder(tmp_path, capsys):
    cfg = get_preset("tiny")
    run = tmp_path / "run"
    run.mkdir()
    (run / "nanogemma.json").write_text(json.dumps({"model": cfg.to_dict()}))
    save_file(Gemma(cfg).init_weights(seed=0).state_dict(), str(run / "model.safetensors"))
    data = tmp_path / "data"
    data.mkdir()
    np.random.default_rng(0).integers(0, cfg.vocab_size, 300).astype(np.uint16).tofile(data / "val.bin")
    (data / "meta.json").write_text(json.dumps({"dtype": "uint16", "splits": {"val": {"file": "val.bin", "tokens": 300}}}))
    out = tmp_path / "lm.json"
    assert main(["eval", "--model", str(run), "--data", str(data), "--seq-len", "64", "--batch-size", "2",
                 "--out", str(out), "--no-progress"]) == 0
    assert "perplexity" in capsys.readouterr().out
    lm = json.loads(out.read_text())["lm"]
    assert lm["tokens"] == 299 and lm["loss"] == pytest.approx(np.log(cfg.vocab_size), rel=0.05)  # untrained


def test_cli_errors(tmp_path, capsys):
    assert main(["eval"]) == 1
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", "--judge-url", "http://127.0.0.1:9/v1"]) == 1
    assert "--judge-model" in capsys.readouterr().err
    f = tmp_path / "t.txt"
    f.write_text("hello")
    assert main(["eval", "--model", "tiny", "--text", str(f)]) == 1  # not a loadable model
    assert capsys.readouterr().err.startswith("nanogemma: error: model not found")
