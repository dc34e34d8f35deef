"""The data's tokenizer, written into a run folder in the Hugging Face format.

`nanogemma.load(RUN_DIR)` reads `tokenizer.json` (+ `tokenizer_config.json`) with the `tokenizers`
library, and so does `transformers.AutoTokenizer` after `nanogemma export`. A prepared data folder holds
its tokenizer in its own form, so each kind is converted here:

* **gemma**: the data folder's `gemma-tokenizer/` is already in this format; it is copied.
* **bpe:N**: the trained `tokenizer.json` gets a post-processor that puts `<|endoftext|>` in front (the
  marker that begins every document in the token files, so a prompt starts "at a document start") and a
  `tokenizer_config.json` naming `<|endoftext|>` as bos, eos, unk and pad.
* **gpt2**: tiktoken's ranks file has no merge list, so the merges are derived: replaying byte-pair
  merging on each token's bytes, with only the tokens ranked before it allowed, always ends in exactly two
  parts, and that pair is the token's merge (this is how tiktoken's ranks define GPT-2's BPE). Bytes are
  spelled with GPT-2's byte-to-character table, the byte-level pre-tokenizer splits words as GPT-2 does.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..data.encoders import ENDOFTEXT, DataTokenizer, GemmaDataTokenizer, Gpt2Tokenizer

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> character table: printable Latin-1 bytes stand for themselves, the rest are
    shifted past 255, so every byte sequence becomes a string without spaces or control characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts that byte-pair merging with only lower-ranked tokens leaves of `token`."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < limit and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} is not reachable by merges")
    return parts[0], parts[1]


def gpt2_backend(tok: Gpt2Tokenizer):
    """A `tokenizers.Tokenizer` that gives exactly tiktoken's GPT-2 ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    enc = tok.enc
    ranks = {enc.decode_single_token_bytes(i): i for i in range(tok.eot_id)}
    table = byte_alphabet()
    spell = lambda b: "".join(table[x] for x in b)  # noqa: E731
    vocab = {spell(b): r for b, r in ranks.items()}
    merges = [tuple(map(spell, _merge_of(b, ranks))) for b, r in sorted(ranks.items(), key=lambda kv: kv[1])
              if len(b) > 1]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    return backend


def _with_document_start(backend, marker: str):
    """`marker` in front of every encoding made with special tokens (transformers' default)."""
    from tokenizers import processors

    backend.post_processor = processors.TemplateProcessing(
        single=f"{marker} $A", pair=f"{marker} $A {marker}:1 $B:1",
        special_tokens=[(marker, backend.token_to_id(marker))])
    return backend


def write(folder: Path, tok: DataTokenizer) -> list[str]:
    """Write the HF tokenizer files of `tok` into `folder` (each atomically); returns their names."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tok-") as tmp:
        tmp = Path(tmp)
        if isinstance(tok, GemmaDataTokenizer):
            tok.tok.save(tmp)
        else:
            backend = gpt2_backend(tok) if isinstance(tok, Gpt2Tokenizer) else _clone(tok.backend)
            _with_document_start(backend, ENDOFTEXT).save(str(tmp / "tokenizer.json"))
            special = {f"{k}_token": ENDOFTEXT for k in ("bos", "eos", "unk", "pad")}
            config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": True,
                      "add_eos_token": False, "clean_up_tokenization_spaces": False}
            (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
            (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
        names = sorted(p.name for p in tmp.iterdir())
        for name in names:
            os.replace(tmp / name, folder / name)
    return names


def _clone(backend):
    """A copy of a `tokenizers` backend, so the data tokenizer in use is left as it was."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(backend.to_str())
