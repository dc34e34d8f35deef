"""JAX weight loading: the same sources as PyTorch, strictly, into the same numbers; run folders both ways.

Tiny checkpoints are written the way each source is laid out (a GGUF by the `gguf` package, a Hugging Face
folder, a run folder); the real 270M GGUF is covered by test_jax_real.py.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from helpers import write_gguf  # a GGUF laid out as llama.cpp's converter does
from safetensors.torch import save_file

from nanogemma.config import to_hf_config
from nanogemma.errors import NanogemmaError
from nanogemma.jax.load import check_state, load_params, read_state, save_run
from nanogemma.weight_files import hf_state_dict
from nanogemma.weights import load_state, read_gguf

pytestmark = pytest.mark.usefixtures("private_cache")


def assert_same(params, state):
    assert set(params) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(np.asarray(params[k], dtype=np.float32), v.float().numpy(), err_msg=k)


def hf_folder(path, cfg, state, dtype=torch.float32):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    save_file({k: v.to(dtype).contiguous() for k, v in hf_state_dict(state).items()}, str(path / "model.safetensors"))
    return path


def test_hf_folder(tmp_path, tiny):
    cfg, state = tiny
    got_cfg, params, _ = load_params(hf_folder(tmp_path / "hf", cfg, state))
    assert got_cfg == cfg
    assert_same(params, state)


def test_bfloat16_checkpoint_is_read_without_torch(tmp_path, tiny):
    cfg, state = tiny
    folder = hf_folder(tmp_path / "hf", cfg, state, torch.bfloat16)
    _, raw, _ = read_state(folder)
    assert all(isinstance(v, np.ndarray) and v.dtype == ml_dtypes.bfloat16 for v in raw.values())
    _, params, _ = load_params(folder, "bfloat16")
    assert str(params["embed.weight"].dtype) == "bfloat16"
    assert_same(params, {k: v.to(torch.bfloat16) for k, v in state.items()})


def test_gguf_cold_and_cached_loads_equal_pytorch(tmp_path, tiny):
    cfg, state = tiny
    path = write_gguf(tmp_path / "tiny.gguf", cfg, state)
    _, cold, _ = load_params(path)  # dequantises the GGUF in numpy and writes the shared cache
    assert len(list((tmp_path / "cache" / "weights").glob("*.safetensors"))) == 1
    _, warm, _ = load_params(path)  # reads that cache
    torch_cfg, torch_cold = read_gguf(path)  # PyTorch's own GGUF reading, no cache involved
    assert torch_cfg == cfg
    assert_same(cold, torch_cold)  # bit for bit
    assert_same(warm, torch_cold)
    assert_same(cold, load_state(path)[1])  # PyTorch reads the cache JAX wrote
    # The file stores norms as 1 + w, rounded to float32: (1 + w) - 1 is off by up to half an ulp of 1 + w,
    # 1.2e-7 for 1 + w in [2, 4), 2.4e-7 in [4, 8).
    for k, v in state.items():
        np.testing.assert_allclose(np.asarray(cold[k]), v.numpy(), rtol=0, atol=2.4e-7)


def test_run_folders_cross_over(tmp_path, tiny):
    cfg, state = tiny
    _, params, _ = load_params(hf_folder(tmp_path / "hf", cfg, state))
    save_run(tmp_path / "run", cfg, params, {"note": "written by JAX"})
    meta = json.loads((tmp_path / "run" / "nanogemma.json").read_text())
    assert meta["model"] == cfg.to_dict() and meta["note"] == "written by JAX"
    torch_cfg, torch_state, _ = load_state(tmp_path / "run")  # what `nanogemma.load` reads, PyTorch side
    assert torch_cfg == cfg
    assert all(torch.equal(torch_state[k], state[k]) for k in state)
    # And the other way: a run folder PyTorch wrote (the trainer's layout) loads in JAX.
    (tmp_path / "pt").mkdir()
    save_file(state, str(tmp_path / "pt" / "model.safetensors"))
    (tmp_path / "pt" / "nanogemma.json").write_text(json.dumps({"model": cfg.to_dict(), "step": 3}))
    got_cfg, got, _ = load_params(tmp_path / "pt")
    assert got_cfg == cfg
    assert_same(got, state)


def test_strictness_names_the_tensor(tmp_path, tiny):
    cfg, state = tiny
    arrays = {k: v.numpy() for k, v in state.items()}
    with pytest.raises(NanogemmaError, match=r"no tensor for parameter 'layers\.2\.mlp\.up\.weight'"):
        check_state(cfg, {k: v for k, v in arrays.items() if k != "layers.2.mlp.up.weight"})
    with pytest.raises(NanogemmaError, match="does not use: 'layers.9.attn.wq.weight'"):
        check_state(cfg, {**arrays, "layers.9.attn.wq.weight": arrays["layers.0.attn.wq.weight"]})
    bad = {**arrays, "layers.1.attn.wk.weight": np.zeros((5, 64), np.float32)}
    with pytest.raises(NanogemmaError, match=r"'layers\.1\.attn\.wk\.weight' has shape \(5, 64\), the config implies \(32, 64\)"):
        check_state(cfg, bad)
    # Through a real file: a run folder whose weights miss a tensor fails to load, with its path.
    folder = tmp_path / "run"
    folder.mkdir()
    save_file({k: v for k, v in state.items() if k != "final_norm.weight"}, str(folder / "model.safetensors"))
    (folder / "nanogemma.json").write_text(json.dumps({"model": cfg.to_dict()}))
    with pytest.raises(NanogemmaError, match=f"{folder} has no tensor for parameter 'final_norm.weight'"):
        load_params(folder)


def test_bad_sources(tmp_path, tiny):
    cfg, state = tiny
    with pytest.raises(NanogemmaError, match="model not found"):
        load_params(tmp_path / "absent")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "nanogemma.json").write_text(json.dumps({"model": cfg.to_dict()}))
    with pytest.raises(NanogemmaError, match="model.safetensors is missing"):
        load_params(folder)
    (folder / "nanogemma.json").write_text(json.dumps({"step": 1}))
    with pytest.raises(NanogemmaError, match="does not describe a model"):
        load_params(folder)
    (folder / "nanogemma.json").write_text(json.dumps({"model": cfg.to_dict()}))
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(NanogemmaError, match="not a readable safetensors file"):
        load_params(folder)
    with pytest.raises(NanogemmaError, match="float16 overflows"):
        load_params(hf_folder(tmp_path / "hf", cfg, state), "float16")


_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # any `import torch` from here on raises ImportError
import numpy as np
import nanogemma.jax as ngj
from nanogemma.jax.generation import generate_ids

out = {}
for kind, path in zip(sys.argv[2::2], sys.argv[3::2]):
    cfg, params, _ = ngj.load_params(path)
    model = ngj.JaxGemma(cfg, params)
    ids = [2, 17, 5, 99, 3, 42, 7, 8, 250, 11, 13, 1]
    out[kind + "_logits"] = np.asarray(model([ids]))
    out[kind + "_greedy"] = np.asarray(list(generate_ids(model, ids, 12)))
np.savez(sys.argv[1], **out)
"""


