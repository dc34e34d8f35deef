"""`nanogemma export MODEL --to gguf OUT.gguf`: a model as one GGUF file that llama.cpp (and so ollama and
LM Studio) runs.

The `gguf` package writes the file; what is decided here is every convention llama.cpp's `gemma3` reads:

* **metadata** (`gemma3.*`): context, widths, blocks, heads, head dims, epsilon, the sliding window, both
  RoPE bases (`rope.freq_base` for global layers, `rope.freq_base_swa` for sliding ones) and the linear
  RoPE scaling of global layers. The layer pattern is written only when it is not Gemma's 5:1 (one bool
  per layer, True for a sliding layer). GGUF has no key for the attention scale: llama.cpp takes
  1/sqrt(head_dim) (1/sqrt(hidden / heads) for the 62-layer 27B), so a model trained with another
  `query_pre_attn_scalar` is refused rather than written to run differently.
* **tensors**: the names of `gguf_files.gguf_name_map`, which the reader uses too; shapes are written
  fastest dimension first (the `gguf` writer reverses numpy's order); RMSNorm weights are stored as
  `1 + w`, in float32 whatever `--type` says (1-d tensors are never quantised, as in llama.cpp's own
  converter); a tied head is not written (llama.cpp reuses `token_embd`), an untied one is `output`.
  `--type f16|bf16|q8_0` applies to the matrices; a matrix whose rows are not whole Q8_0 blocks (32
  values) is written as F16.
* **tokenizer** (`tokenizer.ggml.*`), from the model's own tokenizer (`tokenizer_fields`):
  - Gemma's (SentencePiece-style BPE with byte fallback) as llama.cpp's `llama` type: pieces, types and
    scores. A piece's score is minus its id: SentencePiece joins the best-scoring pair first, and the
    reference's merge ranks are the vocabulary order (`tokenizer._derive_merges`), so this makes
    llama.cpp's merges the reference's. The types say what llama.cpp matches whole in raw text: the
    special tokens (CONTROL) and the other added tokens (USER_DEFINED); whitespace runs such as "▁▁"
    are NORMAL, so llama.cpp decodes them as spaces. Gemma's chat template goes with it.
  - a byte-level BPE with GPT-2's pre-tokenizer (GPT-2's own, or one `nanogemma prepare` trained) as
    llama.cpp's `gpt2` type with the `gpt-2` pre-tokenizer: tokens, merges, <|endoftext|> as bos / eos.
  - anything else (another pre-tokenizer, a normalizer, a non-BPE model) is refused, saying what
    llama.cpp would do differently.
  The token list is padded with unused tokens up to the embedding's rows, which llama.cpp requires.

The file is written under a hidden temporary name in the target folder, synced, then renamed: OUT.gguf
is either complete or absent, never a partial file with the right name.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import SLIDING, GemmaConfig, layer_pattern
from ..errors import NanogemmaError
from ..files import clean_orphans, temp_name

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
ARCH = "gemma3"
_Q8_0_BLOCK = 32
_CHUNK_ROWS = 8192  # rows quantised at a time: the 262,144-row embedding never exists twice in float32

# Gemma's conversation format, as nanogemma.chat documents it: no system role (a system message is put in
# front of the first user message, then a blank line), "assistant" is spelled "model", every message is
# stripped, and a turn ends with <end_of_turn> and a newline. llama.cpp recognises Gemma's format by
# "<start_of_turn>" in the template; Jinja renderers (llama-cpp-python, llama-server --jinja) run it.
GEMMA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set state = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set state.system = (message['content'] | trim) + '\n\n' -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\n' + state.system + (message['content'] | trim) + '<end_of_turn>\n' -}}"
    "{%- set state.system = '' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)


@dataclass
class TokenizerFields:
    """What a GGUF says about its tokenizer (`tokenizer.ggml.*`, plus the chat template)."""

    model: str  # "llama" (SentencePiece-style) or "gpt2" (byte-level BPE)
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    special: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad ids
    add_bos: bool = True
    chat_template: str | None = None

    def pad_to(self, n: int) -> None:
        """Unused tokens up to the embedding's row count (llama.cpp wants one token per row)."""
        from gguf import TokenType

        extra = n - len(self.tokens)
        self.tokens += [f"<|nanogemma_unused_{i}|>" for i in range(extra)]
        self.types += [int(TokenType.UNUSED)] * extra
        if self.scores is not None:
            self.scores += [-float(i) for i in range(len(self.scores), n)]


# ------------------------------------------------------------------------------------------ tokenizer


