"""The Gemma 3 text-model configuration: one dataclass, named presets, and the mapping from HF `config.json`.

Every size of Gemma 3 uses the same block; the presets differ only in widths, depths, head counts, the
sliding window, `query_pre_attn_scalar` and whether global layers stretch RoPE (linear scaling, factor 8).
Layer types are explicit, one entry per layer, because everything downstream (masks, RoPE bases, KV-cache
layout) keys off them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLIDING = "sliding"
GLOBAL = "global"


def layer_pattern(num_layers: int, every: int = 6) -> tuple[str, ...]:
    """Gemma 3's interleaving: `every - 1` sliding-window layers, then one global layer, repeated."""
    return tuple(GLOBAL if (i + 1) % every == 0 else SLIDING for i in range(num_layers))


@dataclass
class GemmaConfig:
    vocab_size: int = 262_144
    hidden_size: int = 640
    intermediate_size: int = 2048
    num_layers: int = 18
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 256
    max_seq_len: int = 32_768
    norm_eps: float = 1e-6
    sliding_window: int = 512
    layer_types: tuple[str, ...] = field(default_factory=tuple)  # empty: derived from the 5:1 pattern
    rope_local_base: float = 10_000.0
    rope_global_base: float = 1_000_000.0
    rope_global_scale: float = 1.0  # linear RoPE scaling on global layers (8.0 for 4B/12B/27B)
    query_pre_attn_scalar: float = 256.0  # attention scores are scaled by its inverse square root
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        self._check_values()
        if not self.layer_types:
            self.layer_types = layer_pattern(self.num_layers)
        self.layer_types = tuple(self.layer_types)
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        bad = set(self.layer_types) - {SLIDING, GLOBAL}
        if bad:
            raise ValueError(f"unknown layer type(s) {sorted(bad)}; expected '{SLIDING}' or '{GLOBAL}'")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    def _check_values(self) -> None:
        """Types and ranges, so that a crafted config fails here, in one line, not in the model's arithmetic."""
        import math

        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", int):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ValueError(f"{f.name} must be a whole number, got {v!r}")
                if v < 1:
                    raise ValueError(f"{f.name} must be at least 1, got {v}")
            elif f.type in ("float", float):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"{f.name} must be a finite number, got {v!r}")
                if v <= 0:
                    raise ValueError(f"{f.name} must be positive, got {v}")
            elif f.type in ("bool", bool) and not isinstance(v, bool):
                raise ValueError(f"{f.name} must be true or false, got {v!r}")
        if not isinstance(self.layer_types, (list, tuple)):
            raise ValueError(f"layer_types must be a list, got {self.layer_types!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GemmaConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a model config is an object of settings, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def replace(self, **changes: Any) -> GemmaConfig:
        if "num_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = ()
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        """Parameter count implied by the config (the tied head counted once)."""
        d, h = self.hidden_size, self.head_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads) + 2 * h
        mlp = 3 * d * self.intermediate_size
        block = attn + mlp + 4 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * block + d + head


# Text-model presets. Values from the published `config.json` of each checkpoint (google/gemma-3-*).
PRESETS: dict[str, GemmaConfig] = {
    "gemma3-270m": GemmaConfig(),
    "gemma3-1b": GemmaConfig(
        hidden_size=1152, intermediate_size=6912, num_layers=26, num_heads=4, num_kv_heads=1,
        head_dim=256, sliding_window=512, max_seq_len=32_768,
    ),
    "gemma3-4b": GemmaConfig(
        vocab_size=262_208, hidden_size=2560, intermediate_size=10_240, num_layers=34, num_heads=8,
        num_kv_heads=4, head_dim=256, sliding_window=1024, max_seq_len=131_072, rope_global_scale=8.0,
    ),
    "gemma3-12b": GemmaConfig(
        vocab_size=262_208, hidden_size=3840, intermediate_size=15_360, num_layers=48, num_heads=16,
        num_kv_heads=8, head_dim=256, sliding_window=1024, max_seq_len=131_072, rope_global_scale=8.0,
    ),
    "gemma3-27b": GemmaConfig(
        vocab_size=262_208, hidden_size=5376, intermediate_size=21_504, num_layers=62, num_heads=32,
        num_kv_heads=16, head_dim=128, sliding_window=1024, max_seq_len=131_072, rope_global_scale=8.0,
        query_pre_attn_scalar=168.0,
    ),
    # A few-second model for tests: every mechanism present (GQA, both layer types, a short window).
    "tiny": GemmaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=6, num_heads=4, num_kv_heads=2,
        head_dim=16, sliding_window=8, max_seq_len=256, query_pre_attn_scalar=16.0,
    ),
}