def test_loads_and_generates_without_torch(tmp_path, tiny):
    """Issue 6: `nanogemma.jax` reads GGUF, Hugging Face and run folders on a machine without torch."""
    import subprocess
    import sys

    from nanogemma.generation import generate_ids as torch_generate_ids
    from nanogemma.weights import build_model

    cfg, state = tiny
    gguf_file = write_gguf(tmp_path / "tiny.gguf", cfg, state)
    hf = hf_folder(tmp_path / "hf", cfg, state)
    _, params, _ = load_params(hf)
    save_run(tmp_path / "run", cfg, params, {})
    sources = {"gguf": gguf_file, "hf": hf, "run": tmp_path / "run"}
    args = [str(tmp_path / "out.npz")] + [str(x) for kv in sources.items() for x in kv]
    done = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    model = build_model(cfg, state)
    ids = [2, 17, 5, 99, 3, 42, 7, 8, 250, 11, 13, 1]
    with torch.no_grad():
        want = model(torch.tensor([ids])).numpy()
    want_greedy = list(torch_generate_ids(model, ids, 12))
    for kind in sources:
        np.testing.assert_allclose(got[kind + "_logits"], want, rtol=0, atol=1e-4, err_msg=kind)
        assert got[kind + "_greedy"].tolist() == want_greedy, kind


def test_import_nanogemma_does_not_import_torch():
    """`import nanogemma` (and so `nanogemma --help`, `prepare`, the JAX side) leaves torch unloaded."""
    import subprocess
    import sys

    code = "import sys, nanogemma, nanogemma.jax, nanogemma.cli; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
