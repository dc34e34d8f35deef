"""LoRA (nanogemma/lora.py): the module swap, merge and strip, training adapters only with exact resume, and
peft adapter folders both ways, on a tiny model; then the real 270M model against transformers + peft, and
float16 (its inference refused, its autocast training working) on it.

Bounds. Where a path is the same arithmetic by construction (fresh adapters add an exact zero; strip puts the
very modules back; a resumed run redoes the same operations) results are compared bit for bit. Merged
against unmerged is bounded by the float64 reference of the same adapted model: both float32 forms must lie
within `reference.float32_floor` of it (64 float32 steps at the largest logit). Against transformers + peft,
tiny random models must agree to 1e-4 (their logits are ~1: float32 noise is ~1e-6) and the real model to
1e-3, the bound of test_parity.py for the same weights without adapters.
"""

from __future__ import annotations

import copy
import json
import os
import signal

import pytest
import torch
from reference import float32_floor
from safetensors.torch import load_file, save_file

import nanogemma
from nanogemma import cli, lora
from nanogemma.config import get_preset, to_hf_config
from nanogemma.data import prepare
from nanogemma.errors import NanogemmaError
from nanogemma.model import Gemma
from nanogemma.train import resolve, train
from nanogemma.train.loss import LanguageModelLoss
from nanogemma.weights import build_model, hf_state_dict, load_state

