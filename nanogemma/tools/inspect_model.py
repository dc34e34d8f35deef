"""What a Gemma 3 configuration costs: parameters, KV-cache memory and FLOPs, computed from the config alone.

Everything here is arithmetic on `GemmaConfig`, so it works for checkpoints too large to load (pass a
preset name) and for real checkpoints alike. The counts follow the code, not a formula remembered from a
paper: parameters are summed over the tensors of a model built on the meta device (no memory allocated),
grouped by what they do.

* **Parameters.** In the 270M model the embedding alone is ~63% of the weights (a 262,144-word vocabulary
  × 640 dims), and it doubles as the output head (tied), so it is stored once but used twice.
* **KV cache.** Each layer keeps a key and a value vector per KV head per token: 2 × kv_heads × head_dim
  numbers. Sliding-window layers never look further back than the window, so a cache need keep only the
  last W tokens for them; global layers keep every token. With five sliding layers per global one, long
  contexts cost ~1/6 of what full attention everywhere would.
* **FLOPs** (2 per multiply-add) per token: the weight matrix products (2 × their parameters), attention's
  two products with the cached keys and values (4 × heads × head_dim per attended key), and the output
  head (2 × vocab × hidden). Prefill averages attention over the prompt's positions; decode pays it for a
  query that sees the whole context (or the window).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import GLOBAL, SLIDING, GemmaConfig

COMPONENTS = ("embedding", "attention", "MLP", "norms", "output head")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def format_table(headers: list[str], rows: list[list[Any]], right: set[int] | None = None) -> str:
    """A plain-text table; columns listed in `right` (by index) are right-aligned, the others left."""
    right = set(range(1, len(headers))) if right is None else right
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        return "  ".join(padded).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23 M'; bytes use the same decimal prefixes (MB = 10^6 bytes)."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:g} {unit}".rstrip()


def component_of(name: str) -> str:
    """Which part of the model a parameter (nanogemma name) belongs to."""
    if name.startswith("embed."):
        return "embedding"
    if name.startswith("lm_head."):
        return "output head"
    if "norm" in name:  # the four sandwich norms, QK-norm and the final norm
        return "norms"
    if ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "MLP"
    raise ValueError(f"unclassified parameter '{name}'")


def param_breakdown(cfg: GemmaConfig, state: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Parameters per component, from `state` if given (a real checkpoint) or from the config."""
    if state is None:
        from ..model import Gemma

        with torch.device("meta"):  # shapes only: a 27B model costs nothing to build here
            state = dict(Gemma(cfg).named_parameters())
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, t in state.items():
        counts[component_of(name)] += t.numel()
    return counts


def _describe_params(cfg: GemmaConfig) -> dict[str, str]:
    d, h, n = cfg.hidden_size, cfg.head_dim, cfg.num_layers
    q, kv = cfg.num_heads * h, cfg.num_kv_heads * h
    return {
        "embedding": f"{cfg.vocab_size:,} × {d}" + (" (also the output head: tied)" if cfg.tie_embeddings else ""),
        "attention": f"{n} × (q {d}×{q} + k {d}×{kv} + v {d}×{kv} + o {q}×{d})",
        "MLP": f"{n} × 3 × {d}×{cfg.intermediate_size} (gate, up, down)",
        "norms": f"{n} × (4 × {d} + q/k-norm 2 × {h}) + final {d}",
        "output head": "tied to the embedding: no extra weights" if cfg.tie_embeddings
        else f"{cfg.vocab_size:,} × {d}",
    }


def kv_bytes_per_token(cfg: GemmaConfig, dtype_bytes: int = 4) -> int:
    """One layer's cache for one token: a key and a value vector for each KV head."""
    return 2 * cfg.num_kv_heads * cfg.head_dim * dtype_bytes


@dataclass
class KVCacheCost:
    layer_type: str
    layers: int
    bytes_per_token_per_layer: int
    tokens_kept: int  # at the chosen context
    total_bytes: int


def kv_cache(cfg: GemmaConfig, context: int, dtype_bytes: int = 4) -> list[KVCacheCost]:
    """Cache size by layer type at `context` tokens, for a cache that keeps only the window on sliding layers."""
    per = kv_bytes_per_token(cfg, dtype_bytes)
    out = []
    for kind in (SLIDING, GLOBAL):
        n = cfg.layer_types.count(kind)
        if n:
            kept = min(context, cfg.sliding_window) if kind == SLIDING else context
            out.append(KVCacheCost(kind, n, per, kept, n * per * kept))
    return out


def _mean_keys(cfg: GemmaConfig, kind: str, context: int, decode: bool) -> float:
    """Keys a query attends to: at position `context` (decode), or averaged over positions 1..context."""
    cap = cfg.sliding_window if kind == SLIDING else context
    if decode:
        return float(min(context, cap))
    # Query i (1-based) sees min(i, cap) keys: a triangle up to the cap, then a flat run.
    ramp = min(context, cap)
    return (ramp * (ramp + 1) / 2 + (context - ramp) * cap) / context


