"""Story quality judged by another language model, through any OpenAI-compatible chat endpoint.

Loss says how well a model predicts text; it does not say whether its stories are any good. Following
the TinyStories evaluation, we let a strong model grade them: N prompts × K sampled continuations, each
scored 1-10 for grammar, creativity, consistency (with the beginning and with itself) and plot, and —
for prompts that carry an instruction ("use the word 'lantern'") — for instruction following.

The judge is any server speaking the OpenAI chat-completions protocol (OpenAI, Gemini's compatibility
endpoint, vLLM, llama.cpp's server, Ollama, ...): POST `{url}/chat/completions` with `model` and `messages`,
answer in `choices[0].message.content`. The key comes from an environment variable, never the command line.

Judges do not always answer in the format asked for. A reply we cannot read as scores is *counted and
kept* (with its text, in the results JSON), never dropped: dropping them silently would bias the averages
towards the stories the judge found easy to grade. Requests that fail (network, HTTP errors) are counted
separately.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import statistics
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import NanogemmaError

CRITERIA = ("grammar", "creativity", "consistency", "plot")
INSTRUCTION = "instruction_following"
MAX_REPLY_BYTES = 4 << 20


@dataclass
class StoryPrompt:
    text: str  # the beginning the model continues
    instruction: str | None = None  # what the story must do, shown to the model and to the judge


DEFAULT_PROMPTS = [
    StoryPrompt("Once upon a time, there was a little girl named Lily who found a shiny key in the garden."),
    StoryPrompt("Tom wanted to build the tallest sand castle on the beach, but the sea had other plans."),
    StoryPrompt("The old dog sat by the door every evening, waiting."),
    StoryPrompt("In a small village at the edge of the forest, nobody had ever seen snow."),
    StoryPrompt("Mia and her brother found a map inside a library book."),
    StoryPrompt("The robot woke up in an empty factory and did not know its name."),
    StoryPrompt("Write a short story for children that uses the words \"lantern\", \"river\" and \"brave\".\n\n"
                "Story: Once upon a time,", "use the words \"lantern\", \"river\" and \"brave\""),
    StoryPrompt("Write a short story in which a cat learns to share. The story must have a happy ending.\n\n"
                "Story:", "a cat learns to share, with a happy ending"),
    StoryPrompt("Write a story about a rainy day that contains a dialogue between two friends.\n\n"
                "Story:", "a rainy day, with a dialogue between two friends"),
    StoryPrompt("Write a story with a surprising twist at the end, about a boy and his kite.\n\n"
                "Story:", "a boy and his kite, with a surprising twist at the end"),
]

_SYSTEM = ("You grade short stories written by a small language model. You answer with one JSON object "
           "and nothing else.")


def judge_messages(prompt: StoryPrompt, story: str) -> list[dict[str, str]]:
    """The chat messages that ask for one story's scores."""
    keys = [*CRITERIA, *([INSTRUCTION] if prompt.instruction else [])]
    parts = [
        "The model was given the beginning below and wrote the continuation. The continuation may stop "
        "mid-sentence because of a length limit: do not penalise that.",
        f"BEGINNING:\n{prompt.text}",
        f"CONTINUATION:\n{story}",
    ]
    if prompt.instruction:
        parts.append(f"INSTRUCTION the story had to follow: {prompt.instruction}")
    parts.append(
        "Score the continuation from 1 (very poor) to 10 (excellent) for: grammar; creativity; consistency "
        "(with the beginning and within itself); plot (does it make sense and go somewhere)"
        + ("; instruction_following" if prompt.instruction else "")
        + ". Reply with only this JSON object, integers filled in: "
        + json.dumps(dict.fromkeys(keys, 0))
    )
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def parse_scores(reply: str, instruction: bool) -> tuple[dict[str, float] | None, str | None]:
    """(scores, None) or (None, why the reply cannot be read). Accepts a JSON object anywhere in the text."""
    want = [*CRITERIA, *([INSTRUCTION] if instruction else [])]
    start, end = reply.find("{"), reply.rfind("}")
    if start < 0 or end < start:
        return None, "no JSON object in the reply"
    try:
        obj = json.loads(reply[start:end + 1])
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg})"
    if not isinstance(obj, dict):
        return None, "the JSON is not an object"
    obj = {re.sub(r"[\s-]+", "_", str(k).strip().lower()): v for k, v in obj.items()}
    missing = [k for k in want if k not in obj]
    if missing:
        return None, f"missing score(s): {', '.join(missing)}"
    scores = {}
    for k in want:
        v = obj[k]
        if isinstance(v, str):
            try:
                v = float(v.strip())
            except ValueError:
                return None, f"score '{k}' is not a number: {obj[k]!r}"
        if isinstance(v, bool) or not isinstance(v, int | float) or not 1 <= v <= 10:
            return None, f"score '{k}' is not a number from 1 to 10: {obj[k]!r}"
        scores[k] = float(v)
    return scores, None


