"""Output files are written whole or not at all."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import yaml


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# libyaml's C loader when PyYAML was built with it (about 9x faster on the calibration tables);
# the same safe subset of YAML either way.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_SAFE_LOADER):  # type: ignore[misc, valid-type]
    """PyYAML resolves floats by YAML 1.1, where ``1e12`` and ``1.0e12`` (no dot, or no sign in the
    exponent) are strings; YAML 1.2 and every user read them as numbers."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
                              list("-+.0123456789"))


def load_yaml(text: str) -> object:
    """``yaml.safe_load``, with the C loader when available and YAML 1.2 exponent floats."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a safe loader
