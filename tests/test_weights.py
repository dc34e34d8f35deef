"""Weight loading: GGUF (several tensor types), Hugging Face folders, strictness, the cache, and bad files.

The real 270M file (Q8_0, Q5_0, Q4_K, Q6_K, F32) is covered by test_parity.py; here tiny GGUFs written by the
`gguf` package cover F32, F16, BF16, Q8_0 and Q5_0, and every failure a user can meet.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from helpers import write_gguf  # tests/ is on sys.path (pytest's rootdir import mode)
from safetensors.torch import save_file

from nanogemma.config import PRESETS, from_hf_config, get_preset, to_hf_config
from nanogemma.errors import NanogemmaError
from nanogemma.weight_files import hf_state_dict
from nanogemma.weights import build_model, load_gguf, load_hf, load_state

TOL = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 2e-2, Q.Q5_0: 8e-2}


pytestmark = pytest.mark.usefixtures("private_cache")


def test_plain_gguf_reader_parses_as_the_packages_reader(tmp_path, tiny):
    """`gguf_reader` (the package's parse over a plain view of the memory map) gives every field and tensor
    the package's own `GGUFReader` gives: a vocabulary of strings, scores and types, quantised tensors."""
    import gguf

    from nanogemma.gguf_files import gguf_reader

    cfg, state = tiny
    tokens = [f"tok{i}" for i in range(cfg.vocab_size)]
    extra = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": [float(-i) for i in range(len(tokens))],
             "tokenizer.ggml.token_type": [1 + i % 3 for i in range(len(tokens))]}
    path = write_gguf(tmp_path / "m.gguf", cfg, state, Q.Q8_0, fields=extra)
    ours, theirs = gguf_reader(path), gguf.GGUFReader(path)
    assert type(ours.data) is np.ndarray and isinstance(theirs.data, np.memmap)
    assert list(ours.fields) == list(theirs.fields) and "tokenizer.ggml.tokens" in ours.fields
    for name, field in theirs.fields.items():
        mine = ours.fields[name]
        assert (mine.offset, mine.types, mine.data, mine.contents()) == (field.offset, field.types, field.data,
                                                                         field.contents()), name
        assert all(np.array_equal(a, b) for a, b in zip(mine.parts, field.parts, strict=True)), name
    assert ours.fields["tokenizer.ggml.tokens"].contents() == tokens
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, t in zip(ours.tensors, theirs.tensors, strict=True):
        assert (mine.tensor_type, mine.shape.tolist(), mine.data_offset) == (t.tensor_type, t.shape.tolist(),
                                                                             t.data_offset)
        assert np.array_equal(mine.data, t.data), t.name


@pytest.mark.parametrize("qtype", list(TOL))
def test_gguf_tensor_types_round_trip(tmp_path, tiny, qtype):
    cfg, state = tiny
    got_cfg, got = load_gguf(write_gguf(tmp_path / "m.gguf", cfg, state, qtype))
    assert got_cfg == cfg
    assert set(got) == set(state)
    for k in state:
        assert got[k].shape == state[k].shape
        tol = 1e-6 if "norm" in k else TOL[qtype] * max(1.0, state[k].abs().max().item())
        assert (got[k] - state[k]).abs().max().item() <= tol, k
    # And the model built from it runs.
    model = build_model(got_cfg, got)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, cfg.vocab_size)


def test_gguf_cache_is_used_and_rebuilt_when_damaged(tmp_path, tiny, monkeypatch):
    import nanogemma.gguf_files as G

    cfg, state = tiny
    path = write_gguf(tmp_path / "m.gguf", cfg, state)
    first = load_gguf(path)[1]
    cached = list((tmp_path / "cache" / "weights").glob("*.safetensors"))
    assert len(cached) == 1
    monkeypatch.setattr(G, "read_gguf_arrays", lambda p: pytest.fail("the cache should have been used"))
    second = load_gguf(path)[1]
    assert all(torch.equal(first[k], second[k]) for k in first)
    cached[0].write_bytes(b"not a safetensors file")
    monkeypatch.undo()
    monkeypatch.setenv("NANOGEMMA_CACHE", str(tmp_path / "cache"))
    third = load_gguf(path)[1]
    assert all(torch.equal(first[k], third[k]) for k in first)


