"""`nanogemma export RUN_DIR --to hf OUT_DIR`: transformers loads the folder and gets nanogemma's logits.

Also here: the run folder's tokenizer files, which the export copies — for GPT-2 data they are built from
tiktoken's ranks, and must give tiktoken's ids exactly.
"""

from __future__ import annotations

import json

import pytest
import torch

import nanogemma
from nanogemma import cli
from nanogemma.data import load_data_tokenizer, prepare
from nanogemma.tools.export import export_hf
from nanogemma.train import resolve, train
from nanogemma.train.tokenizer_files import write


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.getbasetemp() / "train-synthetic-bpe320"
    prepare("synthetic:400", folder, tokenizer="bpe:320", workers=1, progress=False)
    return folder


def make_run(data, out, **settings):
    torch.set_num_threads(1)
    train(resolve({"data": str(data), "out_dir": str(out), "preset": "tiny", "max_steps": 3, "eval_every": 0,
                   "sample_tokens": 0, "progress": False, "tensorboard": False, **settings}))
    return out


@pytest.mark.parametrize("tied", [True, False])
def test_export_loads_in_transformers_with_the_same_logits(data, tmp_path, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = make_run(data, tmp_path / "run", tie_embeddings=tied)
    out = export_hf(run, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in out.iterdir()}
    model, tok = nanogemma.load(run)
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(out)
    text = "Once upon a time, there was a shy fox named Mia. She lived in a cozy cave."
    ids = tok.encode(text)
    assert ids == ref_tok(text).input_ids and ids[0] == ref.config.bos_token_id
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(x), ref(input_ids=x).logits
    worst = (ours - theirs).abs().max().item()
    print(f"tied={tied}: largest logit difference nanogemma vs transformers {worst:.2e}")
    assert worst < 1e-4
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tied


def test_export_cli_and_refusal_to_overwrite(data, tmp_path, capsys):
    run = make_run(data, tmp_path / "run")
    dest = tmp_path / "hf"
    assert cli.main(["export", str(run), "--to", "hf", str(dest)]) == 0
    assert cli.main(["export", str(run / "last"), "--to", "hf", str(dest)]) == 1
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert cli.main(["export", str(run / "last"), "--to", "hf", str(dest), "--overwrite", "--dtype", "bfloat16"]) == 0
    assert json.loads((dest / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not list(tmp_path.glob(".hf.tmp-*"))


def test_gpt2_run_folder_tokenizer_equals_tiktoken(tmp_path, gpt2_tiktoken_file):
    folder = tmp_path / "gpt2-data"
    prepare("synthetic:20", folder, tokenizer="gpt2", tokenizer_file=str(gpt2_tiktoken_file), workers=1,
            progress=False)
    data_tok = load_data_tokenizer(folder=folder)
    write(tmp_path, data_tok)
    tok = nanogemma.load_tokenizer(tmp_path)
    texts = ["Hello world", "  two spaces, then\n\nnewlines\tand tabs  ", "it's we'll 12345 3.14 $x+=1;",
             "ünïcödé 日本語の文章 🙂🙃 emoji", "Once upon a time, there was a shy fox named Mia.",
             "a" * 300, "   \n  \r\n trailing   "]
    for text in texts:
        assert tok.encode(text, add_bos=False) == data_tok.encode(text), text
        assert tok.decode(tok.encode(text, add_bos=False)) == text
    assert tok.encode("Hi")[0] == tok.bos_id == 50256  # a prompt starts where a document would
    # Like Gemma's tokenizer, a prompt may name special tokens; the data pipeline keeps them as text.
    assert tok.encode("<|endoftext|>", add_bos=False) == [50256]


def test_default_model_export_carries_its_tokenizer_and_chat_template(gguf_path, tmp_path, capsys, monkeypatch):
    """`nanogemma export gemma3-270m --to hf DIR`: the GGUF holds its tokenizer inside; the export writes it
    out with Gemma's chat template, so transformers and nanogemma both load DIR (model, tokenizer, chat
    template). The default GGUF's own tokenizer is used; its weights are swapped for a tiny model with the
    same vocabulary, so the test does not write and read a gigabyte."""
    from helpers import tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nanogemma.chat import Chat
    from nanogemma.tools import export as export_mod

    model = tiny_model(vocab_size=262_144)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr("nanogemma.weights.load_state", lambda source: (model.config, state, gguf_path))
    out = tmp_path / "hf"
    assert cli.main(["export", "gemma3-270m", "--to", "hf", str(out)]) == 0
    assert export_mod.TOKENIZER_FILES and "warning" not in capsys.readouterr().out
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in out.iterdir()}
    tok = nanogemma.load_tokenizer()  # the GGUF's
    back, back_tok = nanogemma.load(out)
    ref_tok = AutoTokenizer.from_pretrained(out)
    text = "Hello <start_of_turn>world\n  ¿Qué? 日本語"
    assert tok.encode(text) == back_tok.encode(text) == ref_tok(text).input_ids
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    rendered = ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ref_tok(rendered, add_special_tokens=False).input_ids == \
        Chat(model, tok, system="Be brief.", context=64).turn_tokens("Hi there")
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        ours, again, theirs = model(x), back(x), ref(input_ids=x).logits
    assert torch.equal(ours, again)  # float32 weights, read back unchanged
    assert (ours - theirs).abs().max().item() < 1e-4
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tok.eos_id
