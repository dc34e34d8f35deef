"""The command tools: what `nanogemma bench / eval / inspect / verify / plot / export` run, beside the library.

Each module is one command's work, written over the library (model, cache, generation, weights), which
never imports from here. Read them in any order:

* `bench`         — prefill / decode tokens/s, time to first token and memory per mode, each in a fresh process
* `train_bench`   — training tokens/s and loss next to transformers' Gemma3ForCausalLM on the same steps
* `evaluate`      — loss, perplexity and next-token accuracy on prepared data or text files
* `judge`         — story quality scored by a language model behind an OpenAI-compatible endpoint
* `inspect_model` — config, parameters per component, KV-cache bytes and FLOPs per token
* `verify`        — nanogemma against transformers, block by block, on one checkpoint
* `plot`          — a training run's curves as a PNG
* `export`        — a model as a Hugging Face Gemma 3 checkpoint
"""
