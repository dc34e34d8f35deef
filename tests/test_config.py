"""The config: every preset survives a round trip through a Hugging Face config.json (`load_hf_config`)."""

from __future__ import annotations

import json

import pytest

from nanogemma.config import PRESETS, get_preset, load_hf_config, to_hf_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_json_round_trips(name, tmp_path):
    cfg = get_preset(name)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(to_hf_config(cfg)), encoding="utf-8")
    assert load_hf_config(path) == cfg
