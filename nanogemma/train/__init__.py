"""`nanogemma train`: train Gemma 3 from scratch or continue training a model, resumably, on 1..N devices.

    from nanogemma.train import resolve, train
    cfg = resolve({"data": "data/synthetic-bpe1024", "preset": "small"})
    result = train(cfg)                      # -> runs/synthetic-bpe1024/{last,best,metrics.jsonl,...}
    model, tok = nanogemma.load(result.run_dir)

How the package is cut:

* `config`     — the settings (one dataclass), presets, TOML files and `--key=value` overrides
* `schedule`   — linear warmup then cosine decay, in optimizer steps
* `data`       — random training windows from the memory-mapped tokens; fixed validation windows
* `step`       — one optimizer step (autocast, accumulation, unscale, clip, AdamW) and one evaluation
* `loss`       — the output head fused into the cross-entropy (no N × vocabulary logits), `TrainingGemma`
* `loop`       — the run, for both backends: setup, the loop, evaluation, checkpoints, Ctrl-C and NaN
                 handling (`Loop`), and its PyTorch backend (`Run`); `jax/loop.py` is the JAX backend
* `build`      — the model (fresh, fine-tuned or resumed), precision and pre-flight checks
* `checkpoint` — the run folder layout and atomic checkpoint writes
* `distributed`— DDP / FSDP2 under torchrun
* `monitor`    — progress bar, metrics.jsonl, TensorBoard, MFU
* `tokenizer_files` — the data's tokenizer in Hugging Face format, so a run folder loads as a model
* `cli`        — the flags of `nanogemma train`, generated from `TrainConfig`
"""

from .config import PRESETS_TRAIN, TrainConfig, resolve

__all__ = ["PRESETS_TRAIN", "TrainConfig", "TrainResult", "resolve", "train"]


def __getattr__(name: str):
    # The loop pulls in torch.distributed (slow to import): loaded on first use, so `nanogemma --help` stays quick.
    if name in ("train", "TrainResult"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