FAST = {"preset": "tiny", "progress": False, "tensorboard": False, "sample_tokens": 0, "log_every": 1}
VOCAB = 320


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for tiny models


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.getbasetemp() / "train-synthetic-bpe320"  # shared with test_train_loop.py
    prepare("synthetic:400", folder, tokenizer="bpe:320", workers=1, progress=False)
    return folder


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    """A random tiny Gemma with the data's vocabulary and tokenizer, as a Hugging Face folder: the model LoRA
    adapts."""
    from nanogemma.train import tokenizer_files
    from nanogemma.train.data import open_dataset

    cfg = get_preset("tiny").replace(vocab_size=VOCAB)
    m = Gemma(cfg).init_weights(seed=0)
    folder = tmp_path_factory.mktemp("lora-base")
    tokenizer_files.write(folder, open_dataset(data, 64).tokenizer)
    (folder / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    save_file({k: v.contiguous() for k, v in hf_state_dict(m.state_dict()).items()}, str(folder / "model.safetensors"))
    return folder


def adapted(seed: int = 0, **settings) -> Gemma:
    """The tiny base (randomised norms too) with adapters whose B is random: a correction that matters."""
    from helpers import tiny_model

    model = lora.apply_lora(tiny_model(), lora.LoRAConfig(**{"rank": 4, **settings}), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for k, p in lora.adapter_state(model).items():
            if k.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_fresh_adapters_change_nothing_and_strip_restores_the_model():
    from helpers import tiny_model

    model = tiny_model()
    before = model(IDS)
    lora.apply_lora(model, lora.LoRAConfig(rank=4))
    assert torch.equal(model(IDS), before)  # B = 0: base + an exact zero
    for p in lora.adapter_state(model).values():
        p.add_(0.1)
    assert not torch.equal(model(IDS), before)
    lora.strip_lora(model)
    assert torch.equal(model(IDS), before)
    assert not any(isinstance(m, (lora.LoRALinear, lora.FrozenLinear)) for m in model.modules())


@torch.no_grad()
@pytest.mark.parametrize("base_dtype", lora.BASE_DTYPES)
def test_merge_equals_unmerged_within_float32_rounding(base_dtype):
    model = adapted(base_dtype=base_dtype, targets=("q", "v", "o", "up", "down"))
    unmerged = model(IDS).double()
    exact = copy.deepcopy(model).double()(IDS)  # the same adapted model in float64 (int8 rows stay int8)
    merged = lora.merge_lora(copy.deepcopy(model))
    assert all(type(m) is torch.nn.Linear for b in merged.layers for m in (b.attn.wq, b.mlp.gate))
    got = merged(IDS).double()
    floor = float32_floor(exact)
    err_merged, err_unmerged = (got - exact).abs().max().item(), (unmerged - exact).abs().max().item()
    print(f"\n[lora merge {base_dtype}] from float64: merged {err_merged:.2g}, unmerged {err_unmerged:.2g}, "
          f"bound {floor:.2g}")
    assert err_merged <= floor and err_unmerged <= floor
    stripped = lora.strip_lora(copy.deepcopy(model))(IDS).double()
    assert (stripped - exact).abs().max() > 100 * floor  # the adapters do change the logits


def test_only_adapters_get_gradients_and_int8_backward_is_exact():
    for base_dtype in lora.BASE_DTYPES:
        model = adapted(base_dtype=base_dtype, dropout=0.1).train()
        model(IDS).logsumexp(-1).mean().backward()
        for name, p in model.named_parameters():
            if lora.is_adapter_key(name):
                assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
            else:
                assert not p.requires_grad and p.grad is None, name
        assert model.layers[1].mlp.gate.base.weight.dtype == {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                                              "int8": torch.int8}[base_dtype]
    # The frozen product's hand-written backward against autograd's numerical derivative, in float64.
    frozen = lora.FrozenLinear(torch.randn(5, 7, dtype=torch.float64), "int8")
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: lora._FrozenMatmul.apply(t, frozen.weight, frozen.scale.double()), (x,))


def loss_that_interrupts(at: int | None):
    """The default (fused) training loss, sending SIGINT (as Ctrl-C would) during micro-batch `at`."""
    calls = {"n": 0}

    def loss_fn(model, x, y):
        calls["n"] += 1
        if calls["n"] == at:
            os.kill(os.getpid(), signal.SIGINT)
        return LanguageModelLoss(model, fused=True)(model, x, y)

    return loss_fn


LORA = {"init_from": None, "lora_rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.1, "lora_targets": "q,k,v,o,down",
        "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "max_steps": 8, "eval_every": 4, "batch_size": 4}


def test_adapters_save_only_their_rank_wide_products_for_backward(monkeypatch):
    """What autograd keeps from forward, beyond the parameters, against fine-tuning the same projections:
    without dropout, the adapters take the projections' own inputs (saved once, for all the adapters on
    one input: q, k and v share it), so they add only their r-wide A x. With dropout, each adapter keeps
    its dropped copy of the input and a one-byte mask: 3 bytes a value less than torch's dropout, whose
    CPU backward keeps a float noise tensor instead."""
    from helpers import tiny_model

    def saved_bytes(model, dtype=None):
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params and dtype in (None, t.dtype):
                seen[(s.data_ptr(), t.dtype)] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(IDS).logsumexp(-1).mean().backward()
        return sum(seen.values())

    def fine_tuned(targets):  # these projections trained, the rest frozen as LoRA freezes it (norm weights
        model = tiny_model().train()  # that train would make the norms keep more)
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(tuple(".".join(lora.TARGETS[t]) + ".weight" for t in targets)))
        return model

    tokens, rank, cfg = IDS.numel(), 4, tiny_model().config
    inputs = {"q": cfg.hidden_size, "k": cfg.hidden_size, "v": cfg.hidden_size, "o": cfg.num_heads * cfg.head_dim,
              "gate": cfg.hidden_size, "up": cfg.hidden_size, "down": cfg.intermediate_size}
    for targets in (tuple(lora.TARGETS), ("q", "v", "down")):
        plain = saved_bytes(fine_tuned(targets))
        kept = saved_bytes(lora.apply_lora(tiny_model(), lora.LoRAConfig(rank=rank, targets=targets)).train())
        assert kept - plain == cfg.num_layers * len(targets) * tokens * rank * 4, (targets, kept, plain)
        with_dropout = lora.LoRAConfig(rank=rank, targets=targets, dropout=0.1)
        dropped = saved_bytes(lora.apply_lora(tiny_model(), with_dropout).train())
        masks = saved_bytes(lora.apply_lora(tiny_model(), with_dropout).train(), torch.bool)
        with monkeypatch.context() as m:
            m.setattr(lora, "MaskDropout", torch.nn.Dropout)
            float_noise = saved_bytes(lora.apply_lora(tiny_model(), with_dropout).train())
        values = cfg.num_layers * sum(inputs[t] for t in targets) * tokens  # the adapters' inputs
        # one boolean mask per adapter, a byte a value, except on the first block's q, k and v: their input
        # (the frozen embedding, normed) needs no gradient, so dropout keeps no mask for it
        first = sum(inputs[t] for t in targets if t in ("q", "k", "v")) * tokens
        assert masks == values - first, (targets, masks, values, first)
        assert float_noise - dropped == 3 * masks  # torch's dropout keeps a float32 noise value for each
        assert dropped - kept <= values * 5  # a copy and a mask each at most (x itself may then not be kept)


@pytest.fixture(scope="module")
def lora_run(data, base, tmp_path_factory):
    """An uninterrupted int8-base LoRA run of 8 steps (the reference of the resume test; exported below)."""
    out = tmp_path_factory.mktemp("lora-run") / "run"
    r = train(resolve({"data": str(data), "out_dir": str(out), **FAST, **LORA, "init_from": str(base),
                       "lora_base_dtype": "int8"}), loss_fn=loss_that_interrupts(None))
    return r, out


def test_lora_run_checkpoints_adapters_only_and_resumes_bit_identically(data, base, lora_run, tmp_path):
    whole, run = lora_run
    assert whole.losses[-1] < whole.losses[0]
    saved = load_file(str(run / "last" / "model.safetensors"))
    assert saved and all(lora.is_adapter_key(k) for k in saved) and len(saved) == 2 * 5 * 6  # A, B; 5 targets; 6 layers
    meta = json.loads((run / "last" / "nanogemma.json").read_text())
    assert meta["lora"]["base"] == str(base.resolve()) and meta["lora"]["base_dtype"] == "int8"
    assert (run / "last" / "model.safetensors").stat().st_size < (base / "model.safetensors").stat().st_size / 4
    trainer = torch.load(run / "last" / "trainer.pt", weights_only=True)
    assert len(trainer["optimizer"]["state"]) == len(saved)  # AdamW moments of the adapters only

    out = tmp_path / "split"
    settings = {"data": str(data), "out_dir": str(out), **FAST, **LORA, "init_from": str(base),
                "lora_base_dtype": "int8"}
    first = train(resolve(settings), loss_fn=loss_that_interrupts(6))  # during step 6: it finishes, then saves
    assert first.interrupted and first.step == 6
    second = train(resolve({"out_dir": str(out), "resume": True, "progress": False}), loss_fn=loss_that_interrupts(None))
    assert second.step == 8
    assert first.losses + second.losses == whole.losses  # bit for bit: same operations, same random numbers
    assert second.val_loss == whole.val_loss


def test_lora_run_loads_merged_and_exports_to_hf_and_peft(lora_run, base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, run = lora_run
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = lora.add_adapter(build_model(*load_state(base)[:2]), run, merge=False)  # unmerged, float32
        want = ours(ids)
        merged = nanogemma.load(run)[0]  # a LoRA run loads as its base with the adapters merged
        assert (merged(ids) - want).abs().max() <= 1e-4
        assert (lora.strip_lora(ours)(ids) - want).abs().max() > 1e-3  # training moved the adapters

    peft_dir, hf_dir = tmp_path / "peft", tmp_path / "hf"
    assert cli.main(["export", str(run), "--to", "peft", str(peft_dir)]) == 0
    assert cli.main(["export", str(run), "--to", "hf", str(hf_dir)]) == 0
    with torch.no_grad():
        hf_base = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
        got_peft = PeftModel.from_pretrained(hf_base, str(peft_dir)).eval()(ids).logits
        got_hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()(ids).logits
    print(f"\n[lora export] peft {((got_peft - want).abs().max()):.2g}, merged hf {((got_hf - want).abs().max()):.2g}")
    assert (got_peft - want).abs().max() <= 1e-4 and (got_hf - want).abs().max() <= 1e-4
    assert cli.main(["export", str(base), "--to", "peft", str(tmp_path / "x")]) == 1  # not a LoRA run


def test_peft_adapter_loads_into_nanogemma(base, tmp_path, capsys):
    """A LoRA made and saved by peft (random B, rsLoRA scaling, a subset of projections) on transformers'
    Gemma 3 gives nanogemma the same logits, unmerged, merged, and through generate's loader."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from nanogemma.weights import load_for_inference

    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    torch.manual_seed(0)
    pm = get_peft_model(hf, LoraConfig(r=3, lora_alpha=5, use_rslora=True, init_lora_weights=False,
                                       target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])).eval()
    pm.save_pretrained(str(tmp_path / "adapter"))
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = pm(ids).logits
        model = nanogemma.load(base)[0]
        plain = model(ids)
        cfg, _, _ = lora.read_adapter(tmp_path / "adapter")
        assert (cfg.rank, cfg.targets, cfg.rslora) == (3, ("q", "v", "gate", "down"), True)
        unmerged = lora.add_adapter(model, tmp_path / "adapter", merge=False)(ids)
        packed = load_for_inference(str(base), adapter=tmp_path / "adapter")[0](ids)
    diffs = [(x - want).abs().max().item() for x in (unmerged, packed)]
    print(f"\n[peft in] unmerged {diffs[0]:.2g}, merged and packed {diffs[1]:.2g}")
    assert max(diffs) <= 1e-4 and (plain - want).abs().max() > 1e-3
    assert cli.main(["generate", "--model", str(base), "--adapter", str(tmp_path / "adapter"),
                     "--max-new-tokens", "3", "Once"]) == 0
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(base), "--adapter", str(base), "Once"]) == 1
    assert "is not a LoRA adapter" in capsys.readouterr().err


def test_float16_lora_training_runs(data, base, tmp_path):
    """float16 autocast with the gradient scaler over a bfloat16 base: finite losses, adapters that moved."""
    out = tmp_path / "run"
    r = train(resolve({"data": str(data), "out_dir": str(out), **FAST, **LORA, "init_from": str(base),
                       "lora_base_dtype": "bfloat16", "dtype": "float16", "max_steps": 3, "eval_every": 0,
                       "batch_size": 2, "seq_len": 32, "eval_batches": 1}))
    assert len(r.losses) == 3 and all(torch.isfinite(torch.tensor(r.losses)))
    assert all(v.abs().max() > 0 for k, v in load_file(str(out / "last" / "model.safetensors")).items()
               if k.endswith("lora_B"))


def test_bad_lora_settings_are_one_line_errors(data):
    with pytest.raises(NanogemmaError, match="LoRA adapts a trained model"):
        resolve({"data": str(data), "lora_rank": 4})
    with pytest.raises(NanogemmaError, match="unknown LoRA target 'qq'"):
        resolve({"data": str(data), "lora_rank": 4, "init_from": "gemma3-270m", "lora_targets": "q,qq"})
    with pytest.raises(NanogemmaError, match="base dtype"):
        resolve({"data": str(data), "lora_rank": 4, "init_from": "gemma3-270m", "lora_base_dtype": "int4"})
    with pytest.raises(NanogemmaError, match="dropout"):
        resolve({"data": str(data), "lora_rank": 4, "init_from": "gemma3-270m", "lora_dropout": 1.0})
    from helpers import tiny_model

    from nanogemma.quantize import pack_model

    with pytest.raises(NanogemmaError, match="before packing"):
        lora.apply_lora(pack_model(tiny_model()), lora.LoRAConfig())


# ---------------------------------------------------------------------------------- the real 270M model


def test_real_model_lora_against_peft_and_float16(model_and_tok, ref_model, tmp_path):
    """LoRA on the official weights: nanogemma's adapted logits against transformers + peft with the same
    adapter file; then float16: the residual stream passes 65,504 (why `load` refuses float16), while
    autocast, which keeps the residual stream in float32, stays finite (float16 training runs that way)."""
    from peft import PeftModel

    model, tok = model_and_tok
    ids = torch.tensor([tok.encode("Once upon a time, in a small village by the sea, there lived")])
    flags = [p.requires_grad for p in model.parameters()]
    total = sum(p.numel() for p in model.parameters())
    try:
        lora.apply_lora(model, lora.LoRAConfig(rank=8, alpha=16), seed=0)
        assert sum(p.numel() for p in lora.adapter_state(model).values()) < 0.01 * total  # rank 8 on every projection: 0.7%
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for k, p in lora.adapter_state(model).items():
                if k.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
            ours = model(ids)
        # A float16 training step's forward and backward (autocast: float16 products, float32 residual stream).
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:])
        loss.backward()
        grads = [p.grad for p in lora.adapter_state(model).values()]
        assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
        lora.save_peft(tmp_path / "adapter", lora.LoRAConfig(rank=8, alpha=16), lora.adapter_state(model),
                       "gemma3-270m")
    finally:
        lora.strip_lora(model)
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
    ref_flags = [p.requires_grad for p in ref_model.parameters()]
    pm = PeftModel.from_pretrained(ref_model, str(tmp_path / "adapter")).eval()
    try:
        with torch.no_grad():
            theirs = pm(ids).logits
            plain = model(ids)
    finally:
        pm.unload()  # the session's reference model, without the adapter layers again
        for p, f in zip(ref_model.parameters(), ref_flags, strict=True):
            p.requires_grad_(f)
    diff, moved = (ours - theirs).abs().max().item(), (ours - plain).abs().max().item()
    print(f"\n[lora 270M] vs peft: max |logit diff| {diff:.3g} (the adapter moves logits by {moved:.3g})")
    assert diff <= 1e-3 and moved > 100 * diff

    peak = {"residual": 0.0}
    hooks = [b.register_forward_hook(lambda m, i, o: peak.update(residual=max(peak["residual"], o.abs().max().item())))
             for b in model.layers]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    print(f"[float16] largest residual-stream value {peak['residual']:,.0f} (float16's largest: 65,504)")
    assert peak["residual"] > torch.finfo(torch.float16).max
    with pytest.raises(NanogemmaError, match="bfloat16"):
        nanogemma.load(dtype=torch.float16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        half = model(ids)
    # float16 products carry ~2^-11 relative error: 64 float16 steps at the largest logit bound the drift.
    assert torch.isfinite(half).all() and (half - plain).abs().max() <= 64 * 2**-11 * plain.abs().max()