def tokenizer_fields(tok) -> TokenizerFields:
    """The GGUF tokenizer fields of a nanogemma `Tokenizer`, or a NanogemmaError saying why GGUF cannot
    carry it in a form llama.cpp tokenizes the same way."""
    spec = json.loads(tok.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise _refuse(f"its model is {model.get('type')!r}; llama.cpp's tokenizers are BPE (and Unigram "
                      "SentencePiece, which nanogemma does not train)")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges"):
        if model.get(key):
            raise _refuse(f"its BPE sets {key}={model[key]!r}, which llama.cpp's BPE does not apply")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    for i, t in added.items():
        vocab.setdefault(t["content"], i)
    n = max(vocab.values()) + 1
    tokens = [""] * n
    for piece, i in vocab.items():
        tokens[i] = piece
    holes = [i for i, t in enumerate(tokens) if not t]
    if holes:
        raise _refuse(f"its vocabulary has no token for id {holes[0]} ({len(holes)} gaps)")
    if model.get("byte_fallback"):
        return _sentencepiece_fields(tok, spec, tokens, added)
    return _byte_level_fields(tok, spec, tokens, added)


def _refuse(why: str) -> NanogemmaError:
    return NanogemmaError(f"this model's tokenizer cannot be written into GGUF for llama.cpp: {why}. "
                          "Export it with --to hf instead, or train with --tokenizer gpt2, gemma or bpe:N")


def _kind(part: dict[str, Any] | None) -> str | None:
    return None if part is None else part.get("type")


def _sentencepiece_fields(tok, spec: dict[str, Any], tokens: list[str], added: dict[int, dict]) -> TokenizerFields:
    from gguf import TokenType

    norm, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    spaces_to_meta = (_kind(norm) == "Replace" and norm["pattern"].get("String") == " " and norm["content"] == "▁")
    if not spaces_to_meta:
        raise _refuse(f"its normalizer is {_kind(norm)!r}, not Gemma's spaces-to-'▁' (llama.cpp's SentencePiece "
                      "tokenizer does exactly that and nothing else)")
    if pre is not None and not (_kind(pre) == "Split" and pre["pattern"].get("String") == " "
                                and pre["behavior"] == "MergedWithPrevious" and not pre.get("invert")):
        raise _refuse(f"its pre-tokenizer is {_kind(pre)!r}; llama.cpp's SentencePiece tokenizer splits nothing")
    types = []
    for i, piece in enumerate(tokens):
        if i in added:
            types.append(int(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED))
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            types.append(int(TokenType.BYTE))
        else:
            types.append(int(TokenType.NORMAL))
    if types.count(TokenType.BYTE) != 256:
        raise _refuse(f"it falls back to bytes but has {types.count(TokenType.BYTE)} of the 256 byte pieces")
    special = {"bos": tok.bos_id, "eos": tok.eos_id, "unk": tok.unk_id, "pad": tok.pad_id}
    chat = GEMMA_CHAT_TEMPLATE if None not in (tok.start_of_turn_id, tok.end_of_turn_id) else None
    return TokenizerFields("llama", "default", tokens, types, scores=[-float(i) for i in range(len(tokens))],
                           special=special, add_bos=tok.add_bos_token, chat_template=chat)


def _byte_level_fields(tok, spec: dict[str, Any], tokens: list[str], added: dict[int, dict]) -> TokenizerFields:
    from gguf import TokenType

    pre, norm, model = spec.get("pre_tokenizer"), spec.get("normalizer"), spec["model"]
    if norm is not None:
        raise _refuse(f"it normalizes text first ({_kind(norm)}), which llama.cpp's BPE does not")
    if not (_kind(pre) == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")):
        raise _refuse(f"its pre-tokenizer is {_kind(pre)!r}{'' if _kind(pre) != 'ByteLevel' else ' (with options)'},"
                      " not GPT-2's byte-level split, the one llama.cpp's 'gpt-2' pre-tokenizer reproduces")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    types = [int(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED) if i in added
             else int(TokenType.NORMAL) for i in range(len(tokens))]
    special = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
    return TokenizerFields("gpt2", "gpt-2", tokens, types, merges=merges, special=special,
                           add_bos=tok.add_bos_token)


# ------------------------------------------------------------------------------------------------ model


def check_runs_in_llama_cpp(cfg: GemmaConfig) -> None:
    """Refuse a shape llama.cpp's gemma3 would run differently from nanogemma (GGUF cannot say it)."""
    from ..gguf_files import gguf_query_pre_attn_scalar

    expected = gguf_query_pre_attn_scalar(cfg)
    if cfg.query_pre_attn_scalar != expected:
        raise NanogemmaError(
            f"this model scales attention by 1/sqrt({cfg.query_pre_attn_scalar:g}), but llama.cpp derives the "
            f"scale from the shape (1/sqrt({expected:g}) here) and GGUF cannot override it; export with --to hf")


def _pattern(cfg: GemmaConfig) -> list[bool] | None:
    """The per-layer sliding flags, or None when they are Gemma's 5:1 (llama.cpp's default)."""
    if tuple(cfg.layer_types) == layer_pattern(cfg.num_layers):
        return None
    return [t == SLIDING for t in cfg.layer_types]


def gguf_tensors(cfg: GemmaConfig, state: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in PyTorch's shape, norms already `1 + w`), in the writer's order."""
    from ..gguf_files import gguf_name_map, gguf_stores_offset

    names = gguf_name_map(cfg.num_layers)
    unknown = set(state) - set(names.values())
    if unknown:
        raise NanogemmaError(f"the model has a tensor GGUF has no name for: '{sorted(unknown)[0]}'")
    for gguf_name, ours in names.items():
        if ours not in state:
            if ours == "lm_head.weight" and cfg.tie_embeddings:
                continue
            raise NanogemmaError(f"the model has no tensor '{ours}'")
        arr = _as_float32(state[ours])
        if not np.isfinite(arr).all():
            raise NanogemmaError(f"tensor '{ours}' holds NaN or infinite values; the model is broken (a "
                                 "diverged run?), so it is not exported")
        yield gguf_name, (arr + np.float32(1.0)) if gguf_stores_offset(gguf_name) else arr


def _as_float32(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):  # a torch tensor (bfloat16 has no numpy dtype: widen it first)
        import torch

        t = t.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.ascontiguousarray(t, dtype=np.float32)


def encode_tensor(arr: np.ndarray, kind: str) -> tuple[np.ndarray, Any]:
    """(data, GGML type) of a float32 array for `--type kind`; 1-d tensors stay F32."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if arr.ndim == 1 or kind == "f32":
        return arr, Q.F32
    if kind == "q8_0" and arr.shape[-1] % _Q8_0_BLOCK == 0:
        rows = arr.reshape(-1, arr.shape[-1])
        out = np.empty((rows.shape[0], arr.shape[-1] // _Q8_0_BLOCK * 34), np.uint8)
        for start in range(0, rows.shape[0], _CHUNK_ROWS):
            out[start:start + _CHUNK_ROWS] = quantize(rows[start:start + _CHUNK_ROWS], Q.Q8_0)
        return out.reshape(*arr.shape[:-1], -1), Q.Q8_0
    if kind == "bf16":
        return quantize(arr, Q.BF16), Q.BF16
    half = arr.astype(np.float16)  # f16, and q8_0's fallback for rows that are not whole blocks
    if not np.isfinite(half).all():
        raise NanogemmaError(f"weights beyond float16's range (|w| > 65504) in a {arr.shape} tensor: "
                             "use --type bf16 or f32")
    return half, Q.F16


def _file_type(kind: str) -> int:
    from gguf import LlamaFileType as F

    return int({"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[kind])


# ------------------------------------------------------------------------------------------------ write


def _add_metadata(w, cfg: GemmaConfig, name: str, kind: str) -> None:
    from gguf import GGML_QUANT_VERSION, RopeScalingType

    w.add_type("model")
    w.add_name(name)
    w.add_file_type(_file_type(kind))
    if kind == "q8_0":
        w.add_quantization_version(GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_global_base)
    w.add_rope_freq_base_swa(cfg.rope_local_base)
    if cfg.rope_global_scale != 1.0:
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_global_scale)
    w.add_sliding_window(cfg.sliding_window)
    if (pattern := _pattern(cfg)) is not None:
        w.add_sliding_window_pattern(pattern)


def _add_tokenizer(w, t: TokenizerFields) -> None:
    w.add_tokenizer_model(t.model)
    w.add_tokenizer_pre(t.pre)
    w.add_token_list(t.tokens)
    w.add_token_types(t.types)
    if t.scores is not None:
        w.add_token_scores(t.scores)
    if t.merges is not None:
        w.add_token_merges(t.merges)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
              "pad": w.add_pad_token_id}
    for key, i in t.special.items():
        if i is not None:
            adders[key](int(i))
    w.add_add_bos_token(bool(t.add_bos))
    w.add_add_eos_token(False)
    if t.model == "llama":
        w.add_add_space_prefix(False)  # Gemma prepends no space ("Hello" and " Hello" differ)
    if t.chat_template is not None:
        w.add_chat_template(t.chat_template)


def _check_destination(out: Path, overwrite: bool) -> None:
    if out.suffix != ".gguf":
        raise NanogemmaError(f"{out}: the output file must end in .gguf")
    if not out.parent.is_dir():
        raise NanogemmaError(f"the folder {out.parent} does not exist: create it, or write the file elsewhere")
    if out.is_dir():
        raise NanogemmaError(f"{out} is a folder; give the path of the .gguf file to write")
    if out.exists() and not overwrite:
        raise NanogemmaError(f"{out} exists; pass --overwrite or choose another name")
    if not os.access(out.parent, os.W_OK):
        raise NanogemmaError(f"the folder {out.parent} is not writable")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def write_gguf(out: Path, cfg: GemmaConfig, state: dict[str, Any], tok_fields: TokenizerFields, kind: str = "f32",
               name: str = "nanogemma", overwrite: bool = False) -> Path:
    """Write `cfg` + `state` (nanogemma names, float32 or torch tensors) + the tokenizer as one GGUF file."""
    import gguf

    if kind not in GGUF_TYPES:
        raise NanogemmaError(f"unknown GGUF type {kind!r}; choose from {', '.join(GGUF_TYPES)}")
    out = Path(out)
    _check_destination(out, overwrite)
    check_runs_in_llama_cpp(cfg)
    if len(tok_fields.tokens) > cfg.vocab_size:
        raise NanogemmaError(f"the tokenizer has {len(tok_fields.tokens)} tokens but the model only "
                             f"{cfg.vocab_size} embeddings; they do not belong together")
    tok_fields.pad_to(cfg.vocab_size)

    clean_orphans(out.parent)  # what an export killed before its rename left
    tmp = temp_name(out)  # hidden, not named *.gguf, and owned by this process
    w = gguf.GGUFWriter(str(tmp), ARCH)
    _add_metadata(w, cfg, name, kind)
    _add_tokenizer(w, tok_fields)
    size = 0
    for gguf_name, arr in gguf_tensors(cfg, state):
        data, qtype = encode_tensor(arr, kind)
        w.add_tensor(gguf_name, data, raw_dtype=qtype)
        size += data.nbytes + 64
    size += sum(len(t.encode("utf-8")) + 16 for t in tok_fields.tokens + (tok_fields.merges or []))
    free = shutil.disk_usage(out.parent).free
    if free < size:
        raise NanogemmaError(f"not enough space in {out.parent}: the file needs about {_mb(size)}, "
                             f"{_mb(free)} are free; free some space or write it elsewhere")
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.flush()
        os.fsync(w.fout[0].fileno())
        w.close()
        tmp.chmod(0o644)
        os.replace(tmp, out)
    except OSError as e:
        w.close()
        tmp.unlink(missing_ok=True)
        full = {errno.ENOSPC: "the disk filled up", errno.EDQUOT: "the disk quota ran out",
                errno.EFBIG: "the file outgrew the allowed file size"}
        if e.errno is None:  # numpy's tofile reports a short write without an errno: the device took no more
            full[None] = "the write stopped short (a full disk or a file-size limit)"
        if e.errno in full:
            raise NanogemmaError(f"{full[e.errno]} while writing {out} (about {_mb(size)}); nothing was left "
                                 "behind: free some space or write it elsewhere") from None
        raise NanogemmaError(f"could not write {out}: {e.strerror or e}") from None
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def export_gguf(source: str | Path | None, out: str | Path, kind: str = "f32", overwrite: bool = False) -> Path:
    """Write the model at `source` (anything `nanogemma.load` reads) as a GGUF file; returns its path."""
    from ..tokenizer import load_tokenizer
    from ..weights import load_state

    if kind not in GGUF_TYPES:
        raise NanogemmaError(f"unknown GGUF type {kind!r}; choose from {', '.join(GGUF_TYPES)}")
    out = Path(out).expanduser()
    _check_destination(out, overwrite)  # before the (slow) load
    cfg, state, path = load_state(source)
    check_runs_in_llama_cpp(cfg)
    try:
        tok = load_tokenizer(path)
    except NanogemmaError as e:
        raise NanogemmaError(f"GGUF files carry their tokenizer, and this model's could not be read: {e}") from None
    name = path.stem if path.is_file() else path.name
    if name in ("best", "last") and (path.parent / "nanogemma.json").is_file():  # a checkpoint inside a run
        name = f"{path.parent.name}-{name}"
    return write_gguf(out, cfg, state, tokenizer_fields(tok), kind, name=name, overwrite=overwrite)
