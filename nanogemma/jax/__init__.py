"""nanogemma.jax: the same Gemma 3 in JAX, on the same weights (install the extra: `nanogemma[jax]`).

    import nanogemma.jax as ngj
    model, tok = ngj.load()                                   # the official 270M weights, float32
    logits = model([tok.encode("Hi")])                        # (1, T, vocab), jitted
    print(ngj.generate(model, tok, "Once upon a time", max_new_tokens=32))

Modules, each the twin of a PyTorch one:

* `model`    — the forward pass as pure functions over a dict of parameters in nanogemma's names;
* `cache`    — a static KV cache (W-slot rings on sliding layers), a value passed into and out of jitted steps;
* `load`     — GGUF / Hugging Face / run folders into JAX arrays via numpy, strictly; run folders out;
* `generation` — jitted prefill and decode, greedy / temperature / top-k / top-p, compiled once per shape;
* `step`     — a jitted optax training step (AdamW, warmup + cosine, accumulation, clipping) and evaluation;
* `loop`     — `nanogemma train --backend jax`: the shared training loop (`train.loop`) with the JAX step.

Everything a user can get wrong raises `nanogemma.NanogemmaError`, as in the PyTorch package.

Seeds: greedy decoding gives the PyTorch backend's tokens, but a `seed` draws from JAX's own random
stream (`jax.random`, threefry), not torch's generator, so sampled text with the same seed differs
between the backends (each is reproducible on its own).
"""

from __future__ import annotations

try:
    import jax  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    from ..errors import NanogemmaError

    raise NanogemmaError("the JAX backend needs JAX and optax: pip install 'nanogemma[jax]'") from e

from .generation import generate  # the module is `generation`, so the name is the function
from .load import load, load_params, save_run
from .model import JaxGemma, forward, init_params

__all__ = ["JaxGemma", "forward", "generate", "init_params", "load", "load_params", "save_run"]