def test_gguf_strictness_names_the_tensor(tmp_path, tiny):
    cfg, state = tiny
    missing = write_gguf(tmp_path / "a.gguf", cfg, state, drop=("blk.3.ffn_up.weight",))
    with pytest.raises(NanogemmaError, match="layers.3.mlp.up.weight"):
        build_model(*load_gguf(missing), source="a.gguf")
    extra = write_gguf(tmp_path / "b.gguf", cfg, state, extra={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(NanogemmaError, match="rope_freqs.weight"):
        load_gguf(extra)
    bad_shape = dict(state)
    bad_shape["layers.0.attn.wq.weight"] = torch.zeros(32, 64)
    with pytest.raises(NanogemmaError, match="layers.0.attn.wq.weight"):
        build_model(cfg, bad_shape)


def test_gguf_of_another_architecture(tmp_path, tiny):
    cfg, state = tiny
    with pytest.raises(NanogemmaError, match="'llama' model"):
        load_gguf(write_gguf(tmp_path / "llama.gguf", cfg, state, arch="llama"))


def test_truncated_and_corrupt_gguf(tmp_path, tiny):
    cfg, state = tiny
    good = write_gguf(tmp_path / "m.gguf", cfg, state).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 8)
    for name in ("cut.gguf", "junk.gguf"):
        with pytest.raises(NanogemmaError, match="not a readable GGUF"):
            load_gguf(tmp_path / name)
    with pytest.raises(NanogemmaError, match="not found"):
        load_gguf(tmp_path / "absent.gguf")


def _hf_folder(path, cfg, state, shards=1):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    hf = {k: v.contiguous() for k, v in hf_state_dict(state).items()}
    if shards == 1:
        save_file(hf, str(path / "model.safetensors"))
        return path
    keys = sorted(hf)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: hf[k] for k in part}, str(path / name))
        weight_map.update(dict.fromkeys(part, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_folder_round_trip(tmp_path, tiny, shards):
    cfg, state = tiny
    got_cfg, got = load_hf(_hf_folder(tmp_path / "hf", cfg, state, shards))
    assert got_cfg == cfg
    assert all(torch.equal(got[k], state[k]) for k in state) and set(got) == set(state)


def test_hf_folder_missing_shard(tmp_path, tiny):
    cfg, state = tiny
    folder = _hf_folder(tmp_path / "hf", cfg, state, shards=3)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(NanogemmaError, match="model-00002-of-00003.safetensors.*missing"):
        load_hf(folder)


def test_multimodal_checkpoint_uses_the_language_model_only(tmp_path, tiny):
    cfg, state = tiny
    folder = tmp_path / "mm"
    folder.mkdir()
    hf_cfg = {"model_type": "gemma3", "text_config": to_hf_config(cfg), "vision_config": {}}
    (folder / "config.json").write_text(json.dumps(hf_cfg))
    tensors = {k.replace("model.", "model.language_model.", 1): v for k, v in hf_state_dict(state).items()}
    tensors["model.vision_tower.vision_model.post_layernorm.weight"] = torch.ones(4)
    save_file(tensors, str(folder / "model.safetensors"))
    got_cfg, got = load_hf(folder)
    assert got_cfg == cfg and set(got) == set(state)


def test_hf_config_variants():
    base = to_hf_config(get_preset("gemma3-4b"))
    assert from_hf_config(base) == get_preset("gemma3-4b")
    # transformers 5.x spelling: RoPE parameters keyed by layer type.
    v5 = {k: v for k, v in base.items() if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling")}
    v5["rope_parameters"] = {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    }
    assert from_hf_config(v5) == get_preset("gemma3-4b")
    with pytest.raises(ValueError, match="llama"):
        from_hf_config({"model_type": "llama"})


def test_presets():
    cfg = get_preset("gemma3-270m")
    assert [i for i, t in enumerate(cfg.layer_types) if t == "global"] == [5, 11, 17]
    assert abs(cfg.num_params - 268.1e6) < 0.1e6
    assert cfg.query_pre_attn_scalar**-0.5 == 1 / 16
    for name, preset in PRESETS.items():
        assert from_hf_config(to_hf_config(preset)) == preset, name
    assert get_preset("gemma3-27b").query_pre_attn_scalar == 168
    assert {get_preset(n).rope_global_scale for n in ("gemma3-4b", "gemma3-12b", "gemma3-27b")} == {8.0}
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("gemma3-2b")


def test_model_names_and_paths(tmp_path):
    with pytest.raises(NanogemmaError, match="model not found"):
        load_state(tmp_path / "nowhere")
    with pytest.raises(NanogemmaError, match="no bundled weights"):
        load_state("gemma3-27b")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(NanogemmaError, match="not a .gguf file"):
        load_state(tmp_path / "weights.bin")


def test_file_digest_is_remembered_until_the_file_changes(tmp_path):
    import hashlib
    import os

    from nanogemma import weight_files

    f = tmp_path / "model.gguf"
    f.write_bytes(b"weights" * 1000)
    real = hashlib.sha256(f.read_bytes()).hexdigest()
    assert weight_files.file_digest(f) == real
    index_file = tmp_path / "cache" / "digests.json"
    index = json.loads(index_file.read_text())
    assert index[str(f.resolve())]["sha256"] == real
    # A later process (fresh memo) takes the digest from the index without reading the file...
    index[str(f.resolve())]["sha256"] = "remembered"
    index_file.write_text(json.dumps(index))
    weight_files._digest.cache_clear()
    assert weight_files.file_digest(f) == "remembered"
    # ...until the file's size or mtime changes; a damaged index is just rebuilt.
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert weight_files.file_digest(f) == real
    index_file.write_text("{not json")
    weight_files._digest.cache_clear()
    assert weight_files.file_digest(f) == real
    assert json.loads(index_file.read_text())[str(f.resolve())]["sha256"] == real


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline huggingface_hub whose cache is a fresh folder (as HF_HUB_CACHE + HF_HUB_OFFLINE=1 would set;
    the library reads those variables once, at import, so its constants are set instead)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_repository_ids_resolve_through_the_hub_cache(tmp_path, tiny, hub_cache, capsys):
    from helpers import write_hub_cache

    from nanogemma.cli import main
    from nanogemma.weight_files import resolve_model

    cfg, state = tiny
    snapshot = write_hub_cache(hub_cache, "someone/gemma-3-tiny-it", _hf_folder(tmp_path / "hf", cfg, state))
    for name in ("someone/gemma-3-tiny-it", "hf:someone/gemma-3-tiny-it"):
        assert resolve_model(name) == ("hf", snapshot)
    got_cfg, got, path = load_state("someone/gemma-3-tiny-it")
    assert got_cfg == cfg and path == snapshot and all(torch.equal(got[k], state[k]) for k in state)
    assert main(["inspect", "--model", "someone/gemma-3-tiny-it"]) == 0  # the commands take it as --model
    assert str(snapshot) in capsys.readouterr().out
    # Offline and not cached: one line that says where it looked and what to do, for every command.
    assert main(["inspect", "--model", "someone/absent-it"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "someone/absent-it" in err and str(hub_cache) in err
    assert "HF_HUB_OFFLINE is set" in err and "download it once online" in err