def get_preset(name: str) -> GemmaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; choose from: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def _rope_scale(rope: dict[str, Any] | None) -> float:
    if not rope:
        return 1.0
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return 1.0
    if kind != "linear":
        raise ValueError(f"unsupported RoPE scaling '{kind}' (nanogemma implements 'linear', as Gemma 3 uses)")
    return float(rope["factor"])


def from_hf_config(hf: dict[str, Any]) -> GemmaConfig:
    """Map a Hugging Face Gemma 3 `config.json` (text-only, or multimodal with `text_config`) onto GemmaConfig."""
    if not isinstance(hf, dict):
        raise ValueError(f"config.json holds {type(hf).__name__}, not an object")
    if hf.get("model_type") == "gemma3" or "text_config" in hf:
        hf = hf.get("text_config") or {}
        if not isinstance(hf, dict):
            raise ValueError("config.json's text_config is not an object")
    mt = hf.get("model_type", "gemma3_text")
    if mt not in ("gemma3_text", "gemma3"):
        raise ValueError(f"config.json describes a '{mt}' model; nanogemma loads Gemma 3 (gemma3_text)")
    if hf.get("final_logit_softcapping") or hf.get("attn_logit_softcapping"):
        raise ValueError("config.json asks for logit soft-capping, which Gemma 3 does not use")
    n = hf.get("num_hidden_layers", 26)
    types = hf.get("layer_types")
    if types:
        layer_types = tuple(GLOBAL if t == "full_attention" else SLIDING for t in types)
    else:
        layer_types = layer_pattern(n, hf.get("sliding_window_pattern", 6))
    # Two spellings exist: transformers 4.x (rope_theta, rope_local_base_freq, rope_scaling) and
    # 5.x (rope_parameters keyed by layer type).
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params:
        glob, loc = params["full_attention"], params.get("sliding_attention", {})
        g_base = glob.get("rope_theta", 1_000_000.0)
        l_base = loc.get("rope_theta", 10_000.0)
        g_scale = _rope_scale(glob)
    else:
        g_base = hf.get("rope_theta", 1_000_000.0)
        l_base = hf.get("rope_local_base_freq", 10_000.0)
        g_scale = _rope_scale(hf.get("rope_scaling"))
    head_dim = hf.get("head_dim", 256)
    return GemmaConfig(
        vocab_size=hf.get("vocab_size", 262_208),
        hidden_size=hf.get("hidden_size", 2304),
        intermediate_size=hf.get("intermediate_size", 9216),
        num_layers=n,
        num_heads=hf.get("num_attention_heads", 8),
        num_kv_heads=hf.get("num_key_value_heads", 4),
        head_dim=head_dim,
        max_seq_len=hf.get("max_position_embeddings", 131_072),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        sliding_window=hf.get("sliding_window", 4096),
        layer_types=layer_types,
        rope_local_base=float(l_base),
        rope_global_base=float(g_base),
        rope_global_scale=g_scale,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", head_dim)),
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def to_hf_config(cfg: GemmaConfig) -> dict[str, Any]:
    """The inverse of `from_hf_config`: a `config.json` that transformers' Gemma3ForCausalLM accepts."""
    scaling = None if cfg.rope_global_scale == 1.0 else {"rope_type": "linear", "factor": cfg.rope_global_scale}
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "sliding_window": cfg.sliding_window,
        "layer_types": ["full_attention" if t == GLOBAL else "sliding_attention" for t in cfg.layer_types],
        "rope_theta": cfg.rope_global_base,
        "rope_local_base_freq": cfg.rope_local_base,
        "rope_scaling": scaling,
        "query_pre_attn_scalar": int(q) if (q := cfg.query_pre_attn_scalar).is_integer() else q,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": cfg.tie_embeddings,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "attention_bias": False,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "torch_dtype": "float32",
    }


def load_hf_config(path: str | Path) -> GemmaConfig:
    with open(path, encoding="utf-8") as f:
        return from_hf_config(json.load(f))
