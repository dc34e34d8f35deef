"""Data preparation: any text source to flat token files that training reads (`nanogemma prepare`).

    from nanogemma.data import prepare, read_tokens, load_data_tokenizer
    prepare("synthetic:10000", "data/synthetic-gpt2", tokenizer="gpt2")
    train = read_tokens("data/synthetic-gpt2", "train")        # np.memmap of uint16 ids
    tok = load_data_tokenizer(folder="data/synthetic-gpt2")    # the same tokenizer, from the folder

Modules: `sources` (where documents come from), `chunks` (units of work read in the workers), `encoders`
(the gpt2 / gemma / bpe:N tokenizers), `prepare` (the pipeline), `store` (the folder on disk, meta.json,
interruption safety), `synthetic` (a story grammar with exactly computable entropy), `conversations`
(chat data: Gemma 3's template and the loss mask), `tasks` (fine-tuning tasks with checkable answers).
"""

from .encoders import DataTokenizer, load_data_tokenizer
from .prepare import PrepareResult, prepare
from .store import read_meta, read_tokens, verify

__all__ = ["DataTokenizer", "PrepareResult", "load_data_tokenizer", "prepare", "read_meta", "read_tokens", "verify"]
