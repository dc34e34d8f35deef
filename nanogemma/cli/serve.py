"""`nanogemma serve`: the flags of the HTTP server; `server.serve` does the rest."""

from __future__ import annotations

import argparse

from ..flags import NON_NEGATIVE, POSITIVE, number
from .common import add_adapter_flag, add_model_flags


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching, and a chat page",
                       description="Serve the model over HTTP: POST /v1/chat/completions and /v1/completions "
                                   "(streaming or not), GET /v1/models, /health, /metrics, and a chat page at /. "
                                   "Requests share the model in slots (continuous batching). Needs the [serve] extra.")
    add_model_flags(p)
    add_adapter_flag(p)
    p.add_argument("--quantize", default=None, choices=["int8", "int8-wo"],
                   help="int8 weights (int8-wo keeps batched answers equal to lone ones; see nanogemma/engine.py)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step over all slots (CUDA graphs on a GPU)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=number(int, 0, 65535), default=8000, help="port (default 8000)")
    p.add_argument("--slots", type=POSITIVE, default=8, help="requests served at once (default 8)")
    p.add_argument("--max-queue", type=NON_NEGATIVE, default=64,
                   help="requests that may wait for a slot; more are answered 429 (default 64)")
    p.add_argument("--context", type=POSITIVE, default=None,
                   help="tokens per request, prompt plus reply (default 8192, at most the model's context)")
    p.add_argument("--step-tokens", type=POSITIVE, default=256,
                   help="tokens one engine step may feed, decode and prompt chunks together (default 256)")
    p.add_argument("--prefill-share", type=number(float, 0), default=0.5,  # engine.DEFAULT_PREFILL_SHARE
                   help="while requests decode, a step's prompt chunks take at most this fraction of a decode "
                        "step's time, so a long prompt stretches their token gaps by at most that much "
                        "(default 0.5; 0: only --step-tokens limits them)")
    p.add_argument("--prefix-cache", type=NON_NEGATIVE, default=8,  # engine.DEFAULT_PREFIX_CACHE
                   help="prompt prefixes kept for reuse, e.g. a shared system prompt (default 8, 0: off; "
                        "each holds a slot's cache rows)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ routes")
    p.add_argument("--timeout", type=number(float, 0, lo_open=True), default=600.0, help="seconds a request may take (default 600)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from ..server import serve

    return serve(args.model, args.host, args.port, args.dtype, args.device, args.quantize, args.slots,
                 args.max_queue, args.api_key, args.context, args.step_tokens, args.timeout,
                 compile=args.compile, log_level=args.log_level, prefix_cache=args.prefix_cache,
                 adapter=args.adapter, prefill_share=args.prefill_share or None)
