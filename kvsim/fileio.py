"""Output files are written whole or not at all, with the user's umask; YAML is read in one place."""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from collections.abc import Sequence
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kvsim.errors import KvsimError, schema_error


def umask() -> int:
    """The process umask."""
    # The only way to read the umask is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``. The file gets the
    mode an ordinary ``open`` would give it (``mkstemp`` alone makes it 0600)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as err:
        raise KvsimError(f"cannot write: {err.strerror or err}", file=str(path)) from None
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise KvsimError(f"cannot write: {err.strerror or err}", file=str(path)) from None
        raise


def check_writable(path: Path, field: str, folder: bool) -> None:
    """Fail before any work when ``path`` (a ``folder`` to write into, else a file) cannot be
    written: it is the wrong kind, a parent is a file, its name is too long, or the nearest existing
    folder refuses a new file (tried: permission bits do not tell, e.g. for root on /sys or /proc)."""
    try:
        if path.exists() and path.is_dir() != folder:
            raise KvsimError(f"is a {'file' if folder else 'folder'}, expected a {'folder' if folder else 'file'}",
                             field=field, value=str(path))
        existing = path
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        if existing != path and not existing.is_dir():
            raise KvsimError(f"{existing} is a file, not a folder", field=field, value=str(path))
        where = existing if existing.is_dir() else existing.parent
        fd, probe = tempfile.mkstemp(dir=where, prefix=".kvsim-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise KvsimError(f"cannot write there: {err.strerror or err}", field=field, value=str(path)) from None


# libyaml's C loader when PyYAML was built with it (about 9x faster on the calibration tables);
# the same safe subset of YAML either way.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_SAFE_LOADER):  # type: ignore[misc, valid-type]  # a base class picked at runtime
    """The safe loader, refusing a key written twice in one mapping (PyYAML keeps the last one
    silently, so a user's first value would be ignored)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` may be overridden by design
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # an unhashable key: the base constructor reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep)


# PyYAML resolves floats by YAML 1.1, where ``1e12`` and ``1.0e12`` (no dot, or no sign in the
# exponent) are strings; YAML 1.2 and every user read them as numbers.
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                       re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                       list("-+.0123456789"))


def load_yaml(text: str) -> object:
    """``yaml.safe_load``, with the C loader when available, YAML 1.2 exponent floats; a key given
    twice is an error."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a safe loader


def load_data_yaml(text: str) -> dict[str, Any]:
    """One of kvsim's own data files (kvsim/data/...): a YAML mapping at the top level."""
    data = load_yaml(text)
    if not isinstance(data, dict):
        raise TypeError(f"kvsim data file: expected a mapping at the top level, not {type(data).__name__}")
    return data


def data_file(path: str) -> Traversable:
    """kvsim's own data file ``path``, named as code, reports and comments cite it (``kvsim/data/...``),
    read from the installed package (a wheel or a checkout alike)."""
    from importlib import resources

    package, _, inside = path.partition("/")
    if package != "kvsim" or not inside.startswith("data/"):
        raise ValueError(f"not one of kvsim's data files: {path}")
    return resources.files("kvsim").joinpath(*inside.split("/"))


def load_data_file(path: str) -> dict[str, Any]:
    """The top-level mapping of kvsim's own data file ``path`` (``kvsim/data/...``)."""
    return load_data_yaml(data_file(path).read_text(encoding="utf-8"))


def read_yaml_file(path: Path, what: str) -> dict:
    """A YAML file's top-level mapping. Unreadable, non-UTF-8, invalid YAML (its position and
    problem) or not a mapping: one KvsimError naming the file and what kind of file was expected."""
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise KvsimError(f"cannot read {what}: {err.strerror or err}", file=str(path)) from None
    except UnicodeDecodeError as err:
        raise KvsimError(f"{what} is not UTF-8 text (byte {err.start})", file=str(path)) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise KvsimError(f"not valid YAML{where}: {err.problem} (expected {what})", file=str(path)) from None
    except yaml.YAMLError as err:
        raise KvsimError(f"not valid YAML: {err} (expected {what})".replace("\n", " "), file=str(path)) from None
    if not isinstance(data, dict):
        raise KvsimError(f"expected {what}: a mapping of keys at the top level, not "
                         f"{type(data).__name__}", file=str(path))
    return data


def read_csv_rows(path: Path, what: str, required: Sequence[str] = ()) -> list[dict[str, str]]:
    """A CSV file's rows as text mappings. Unreadable, non-UTF-8, malformed, short rows, or a
    missing ``required`` column: one KvsimError naming the file and what kind of file was expected."""
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except OSError as err:
        raise KvsimError(f"cannot read {what}: {err.strerror or err}", file=str(path)) from None
    except UnicodeDecodeError as err:
        raise KvsimError(f"{what} is not UTF-8 text (byte {err.start})", file=str(path)) from None
    except csv.Error as err:
        raise KvsimError(f"not a valid CSV ({what}): {err}", file=str(path)) from None
    missing = [c for c in required if c not in header]
    if missing:
        raise KvsimError(f"not {what}: no column {', '.join(missing)}", field="header",
                         value=",".join(header), file=str(path))
    for i, row in enumerate(rows):
        if None in row or None in row.values():
            raise KvsimError(f"row has {'more' if None in row else 'fewer'} cells than the header ({what})",
                             field=f"row {i + 2}", value=None, file=str(path))
    return rows


def read_checked_json(path: Path, what: str, schema: type[BaseModel]) -> dict:
    """A JSON object file checked against ``schema`` (a damaged file is one error naming the file
    and what kind of file was expected); the document as read."""
    doc = read_json_file(path, what)
    try:
        schema.model_validate(doc)
    except ValidationError as err:
        raise schema_error(err, str(path), what=what) from None
    assert isinstance(doc, dict)  # validated as a pydantic model: a JSON object
    return doc


def read_json_file(path: Path, what: str) -> object:
    """A JSON file's content; unreadable, non-UTF-8 or invalid JSON: one KvsimError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise KvsimError(f"cannot read {what}: {err.strerror or err}", file=str(path)) from None
    except UnicodeDecodeError as err:
        raise KvsimError(f"{what} is not UTF-8 text (byte {err.start})", file=str(path)) from None
    except json.JSONDecodeError as err:
        raise KvsimError(f"not valid JSON ({what}) at line {err.lineno}, column {err.colno}: {err.msg}",
                         file=str(path)) from None


def write_or_check_fit(out: Path, header: str, data: dict, check: bool) -> None:
    """The end of a fitting script: write the data file it fits (``header``: its comment lines, then
    ``data`` as YAML, whole or not at all), or with ``check`` write nothing and exit 1 unless the
    committed file equals ``data`` (tests and CI keep such files fresh). ``data`` holds one section
    whose ``source`` says what was fitted."""
    import sys

    if check:
        fresh = out.is_file() and load_data_yaml(out.read_text(encoding="utf-8")) == data
        print("the committed fit is current" if fresh else f"{out} differs from a fresh fit")
        sys.exit(0 if fresh else 1)
    write_atomic(out, header + yaml.safe_dump(data, sort_keys=False, width=110))
    print(f"wrote {out}: {next(iter(data.values()))['source']}")
