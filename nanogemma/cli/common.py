"""Flags that commands of more than one group declare alike: which model, on which device, with which adapter."""

from __future__ import annotations

import argparse

from ..flags import device


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a preset name (gemma3-270m, the default), a Hugging Face repository id "
                        "(google/gemma-3-270m-it: downloaded once into the hub cache), a .gguf file, a Hugging "
                        "Face folder (config.json + safetensors + tokenizer) or a nanogemma run folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and activations dtype (float16 overflows in Gemma 3; not offered)")
    p.add_argument("--device", default="cpu", type=device, help="cpu, cuda or cuda:N")


def add_adapter_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter merged into the model after loading: a peft folder (adapter_config.json "
                        "+ adapter_model.safetensors) or a run of `nanogemma train --lora-rank N`")
