"""Regenerate models/*.yaml from the real HF configs in ../shared/data/model_configs, or in
models/configs/ for the few that ../shared does not hold (each cited in models/configs/README.md).

    python scripts/build_model_catalogue.py [--configs DIR]

Each YAML cites the config.json it came from; tests/test_models.py re-imports every config and
checks that the committed YAML still matches it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from kvsim.spec.hf_import import model_from_hf_config

ROOT = Path(__file__).resolve().parents[1]

# catalogue name -> (config file in models/configs/ or ../shared/data/model_configs, HF repository it describes)
CATALOGUE = {
    "llama-2-7b": ("Llama-2-7b-hf.json", "meta-llama/Llama-2-7b-hf"),
    "llama-2-13b": ("Llama-2-13b-hf.json", "meta-llama/Llama-2-13b-hf"),
    "llama-2-70b": ("Llama-2-70b-hf.json", "meta-llama/Llama-2-70b-hf"),
    "llama-3-8b": ("Meta-Llama-3-8B.json", "meta-llama/Meta-Llama-3-8B"),
    "llama-3-70b": ("Meta-Llama-3-70B.json", "meta-llama/Meta-Llama-3-70B"),
    "llama-3.1-8b": ("Llama-3.1-8B.json", "meta-llama/Llama-3.1-8B"),
    "llama-3.1-70b": ("Llama-3.1-70B.json", "meta-llama/Llama-3.1-70B"),
    "llama-3.1-405b": ("Llama-3.1-405B.json", "meta-llama/Llama-3.1-405B"),
    "mistral-7b": ("Mistral-7B-v0.1.json", "mistralai/Mistral-7B-v0.1"),
    "mixtral-8x7b": ("Mixtral-8x7B-v0.1.json", "mistralai/Mixtral-8x7B-v0.1"),
    "mixtral-8x22b": ("Mixtral-8x22B-v0.1.json", "mistralai/Mixtral-8x22B-v0.1"),
    "qwen2.5-7b": ("Qwen2.5-7B.json", "Qwen/Qwen2.5-7B"),
    "qwen2.5-72b": ("Qwen2.5-72B.json", "Qwen/Qwen2.5-72B"),
    "qwen3-8b": ("Qwen3-8B.json", "Qwen/Qwen3-8B"),
    "qwen3-14b": ("Qwen3-14B.json", "Qwen/Qwen3-14B"),
    "qwen3-32b": ("Qwen3-32B.json", "Qwen/Qwen3-32B"),
    "qwen3-30b-a3b": ("Qwen3-30B-A3B.json", "Qwen/Qwen3-30B-A3B"),
    "qwen3-235b-a22b": ("Qwen3-235B-A22B.json", "Qwen/Qwen3-235B-A22B"),
    "gemma-2-9b": ("gemma-2-9b.json", "google/gemma-2-9b"),
    "gemma-2-27b": ("gemma-2-27b.json", "google/gemma-2-27b"),
    "phi-3-mini": ("Phi-3-mini-4k-instruct.json", "microsoft/Phi-3-mini-4k-instruct"),
    "deepseek-v2-lite": ("DeepSeek-V2-Lite.json", "deepseek-ai/DeepSeek-V2-Lite"),
    "deepseek-v2": ("DeepSeek-V2.json", "deepseek-ai/DeepSeek-V2"),
    "deepseek-v3": ("DeepSeek-V3.json", "deepseek-ai/DeepSeek-V3"),
    "deepseek-r1": ("DeepSeek-R1.json", "deepseek-ai/DeepSeek-R1"),
    "kimi-k2": ("Kimi-K2-Instruct.json", "moonshotai/Kimi-K2-Instruct"),
    "gpt-oss-20b": ("gpt-oss-20b.json", "openai/gpt-oss-20b"),
    "gpt-oss-120b": ("gpt-oss-120b.json", "openai/gpt-oss-120b"),
    "llama-4-scout": ("Llama-4-Scout-17B-16E-Instruct.json", "meta-llama/Llama-4-Scout-17B-16E-Instruct"),
    "llava-1.5-7b": ("llava-1.5-7b-hf.json", "llava-hf/llava-1.5-7b-hf"),
    "gemma-3n-e2b": ("gemma-3n-E2B-text-partial.json", "google/gemma-3n-E2B"),
}

# Facts a config does not state, with where they come from.
NOTES = {
    "gemma-3n-e2b": "partial config (see ../shared/data/model_configs/README.md): per-layer embeddings, "
                    "AltUp and LAuReL weights are omitted, so weight bytes are a lower bound; KV is exact",
    "llama-4-scout": "text model only: the vision encoder's weights are not counted",
    "phi-3-mini": "sliding_window 2047 as in the config (older revisions say 2048)",
}


def compress(tokens: list[str]) -> list[dict]:
    """Run-length groups: at each point the repeated period (1..8) that covers the most layers."""
    groups, i = [], 0
    while i < len(tokens):
        best = (1, -1, 1)  # (covered layers, -period, repeats): one layer when nothing repeats
        for period in range(1, 9):
            pattern = tokens[i:i + period]
            if len(pattern) < period:
                break
            reps = 1
            while tokens[i + reps * period:i + (reps + 1) * period] == pattern:
                reps += 1
            if reps > 1:
                best = max(best, (reps * period, -period, reps))
        covered, neg_period, reps = best
        groups.append({"repeat": reps, "pattern": tokens[i:i - neg_period]})
        i += covered
    return groups


VENDORED = ROOT / "models" / "configs"


def config_path(file: str, configs: Path) -> Path:
    """A config the project vendors (models/configs/) before one in ``configs``."""
    vendored = VENDORED / file
    return vendored if vendored.is_file() else configs / file


def build(name: str, configs: Path) -> dict:
    file, repo = CATALOGUE[name]
    spec = model_from_hf_config(json.loads(config_path(file, configs).read_text()), name=name,
                                config_file=file, hf_repo=repo)
    spec["layers"] = compress(spec["layers"][0]["pattern"])
    if name in NOTES:
        spec["source"]["note"] = NOTES[name]
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=Path, default=ROOT.parent / "shared/data/model_configs")
    args = parser.parse_args()
    for name in CATALOGUE:
        spec = build(name, args.configs)
        header = (f"# {name}: generated by scripts/build_model_catalogue.py from {spec['source']['config']}\n"
                  f"# ({spec['source']['hf_repo']}); do not edit by hand.\n")
        text = yaml.safe_dump(spec, sort_keys=False, default_flow_style=None, width=100)
        (ROOT / "models" / f"{name}.yaml").write_text(header + text)
    print(f"wrote {len(CATALOGUE)} models to {ROOT / 'models'}")


if __name__ == "__main__":
    main()
