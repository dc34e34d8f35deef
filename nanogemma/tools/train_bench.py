"""Training speed next to transformers: the same steps, on the same weights and batches, timed side by side.

Both models start from the same random weights (ours, mapped to HF names) and run the *same* training
step (`step.train_step`: autocast, loss, backward, clip, fused AdamW, same schedule) on the same batches;
only the model and its loss differ — nanogemma's, as `nanogemma train` runs it (the output head fused
into the cross-entropy, `loss.py`; optionally compiled), or transformers' `Gemma3ForCausalLM` computing
its own loss from `labels`. Steps alternate (ours, theirs, ours, ...) so both
see the same background load, and each model's tokens/s is taken from the median step time. Because the
trajectories are the same computation, the per-step losses must agree: the largest difference is reported
and the tests hold it to a tolerance.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..config import GemmaConfig, to_hf_config
from ..train.data import WindowSampler, windows
from ..train.distributed import World
from ..train.loss import LanguageModelLoss, TrainingGemma
from ..train.monitor import peak_flops, train_flops_per_token
from ..train.schedule import WarmupCosine
from ..train.step import make_optimizer, train_step
from ..weights import hf_state_dict


@dataclass
class BenchResult:
    tokens_per_step: int
    ours_tokens_per_s: float
    hf_tokens_per_s: float | None
    ratio: float | None  # ours / transformers
    ours_losses: list[float]
    hf_losses: list[float] | None
    max_loss_diff: float | None
    ours_mfu: float | None
    threads: int
    dtype: str
    compiled: bool
    hf_attention: str | None = None  # the kernel transformers ran ("sdpa", its default); ours is attention.py

    def to_dict(self) -> dict:
        return asdict(self)


def hf_model(cfg: GemmaConfig, state: dict[str, torch.Tensor], device: torch.device):
    """transformers' Gemma3ForCausalLM with exactly these weights (float32, SDPA attention), for training."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # No padding id: transformers would zero the embedding gradient of the pad token (id 0, which is a real
    # token such as <|endoftext|> in our data), a difference in training rather than in the model.
    hf_cfg = Gemma3TextConfig(**{**to_hf_config(cfg), "pad_token_id": None})
    hf_cfg._attn_implementation = "sdpa"
    model = Gemma3ForCausalLM(hf_cfg)
    missing, unexpected = model.load_state_dict(hf_state_dict(state), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"weights do not map onto transformers: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        model.tie_weights()
    return model.to(device).train()


def hf_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """transformers' own causal-LM loss; `shift_labels` hands it targets that are already shifted."""
    y = y.contiguous()
    return model(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss


def run(cfg: GemmaConfig, tokens: np.ndarray, steps: int = 10, batch_size: int = 8, seq_len: int = 256,
        dtype: torch.dtype = torch.float32, compare: bool = True, compile: bool = False, warmup: int = 2,
        lr: float = 1e-3, seed: int = 0, device: str = "cpu") -> BenchResult:
    """Train `steps` steps (after `warmup` untimed ones) with ours and, if `compare`, with transformers."""
    dev = torch.device(device)
    world = World(device=dev)
    ours = TrainingGemma(cfg).init_weights(seed=seed).to(dev).train()
    models = {"ours": ours}
    if compare:
        models["hf"] = hf_model(cfg, {k: v.detach().clone() for k, v in ours.state_dict().items()}, dev)
    calls = {"ours": torch.compile(ours) if compile else ours, **({"hf": models["hf"]} if compare else {})}
    losses_fn = {"ours": LanguageModelLoss(ours, fused=True), "hf": hf_loss}  # ours: what `train` uses
    opts = {k: make_optimizer(m, lr, 0.1, (0.9, 0.95), 1e-8, dev) for k, m in models.items()}
    params = {k: [p for p in m.parameters() if p.requires_grad] for k, m in models.items()}
    schedule = WarmupCosine(lr, lr / 10, max(1, (warmup + steps) // 5), warmup + steps)
    sampler = WindowSampler(len(tokens), seq_len, seed)
    times: dict[str, list[float]] = {k: [] for k in models}
    losses: dict[str, list[float]] = {k: [] for k in models}
    for s in range(warmup + steps):
        batch = [windows(tokens, sampler.offsets(s, batch_size), seq_len, dev)]
        for name in models:
            t0 = time.perf_counter()
            r = train_step(calls[name], params[name], opts[name], None, batch, schedule(s), 1.0, world, dtype,
                           losses_fn[name])
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            losses[name].append(r.loss)
            if s >= warmup:
                times[name].append(dt)
    per_step = batch_size * seq_len
    tps = {k: per_step / statistics.median(v) for k, v in times.items()}
    peak = peak_flops(dev, dtype)
    mfu = tps["ours"] * train_flops_per_token(cfg, seq_len) / peak if peak else None
    diff = max(abs(a - b) for a, b in zip(losses["ours"], losses["hf"], strict=True)) if compare else None
    return BenchResult(per_step, tps["ours"], tps.get("hf"), tps["ours"] / tps["hf"] if compare else None,
                       losses["ours"], losses.get("hf"), diff, mfu, torch.get_num_threads(),
                       str(dtype).removeprefix("torch."), compile,
                       models["hf"].config._attn_implementation if compare else None)

