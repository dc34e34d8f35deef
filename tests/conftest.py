"""Shared fixtures. The real 270M model and its reference (transformers) are loaded once per test session."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parent / "data"  # test files shipped with the repository (see data/README.md)


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    """The official Gemma 3 270M GGUF (assembled once by the weights package)."""
    from nanogemma.weight_files import default_gguf_path

    return default_gguf_path()


@contextlib.contextmanager
def plain_gguf_reader() -> Iterator[None]:
    """transformers parses the GGUF with `gguf.GGUFReader` over a `numpy.memmap`; the same parse over a plain
    view of the map (`gguf_files.gguf_reader_class`, proven field for field in test_weights.py) takes a
    quarter of the time, some 12 s less for each of the two references."""
    import gguf

    from nanogemma.gguf_files import gguf_reader_class

    stock, gguf.GGUFReader = gguf.GGUFReader, gguf_reader_class()
    try:
        yield
    finally:
        gguf.GGUFReader = stock


@pytest.fixture(scope="session")
def ref_tokenizer(gguf_path):
    """The reference tokenizer: transformers' reading of the same GGUF."""
    from transformers import AutoTokenizer

    with plain_gguf_reader():
        return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def ref_model(gguf_path):
    """The reference model: transformers' Gemma3ForCausalLM on the same GGUF, float32, default (sdpa) attention."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with plain_gguf_reader():
        m = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, attn_implementation="sdpa"
        )
    return m.eval()


@pytest.fixture(scope="session")
def model_and_tok():
    """nanogemma's own load of the default model (float32, CPU)."""
    import nanogemma

    model, tok = nanogemma.load()
    return model.eval(), tok


@pytest.fixture(scope="session")
def gpt2_tiktoken_file() -> Path:
    """The GPT-2 vocabulary shipped in tests/data (tiktoken cannot download it offline)."""
    p = DATA / "gpt2.tiktoken"
    assert p.is_file(), f"{p} is part of the repository; restore it with git checkout"
    return p


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A fresh NANOGEMMA_CACHE, so a test sees only the caches it writes."""
    monkeypatch.setenv("NANOGEMMA_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def tiny():
    """(config, state) of a random `tiny` model whose norm weights are non-zero too."""
    from nanogemma.config import get_preset
    from nanogemma.model import Gemma

    cfg = get_preset("tiny")
    model = Gemma(cfg).init_weights(seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.2, generator=gen)  # seeded: the fixture must not depend on test order
    return cfg, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def one_thread(request):
    """One torch thread, for the modules that opt in (pytestmark): tiny models gain nothing from a second
    thread, and on a shared machine lose a lot to waiting for it."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    from helpers import write_tiny_hf

    return write_tiny_hf(tmp_path_factory.mktemp("tiny-hf"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A synthetic story corpus with a 320-token BPE (the folder tests/test_train_loop.py prepares too:
    `prepare` skips a finished folder, so it is made once per session)."""
    from nanogemma.data import prepare

    folder = tmp_path_factory.getbasetemp() / "train-synthetic-bpe320"
    prepare("synthetic:400", folder, tokenizer="bpe:320", workers=1, progress=False)
    return folder


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """A finished 2-step run of the tiny preset: a run folder with `last`, `best` and the data's tokenizer."""
    from nanogemma.train import resolve, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("tiny-run") / "run"
        train(resolve({"data": str(tiny_data), "out_dir": str(out), "preset": "tiny", "max_steps": 2,
                       "eval_every": 0, "eval_batches": 1, "progress": False, "tensorboard": False,
                       "sample_tokens": 0, "log_every": 1, "warmup_steps": 1}))
    finally:
        torch.set_num_threads(threads)
    return out
