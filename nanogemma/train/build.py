"""Everything a run needs before its first step: the model (fresh, fine-tuned or resumed), its precision,
the optimizer, and the checks that turn a doomed run into a one-line error before any time is spent."""

from __future__ import annotations

import random
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import GemmaConfig
from ..errors import NanogemmaError
from ..model import Gemma
from ..weights import build_model, load_state
from . import checkpoint as ckpt
from .config import SCRATCH, TrainConfig, lora_config, model_config
from .data import Dataset
from .loss import TrainingGemma

GEMMA_VOCAB = 262_144
SHAPE_SETTINGS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "sliding_window", "tie_embeddings")


def warn(message: str) -> None:
    print(f"nanogemma: warning: {message}", file=sys.stderr)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32  # CPUs: bfloat16 autocast is usually slower than float32 there
    return getattr(torch, name)


def check_run_dir(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run), refusing to mix two runs in one folder."""
    if resume:
        found = ckpt.find_checkpoint(run_dir, "last")
        if found is None:
            if (run_dir / ckpt.SETTINGS).is_file():
                raise NanogemmaError(f"{run_dir} holds a run that stopped before its first checkpoint: nothing "
                                     "to resume; run the same command without --resume to start it again")
            raise NanogemmaError(f"{run_dir} has no checkpoint to resume from (no last/trainer.pt); "
                                 "start a new run without --resume")
        return found
    if ckpt.find_checkpoint(run_dir, "last") is not None:
        raise NanogemmaError(f"{run_dir} already holds a training run: pass --resume to continue it, or "
                             "choose another --out-dir")
    if (run_dir / ckpt.SETTINGS).is_file():  # no checkpoint was written: nothing is lost by starting over
        warn(f"{run_dir} holds a run that stopped before its first checkpoint: starting it again from step 0")
    return None


def initial_model(cfg: TrainConfig, data: Dataset, resume_from: Path | None
                  ) -> tuple[GemmaConfig, dict[str, torch.Tensor] | None, str]:
    """(model config, weights or None for random init, where they come from)."""
    if resume_from is not None:
        meta = ckpt.read_model_meta(resume_from)
        if meta.get("lora"):  # adapters only: the base comes from where the run started (--init-from)
            from safetensors.torch import load_file

            from ..weights import lora_base_state

            state = {**lora_base_state(meta["lora"], resume_from), **load_file(str(resume_from / ckpt.WEIGHTS))}
            return GemmaConfig.from_dict(meta["model"]), state, str(resume_from)
        state = load_state(resume_from)[1]
        return GemmaConfig.from_dict(meta["model"]), state, str(resume_from)
    if cfg.init_from == SCRATCH:
        return model_config(cfg, data.vocab_size), None, "random"
    given = [k for k in SHAPE_SETTINGS if getattr(cfg, k) is not None]
    if given:
        warn(f"init_from={cfg.init_from} brings its own shape: ignoring {', '.join(given)}")
    mcfg, state, path = load_state(cfg.init_from)
    if data.vocab_size > mcfg.vocab_size:
        raise NanogemmaError(f"{data.folder} has {data.vocab_size:,} token ids but {cfg.init_from} knows "
                             f"{mcfg.vocab_size:,}: prepare the data with the model's tokenizer "
                             "(nanogemma prepare --tokenizer gemma)")
    if mcfg.vocab_size >= GEMMA_VOCAB and data.spec != "gemma":
        raise NanogemmaError(f"{cfg.init_from} reads Gemma token ids, but {data.folder} was prepared with the "
                             f"{data.spec} tokenizer: prepare it again with --tokenizer gemma")
    if cfg.seq_len > mcfg.max_seq_len:
        raise NanogemmaError(f"seq_len {cfg.seq_len} is beyond {cfg.init_from}'s context of {mcfg.max_seq_len}")
    return mcfg, state, str(path)


def make_model(mcfg: GemmaConfig, state: dict[str, torch.Tensor] | None, cfg: TrainConfig,
               device: torch.device) -> TrainingGemma:
    """A float32 model on `device` in training mode: random (seeded) or holding `state`; with LoRA, frozen
    and given adapters (fresh, or those in `state` when resuming); with `activation_checkpointing`, its
    blocks recompute their activations in backward (`checkpoint_blocks`)."""
    lcfg = lora_config(cfg)
    if lcfg is not None:
        from ..lora import apply_lora, is_adapter_key, load_adapter_state

        adapters = {k: state.pop(k) for k in [k for k in state if is_adapter_key(k)]}
        model = make_model(mcfg, state, cfg.replace(lora_rank=0), device)
        apply_lora(model, lcfg, seed=cfg.seed)
        if lcfg.base_dtype != "float32":
            # The loaded weights may be views of one memory-mapped file, which stays mapped (its pages resident,
            # the float32 projections' among them) while any view lives: own copies of what is left of it.
            with torch.no_grad():
                for p in model.parameters():
                    if p.dtype == torch.float32 and not p.requires_grad:
                        p.data = p.data.clone()
        if adapters:
            load_adapter_state(model, adapters, "the checkpoint")
        return model.train()
    if state is None:
        model = TrainingGemma(mcfg).init_weights(std=cfg.init_std, seed=cfg.seed).to(device)
    else:  # build_model checks every tensor's name and shape, with messages that name the culprit
        model = TrainingGemma.from_model(build_model(mcfg, state, dtype=torch.float32, device=device,
                                                     source="initial weights"))
    if not cfg.train_embeddings:
        model.embed.weight.requires_grad_(False)  # the tied head with it
    if cfg.activation_checkpointing:  # LoRA runs come through here too: the adapters are swapped in later,
        checkpoint_blocks(model)      # inside the blocks, and the checkpointed forward finds them there
    return model.train()


def checkpoint_blocks(model: Gemma) -> Gemma:
    """Make every transformer block recompute its activations in backward (activation checkpointing).

    Without it, autograd keeps every intermediate of every block (projections, attention output, the MLP's
    wide gate and up products, norms) from forward until backward; with it, a block's forward under grad
    keeps only its inputs, and backward runs the block's forward once more to get the intermediates back,
    one block at a time. Memory for activations drops from all of them to one block's, plus the inputs.

    Applied from outside the model, so model.py keeps one code path: each block's `forward` is replaced,
    on the instance, by one that runs the block's own forward under `torch.utils.checkpoint`. No module is
    added or renamed, so the state_dict keys (checkpoints, exports) are the model's own. FSDP2's hooks sit
    on the block's `__call__`, outside this forward, so they gather the weights before the recomputation
    as they do before the backward. The non-reentrant checkpoint restores the random generators' state and
    the autocast state for the recomputation, so a dropout (LoRA's) draws the same mask and the matmuls
    run in the same precision: the recomputed values are the ones forward computed. Calls without grad
    (evaluation, sampling) or with a KV cache run the block directly.
    """
    for block in model.layers:
        if getattr(block.forward, "__func__", None) is not _recomputing_forward:  # once is enough
            # bound to the block itself (not a closure over it), so a deepcopy of the model recomputes its own
            block.forward = types.MethodType(_recomputing_forward, block)
    return model


def _recomputing_forward(block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Any,
                         pos: torch.Tensor, cache: Any = None) -> torch.Tensor:
    """A block's forward that keeps only its inputs for backward (see `checkpoint_blocks`)."""
    forward = type(block).forward  # the class's own (the instance's is this one)
    if cache is not None or not torch.is_grad_enabled():
        return forward(block, x, cos, sin, mask, pos, cache)
    return checkpoint(forward, block, x, cos, sin, mask, pos, use_reentrant=False)


def rng_state() -> dict[str, Any]:
    """The global generators: not used by our own sampling (which is keyed by step), but by anything
    else that draws random numbers (a user's loss function, dropout in a modified model)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
