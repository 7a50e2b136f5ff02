"""Model catalogue: every entry loads, matches its config.json, and has the known KV sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import ROOT, SHARED_DATA, load_script, shared_file

from kvsim.errors import KvsimError
from kvsim.kv import layout_for
from kvsim.spec.hf_import import model_from_hf_config
from kvsim.spec.linears import head_linears, layer_linears, norm_params
from kvsim.spec.model import load_model, model_from_dict, model_names

REQUIRED = ("llama-2-7b llama-2-13b llama-2-70b llama-3-8b llama-3-70b llama-3.1-8b llama-3.1-70b "
            "llama-3.1-405b mistral-7b mixtral-8x7b mixtral-8x22b qwen2.5-7b qwen2.5-72b qwen3-8b qwen3-32b "
            "qwen3-30b-a3b qwen3-235b-a22b gemma-2-9b gemma-2-27b phi-3-mini deepseek-v2-lite deepseek-v2 "
            "deepseek-v3 kimi-k2 gpt-oss-20b gpt-oss-120b llama-4-scout llava-1.5-7b gemma-3n-e2b").split()


def test_catalogue_has_every_required_model() -> None:
    assert set(REQUIRED) <= set(model_names())


def _builder():
    """scripts/build_model_catalogue.py, whose config_path looks in models/configs/ before ../shared."""
    return load_script("build_model_catalogue")


@pytest.mark.parametrize("name", model_names())
def test_yaml_matches_its_config_json(name: str) -> None:
    """Each YAML cites a config.json; re-importing that config gives the same spec."""
    data = yaml.safe_load((ROOT / "models" / f"{name}.yaml").read_text())
    file = data["source"]["config"]
    path = _builder().config_path(file, SHARED_DATA / "model_configs")
    config = json.loads((path if path.is_file() else shared_file("model_configs", file)).read_text())  # skips
    fresh = model_from_hf_config(config, name=name, config_file=data["source"]["config"],
                                 hf_repo=data["source"]["hf_repo"])
    fresh["source"] = data["source"]
    assert model_from_dict(fresh) == load_model(name)


# Bytes per token, bf16, whole model: docs/kv-methods.md and ../shared/data/model_configs/README.md
KNOWN_KV_BYTES_PER_TOKEN = {"llama-3-8b": 131_072, "llama-2-7b": 524_288, "deepseek-v3": 70_272,
                            "deepseek-v2-lite": 31_104, "kimi-k2": 70_272, "llama-2-70b": 327_680,
                            "qwen2.5-7b": 57_344, "qwen3-235b-a22b": 192_512, "gemma-3n-e2b": 40_960,
                            "llama-3.1-405b": 516_096, "gpt-oss-20b": 49_152,
                            "qwen3-14b": 40 * 2 * 8 * 128 * 2}  # layers x (K, V) x KV heads x head dim x bf16


@pytest.mark.parametrize("name,expected", sorted(KNOWN_KV_BYTES_PER_TOKEN.items()))
def test_known_kv_bytes_per_token(name: str, expected: int) -> None:
    assert layout_for(load_model(name)).gpu_bytes(1)[0] == expected


@pytest.mark.parametrize("name,window", [("mistral-7b", 4096), ("phi-3-mini", 2047)])
def test_all_sliding_models_are_capped_at_their_window(name: str, window: int) -> None:
    layout = layout_for(load_model(name))
    assert layout.gpu_bytes(window)[0] == layout.gpu_bytes(10 * window)[0]
    assert layout.gpu_bytes(window - 1)[0] < layout.gpu_bytes(window)[0]


def test_hybrid_models_cap_only_their_window_layers() -> None:
    g = layout_for(load_model("gemma-2-9b"))  # 21 sliding (4096) + 21 global layers
    per_layer_token = 2 * 8 * 256 * 2
    assert g.gpu_bytes(8192)[0] - g.gpu_bytes(4096)[0] == 21 * per_layer_token * 4096
    oss = layout_for(load_model("gpt-oss-20b"))  # 12 layers with a 128-token window
    assert oss.gpu_bytes(1000)[0] == 12 * 2 * 8 * 64 * 2 * (1000 + 128)


# Parameter counts published on the models' HF pages (safetensors metadata).
KNOWN_PARAMS = {"llama-3-8b": 8_030_261_248, "llama-2-7b": 6_738_415_616, "mixtral-8x7b": 46_702_792_704,
                "llava-1.5-7b": 7_063_427_072}


@pytest.mark.parametrize("name,params", sorted(KNOWN_PARAMS.items()))
def test_parameter_counts(name: str, params: int) -> None:
    m = load_model(name)
    total = (sum(lin.params for layer in m.layers for lin in layer_linears(m, layer))
             + sum(lin.params for lin in head_linears(m)) + norm_params(m) + (m.vision.params if m.vision else 0))
    assert abs(total - params) / params < 1e-5


def test_gemma3n_shares_kv_from_the_last_owner_of_the_same_kind() -> None:
    m = load_model("gemma-3n-e2b")
    assert [layer.kv_source for layer in m.layers[20:]] == [18, 18, 18, 18, 19] * 2
    assert len(m.kv_layers) == 20


def test_a_hf_config_json_path_is_accepted(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text(shared_file("model_configs", "Qwen3-8B.json").read_text())
    assert layout_for(load_model(str(path))).gpu_bytes(1)[0] == 147_456


def test_unknown_yaml_key_names_key_and_file(tmp_path) -> None:
    data = yaml.safe_load((ROOT / "models" / "llama-3-8b.yaml").read_text())
    data["attention"]["num_kv_head"] = 8
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(KvsimError, match=r"bad\.yaml.*attention\.num_kv_head.*unknown key"):
        load_model(str(path))


@pytest.mark.parametrize("token,match", [("sliding", "positive token count"), ("full kv=40", "earlier layer"),
                                         ("flash", "attention kind")])
def test_bad_layer_patterns(tmp_path, token: str, match: str) -> None:
    data = yaml.safe_load((ROOT / "models" / "llama-3-8b.yaml").read_text())
    data["layers"] = [{"repeat": 1, "pattern": [token]}]
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(KvsimError, match=match):
        load_model(str(path))


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(KvsimError, match="llama-3-8b"):
        load_model("llama3-8b")


def test_bytes_are_vectorized() -> None:
    layout = layout_for(load_model("llama-3-8b"))
    t = np.array([1, 10, 100])
    assert np.array_equal(layout.gpu_bytes(t), 131_072 * t)
