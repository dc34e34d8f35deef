"""Draw the figures of docs/ARCHITECTURE.md from nanogemma's own code (not from hand-entered numbers).

    .venv/bin/python scripts/make_figures.py            # writes docs/figures/*.png (~1 min: loads the 270M model)

masks.png        `causal_mask` for a sliding-window and a global layer
rope.png         `rope_inv_freq` for the local and global bases: the wavelength of each rotation pair
params.png       `inspect_model.param_breakdown` of the 270M config
activations.png  one block of the real 270M model on a real prompt, observed with forward hooks
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from nanogemma.config import GLOBAL, get_preset  # noqa: E402
from nanogemma.model import causal_mask, rope_inv_freq  # noqa: E402
from nanogemma.tools.inspect_model import param_breakdown  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAVE = {"dpi": 110, "bbox_inches": "tight", "metadata": {"Software": None}}  # no version stamp: stable files


def masks(out: Path, T: int = 24, W: int = 8) -> None:
    pos = torch.arange(T)[None]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.4))
    for ax, (title, window) in zip(axes, ((f"sliding layer (window W = {W})", W), ("global layer", None)),
                                   strict=True):
        ax.imshow(causal_mask(pos, pos, window)[0, 0].numpy(), cmap="Blues", vmin=0, vmax=1.4)
        ax.set_title(title)
        ax.set_xlabel("key position j")
        ax.set_ylabel("query position i")
        ax.set_xticks(range(0, T, 4))
        ax.set_yticks(range(0, T, 4))
    q = T - 4  # outline one query's row: the keys it may attend to
    axes[0].add_patch(plt.Rectangle((q - W + 0.5, q - 0.5), W, 1, fill=False, ec="red", lw=1.5))
    axes[0].text(T - 1, 2, f"query {q} sees keys {q - W + 1}..{q}:\ni - W < j ≤ i, {W} keys", ha="right",
                 va="top", color="red", fontsize=9)
    fig.suptitle(f"Who attends to whom ({T} tokens; the 270M model uses W = 512)  —  model.causal_mask")
    fig.savefig(out / "masks.png", **SAVE)
    plt.close(fig)


def rope(out: Path) -> None:
    cfg = get_preset("gemma3-270m")
    fig, ax = plt.subplots(figsize=(8, 4.4))
    for label, base, scale, style in (("sliding layers: base 10,000", cfg.rope_local_base, 1.0, "-"),
                                      ("global layers: base 1,000,000", cfg.rope_global_base, 1.0, "-"),
                                      ("global, 4B-27B: base 1M, linear ×8", cfg.rope_global_base, 8.0, ":")):
        wavelength = 2 * math.pi / rope_inv_freq(cfg.head_dim, base, scale)
        ax.semilogy(wavelength.numpy(), style, label=label)
    for y, text in ((cfg.sliding_window, "sliding window (512)"), (cfg.max_seq_len, "270M context (32,768)")):
        ax.axhline(y, color="grey", lw=0.8, ls="--")
        ax.text(1, y * 1.25, text, color="grey", fontsize=8)
    ax.set_xlabel(f"rotation pair index k (head_dim {cfg.head_dim} → {cfg.head_dim // 2} pairs)")
    ax.set_ylabel("wavelength in tokens, 2π / θ_k")
    ax.set_title("RoPE frequency spectra  —  model.rope_inv_freq")
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(out / "rope.png", **SAVE)
    plt.close(fig)


def params(out: Path) -> None:
    cfg = get_preset("gemma3-270m")
    counts = {k: v for k, v in param_breakdown(cfg).items() if v}
    total = sum(counts.values())
    fig, ax = plt.subplots(figsize=(8, 3.2))
    names = list(counts)[::-1]
    bars = ax.barh(names, [counts[n] / 1e6 for n in names], color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][::-1])
    for bar, n in zip(bars, names, strict=True):
        ax.text(bar.get_width() + 2, bar.get_y() + bar.get_height() / 2,
                f"{counts[n] / 1e6:.2f} M ({100 * counts[n] / total:.1f}%)", va="center", fontsize=9)
    ax.set_xlim(0, max(counts.values()) / 1e6 * 1.35)
    ax.set_xlabel("parameters (millions)")
    ax.set_title(f"Gemma 3 270M: {total:,} parameters; the output head is the embedding (tied)")
    fig.savefig(out / "params.png", **SAVE)
    plt.close(fig)


def activations(out: Path, model_name: str | None, layer: int = 5) -> None:
    import nanogemma
    from nanogemma.tools.verify import DEFAULT_PROMPT

    model, tok = nanogemma.load(model_name)
    block = model.layers[layer]
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        return lambda _m, _a, y: seen.__setitem__(name, y.detach()[0])

    hooks = [block.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x (block input)", args[0][0]))]
    for name, mod in (("input_norm(x)", block.input_norm), ("attention", block.attn),
                      ("post_attn_norm", block.post_attn_norm), ("pre_ffw_norm(h)", block.pre_ffw_norm),
                      ("mlp", block.mlp), ("post_ffw_norm", block.post_ffw_norm), ("block output", block)):
        hooks.append(mod.register_forward_hook(keep(name)))
    ids = torch.tensor([tok.encode(DEFAULT_PROMPT)])
    with torch.inference_mode():
        model(ids)
    for h in hooks:
        h.remove()
    seen["h = x + post_attn_norm"] = seen["x (block input)"] + seen["post_attn_norm"]
    order = ["x (block input)", "input_norm(x)", "attention", "post_attn_norm", "h = x + post_attn_norm",
             "pre_ffw_norm(h)", "mlp", "post_ffw_norm", "block output"]

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5.0), gridspec_kw={"width_ratios": [1.2, 1]},
                               layout="constrained")
    rms = [seen[n].pow(2).mean(-1).sqrt()[1:].numpy() for n in order]  # per token, <bos> left out
    a.boxplot(rms, orientation="horizontal", tick_labels=order, showfliers=False)
    a.invert_yaxis()
    a.set_xscale("log")
    a.set_xlabel("RMS over the 640 channels, one value per token (box: quartiles)")
    a.set_title(f"layer {layer} ({block.layer_type}) step by step", fontsize=10)
    x = seen["x (block input)"][1:].abs().amax(0).numpy()
    b.plot(range(len(x)), x, lw=0.6, color="#4c72b0")  # a line, so no one-pixel spike is dropped
    b.set_yscale("log")
    b.set_xlabel("channel of the residual stream")
    b.set_ylabel("max |x| over tokens")
    top = x.argmax()
    b.set_title(f"block input: a few channels are huge (channel {top}: {x[top]:,.0f})", fontsize=10)
    kind = "global" if block.layer_type == GLOBAL else "sliding"
    fig.suptitle(f"Activation statistics of the 270M model, layer {layer} ({kind}), on a {ids.shape[1]}-token prompt:"
                 "\npre-norms bring the residual stream down to unit scale, post-norms scale each branch back up to it")
    fig.savefig(out / "activations.png", **SAVE)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "figures"), help="folder for the PNGs")
    p.add_argument("--model", default=None, help="model for the activation figure (default: the 270M GGUF)")
    p.add_argument("--layer", type=int, default=5, help="block for the activation figure (default 5, global)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    masks(out)
    rope(out)
    params(out)
    activations(out, args.model, args.layer)
    print(f"figures written to {out}")


if __name__ == "__main__":
    main()
