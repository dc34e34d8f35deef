"""`nanogemma plot RUN_DIR`: PNG curves from metrics.jsonl (a hand-written one: no training needed)."""

from __future__ import annotations

import json

import pytest

from nanogemma import cli
from nanogemma.errors import NanogemmaError
from nanogemma.tools.plot import plot_run

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(folder, floor=0.5):
    folder.mkdir()
    rows = [{"kind": "train", "step": s, "loss": 6.0 / s, "lr": 1e-3 * min(1, s / 5)} for s in range(1, 21)]
    rows += [{"kind": "eval", "step": s, "val_loss": 5.0 / s, "val_ppl": 1.0, "val_acc": 0.5} for s in (10, 20)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tra')
    (folder / "nanogemma.json").write_text(json.dumps({"model": {}, "data": {"entropy_floor": floor}}))
    return folder


def test_plot_writes_png(tmp_path):
    run = fake_run(tmp_path / "run")
    out = plot_run(run)
    assert out == run / "curves.png" and out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000
    assert not list(run.glob(".curves*"))


def test_plot_cli(tmp_path, capsys):
    run = fake_run(tmp_path / "run", floor=None)
    assert cli.main(["plot", str(run), "--out", str(tmp_path / "figs" / "x.png"), "--title", "demo"]) == 0
    assert (tmp_path / "figs" / "x.png").read_bytes()[:8] == PNG
    assert capsys.readouterr().out.strip().endswith("x.png")


def test_plot_of_a_folder_without_metrics(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nanogemma: error:") and "no metrics.jsonl" in err


def test_plot_of_an_empty_log(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(NanogemmaError, match="no training records yet"):
        plot_run(tmp_path)
