"""kvsim: how much KV-cache memory an LLM deployment needs and how fast it will serve.

The public Python API (docs/api.md), imported on first use so that ``import kvsim`` stays cheap:

* :func:`plan_memory` — one replica's memory plan (``kvsim memory``);
* :func:`predict` — decode-step and prefill times from the calibrated roofline (``kvsim predict``);
* :func:`run_scenario` — simulate a serving scenario (``kvsim run``); :func:`write_outputs` writes
  its files;
* :func:`load_model`, :func:`load_hardware` — catalogue entries or files as specs;
* :class:`KvsimError` — bad input, with the one line the CLI prints.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {"plan_memory": "kvsim.api", "predict": "kvsim.api", "run_scenario": "kvsim.api",
            "write_outputs": "kvsim.scenario", "load_model": "kvsim.spec.model",
            "load_hardware": "kvsim.spec.hardware", "KvsimError": "kvsim.errors"}
__all__ = ["KvsimError", "__version__", "load_hardware", "load_model", "plan_memory", "predict", "run_scenario",
           "write_outputs"]

if TYPE_CHECKING:
    from kvsim.api import plan_memory, predict, run_scenario
    from kvsim.errors import KvsimError
    from kvsim.scenario import write_outputs
    from kvsim.spec.hardware import load_hardware
    from kvsim.spec.model import load_model


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvsim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