class JudgeError(Exception):
    """A request to the judge failed (network, HTTP status, or a body that is not a chat completion)."""


class JudgeClient:
    """A minimal OpenAI-compatible chat client on urllib (no SDK needed)."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 2, temperature: float = 0.0, deadline: float | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise NanogemmaError(f"--judge-url must start with http:// or https://, got '{url}'")
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else f"{url}/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.retries, self.temperature = retries, temperature
        # `deadline` (time.monotonic() seconds) bounds all requests together: each waits at most until then.
        self.deadline = deadline

    def _wait(self) -> float:
        if self.deadline is None:
            return self.timeout
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise JudgeError("the judging deadline (--judge-deadline) has passed")
        return min(self.timeout, left)

    def chat(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self._wait()) as resp:
                    raw = resp.read(MAX_REPLY_BYTES + 1)
                break
            except urllib.error.HTTPError as e:
                # Rate limits and server errors may pass; a bad request or a bad key will not.
                if e.code not in (429, 500, 502, 503, 504) or attempt == self.retries:
                    raise JudgeError(f"HTTP {e.code} {e.reason}") from None
            except TimeoutError as e:  # a server that accepts and never answers: no retry
                raise JudgeError(f"no reply from {self.url} within {self.timeout:g} s (--judge-timeout)") from e
            except (urllib.error.URLError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, TimeoutError):
                    raise JudgeError(f"no reply from {self.url} within {self.timeout:g} s (--judge-timeout)") from None
                if attempt == self.retries:
                    what = getattr(reason, "strerror", None) or str(reason)
                    raise JudgeError(f"cannot reach {self.url}: {what.lower()}") from None
            time.sleep(min(2.0**attempt, 30.0))
        if len(raw) > MAX_REPLY_BYTES:
            raise JudgeError(f"reply larger than {MAX_REPLY_BYTES} bytes")
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError("the reply is not an OpenAI-style chat completion") from None
        if not isinstance(content, str):
            raise JudgeError("the reply's message content is not text")
        return content


def api_key_from_env(name: str | None) -> str | None:
    """The key in environment variable `name` (default OPENAI_API_KEY, optional for local servers)."""
    if name is None:
        return os.environ.get("OPENAI_API_KEY") or None
    key = os.environ.get(name)
    if not key:
        raise NanogemmaError(f"environment variable {name} (given with --judge-key-env) is not set: "
                             f"export {name}=<your key>")
    return key


def read_prompts(path: str | Path | None) -> list[StoryPrompt]:
    """Prompts from a file: JSON lines {"prompt": ..., "instruction": ...}, or plain lines (one prompt each)."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    from ..files import read_text

    path = Path(path)
    prompts = []
    for n, line in enumerate(read_text(path, "prompts file").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
                prompts.append(StoryPrompt(str(obj["prompt"]), obj.get("instruction") or None))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise NanogemmaError(f"{path}:{n}: expected a JSON object with a \"prompt\" field") from None
        else:
            prompts.append(StoryPrompt(line.replace("\\n", "\n")))
    if not prompts:
        raise NanogemmaError(f"{path} holds no prompts")
    return prompts


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, standard deviation and count per criterion over the parsed replies, and the failure counts."""
    scored = [s for s in samples if s["scores"] is not None]
    per = {}
    for k in (*CRITERIA, INSTRUCTION):
        vals = [s["scores"][k] for s in scored if k in s["scores"]]
        if vals:
            per[k] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals), "n": len(vals)}
    overall = [statistics.fmean(s["scores"][k] for k in CRITERIA) for s in scored]
    return {
        "criteria": per,
        "overall_mean": statistics.fmean(overall) if overall else None,
        "stories": len(samples),
        "scored": len(scored),
        "unparseable": sum(s["error"] is not None and s["reply"] is not None for s in samples),
        "request_failed": sum(s["reply"] is None for s in samples),
    }


def summary_table(summary: dict[str, Any]) -> str:
    from .inspect_model import format_table

    rows = [[k.replace("_", " "), f"{v['mean']:.2f}", f"{v['std']:.2f}", v["n"]] for k, v in summary["criteria"].items()]
    if summary["overall_mean"] is not None:
        rows.append(["overall (mean of the four)", f"{summary['overall_mean']:.2f}", "", summary["scored"]])
    return "\n".join([
        format_table(["criterion", "mean", "std", "n"], rows),
        f"stories: {summary['stories']}; scored: {summary['scored']}; unparseable replies: "
        f"{summary['unparseable']}; failed requests: {summary['request_failed']} "
        "(the last two are left out of the means and kept, with the reply, in the JSON)",
    ])


def judge_stories(generate: Callable[[str, int], str], client: JudgeClient, prompts: list[StoryPrompt],
                  samples: int = 1, progress: bool = True,
                  on_record: Callable[[dict[str, Any]], None] | None = None,
                  results: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """For each prompt, `samples` stories from `generate(prompt_text, sample_index)`, each sent to the judge.

    Each judged story is appended to `results` (a list the caller may pass, so that what was judged before
    an interruption is still there) and handed to `on_record` as soon as it is judged. The first failed
    request is said on stderr at once; once the client's deadline has passed, no more stories are made.
    """
    results = [] if results is None else results
    said = False
    bar = tqdm(total=len(prompts) * samples, unit="story", desc="judge", disable=not progress, leave=False)
    for i, p in enumerate(prompts):
        for k in range(samples):
            story = generate(p.text, k)
            rec: dict[str, Any] = {"prompt": p.text, "instruction": p.instruction, "prompt_index": i,
                                   "sample": k, "story": story, "reply": None, "scores": None, "error": None}
            try:
                rec["reply"] = client.chat(judge_messages(p, story))
                rec["scores"], rec["error"] = parse_scores(rec["reply"], p.instruction is not None)
            except JudgeError as e:
                rec["error"] = f"request failed: {e}"
                if not said:
                    said = True
                    bar.write(f"nanogemma: warning: judge {rec['error']}", file=sys.stderr)
            results.append(rec)
            if on_record is not None:
                on_record(rec)
            if len(results) == 3 and all(r["reply"] is None for r in results):
                # A wrong URL, model name or key fails every request: say so now, not after N × K stories.
                raise NanogemmaError(f"the judge failed the first 3 requests ({rec['error']}); "
                                     "check --judge-url, --judge-model and the API key")
            bar.update(1)
            if client.deadline is not None and time.monotonic() >= client.deadline:
                bar.write("nanogemma: warning: the judging deadline passed: the remaining stories are not judged",
                          file=sys.stderr)
                bar.close()
                return results
    bar.close()
    return results


def first_error(stories: list[dict[str, Any]]) -> str | None:
    """The first failure among judged stories (what a user needs to fix a URL, model or key)."""
    return next((s["error"] for s in stories if s.get("error")), None)


def story_generator(model, tok, max_new_tokens: int, temperature: float, top_k: int | None,
                    top_p: float | None, seed: int) -> Callable[[str, int], str]:
    """`generate` with a fresh, reproducible seed for each story (seed, seed + 1, ...)."""
    from ..generation import generate

    count = itertools.count(seed)
    return lambda text, _k: generate(model, tok, text, max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_k=top_k, top_p=top_p, seed=next(count))