def flops_per_token(cfg: GemmaConfig, context: int) -> dict[str, dict[str, float]]:
    """FLOPs (2 per multiply-add) for one token, split by where they go, for prefill and for decode."""
    d, h = cfg.hidden_size, cfg.head_dim
    proj = d * h * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * cfg.intermediate_size
    result = {}
    for phase, decode in (("prefill", False), ("decode", True)):
        attn = sum(4 * cfg.num_heads * h * _mean_keys(cfg, t, context, decode) for t in cfg.layer_types)
        parts = {"block matmuls": 2.0 * proj * cfg.num_layers, "attention (q·k, p·v)": attn,
                 "output head": 2.0 * cfg.vocab_size * d}
        parts["total"] = sum(parts.values())
        result[phase] = parts
    return result


def _number(v: Any) -> str:
    """10000.0 -> '10,000'; 1e-06 stays '1e-06' (GGUF's float32 epsilon prints as 1e-06, not 9.99999997e-07)."""
    if isinstance(v, float):
        return f"{int(v):,}" if v.is_integer() else f"{v:.6g}"
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def _layer_pattern(cfg: GemmaConfig) -> str:
    g = [i for i, t in enumerate(cfg.layer_types) if t == GLOBAL]
    return f"{cfg.layer_types.count(SLIDING)} sliding, {len(g)} global (global: {', '.join(map(str, g)) or 'none'})"


def report(cfg: GemmaConfig, state: dict[str, torch.Tensor] | None = None, context: int | None = None,
           dtype: str = "float32") -> dict[str, Any]:
    """Everything `nanogemma inspect` prints, as plain data (also its --json output)."""
    context = cfg.max_seq_len if context is None else context
    params = param_breakdown(cfg, state)
    total = sum(params.values())
    b = DTYPE_BYTES[dtype]
    kv = kv_cache(cfg, context, b)
    return {
        "config": cfg.to_dict(),
        "params": params,
        "params_total": total,
        "params_non_embedding": total - params["embedding"] - params["output head"],
        "tied_embeddings": cfg.tie_embeddings,
        "weight_bytes": total * b,
        "dtype": dtype,
        "context": context,
        "kv_cache": [vars(c) for c in kv],
        "kv_bytes_total": sum(c.total_bytes for c in kv),
        "kv_bytes_if_all_global": cfg.num_layers * kv_bytes_per_token(cfg, b) * context,
        "flops_per_token": flops_per_token(cfg, context),
    }


def render(r: dict[str, Any], title: str = "") -> str:
    """The human-readable form of `report`'s output."""
    cfg = GemmaConfig.from_dict({**r["config"], "layer_types": tuple(r["config"]["layer_types"])})
    out = [f"Model: {title}", ""] if title else []
    rows = [[k, _number(v)] for k, v in r["config"].items() if k != "layer_types"]
    rows.insert(4, ["layer_types", _layer_pattern(cfg)])
    out += ["Config", format_table(["field", "value"], rows, right=set()), ""]

    total, desc = r["params_total"], _describe_params(cfg)
    rows = [[c, f"{n:,}", f"{100 * n / total:.1f}%", desc[c]] for c, n in r["params"].items()]
    rows.append(["total", f"{total:,}", "100.0%", f"non-embedding {r['params_non_embedding']:,}; "
                 f"{human(r['weight_bytes'], 'B')} in {r['dtype']}"])
    out += ["Parameters", format_table(["component", "parameters", "share", "shapes"], rows, right={1, 2}), ""]

    ctx = r["context"]
    rows = [[c["layer_type"], c["layers"], f"{c['bytes_per_token_per_layer']:,}",
             f"{c['tokens_kept']:,}" + (" (window)" if c["layer_type"] == SLIDING and c["tokens_kept"] < ctx else ""),
             human(c["total_bytes"], "B")] for c in r["kv_cache"]]
    per_token = sum(c["layers"] * c["bytes_per_token_per_layer"] for c in r["kv_cache"])
    rows.append(["total", cfg.num_layers, f"{per_token:,} per token", "", human(r["kv_bytes_total"], "B")])
    out += [f"KV cache ({r['dtype']}) at a context of {ctx:,} tokens",
            format_table(["layer type", "layers", "bytes/token/layer", "tokens kept", "bytes"], rows),
            f"(every layer keeping every token would take {human(r['kv_bytes_if_all_global'], 'B')})", ""]

    f = r["flops_per_token"]
    rows = [[k, human(f["prefill"][k]), human(f["decode"][k])] for k in f["prefill"]]
    out += [f"FLOPs per token (2 per multiply-add), context {ctx:,}",
            format_table(["", f"prefill (mean over {ctx:,})", f"decode (token {ctx:,})"], rows),
            "(generation's prefill needs the output head for the last position only;",
            " training costs ≈ 3 × prefill: the forward pass plus a backward pass twice as costly)"]
    return "\n".join(out)


def load_for_inspect(name_or_path: str | None) -> tuple[GemmaConfig, dict[str, torch.Tensor] | None, str]:
    """A preset name gives its config without weights; anything else is loaded (weights memory-mapped)."""
    from ..config import PRESETS
    from ..weight_files import DEFAULT_MODEL
    from ..weights import load_state

    if name_or_path is not None and name_or_path in PRESETS and name_or_path != DEFAULT_MODEL:
        return PRESETS[name_or_path].replace(), None, f"preset {name_or_path} (config only, no weights)"
    cfg, state, path = load_state(name_or_path)
    return cfg, state, str(path)
