"""User-facing errors: one line naming the field, the value and the file; the CLI exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class KvsimError(Exception):
    """A problem with the user's input. ``str(err)`` is the one line the CLI prints."""

    def __init__(self, message: str, *, field: str | None = None, value: object = None,
                 file: str | None = None) -> None:
        self.field = field
        self.value = value
        self.file = file
        where = f"{file}: " if file else ""
        # A missing or absent value is named by its field alone ("name: missing", not "name=None").
        what = "" if field is None else f"{field}: " if value is None else f"{field}={value!r}: "
        super().__init__(f"{where}{what}{message}")


class DoesNotFit(KvsimError):
    """The deployment does not fit in GPU memory: a result for a sweep point or a search
    configuration (it cannot serve), an error for a single run."""


def unknown_name(kind: str, name: str, known: Iterable[str], *, field: str,
                 file: str | None = None) -> KvsimError:
    """Error for an unknown catalogue name, suggesting the closest known names."""
    known = sorted(known)
    close = difflib.get_close_matches(name.lower(), known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(known)}"
    return KvsimError(f"unknown {kind}; {hint}", field=field, value=name, file=file)


SHOWN_ERRORS = 5  # a file with more schema errors lists this many, then how many more


def schema_error(err: ValidationError, file: str | None, prefix: Sequence[str] = (),
                 unknown_hint: str = "", what: str = "") -> KvsimError:
    """Every problem pydantic found in a file, in one line: the first few as ``key=value: message``
    (dotted keys under ``prefix``), then how many more, so a user fixes them all in one pass.
    ``field`` and ``value`` are those of the first problem; ``what``, the kind of file expected, is
    named when a required key is missing (pydantic's input there is the whole enclosing mapping,
    so only the key is named)."""
    problems = []
    for e in err.errors():
        field = ".".join([*prefix, *(str(p) for p in e["loc"])]) or "<root>"
        if e["type"] == "extra_forbidden":
            problems.append(KvsimError(f"unknown key{unknown_hint}", field=field, value=e["input"]))
        elif e["type"] == "missing":
            problems.append(KvsimError(f"missing required key{f' (expected {what})' if what else ''}", field=field,
                                       value=None))
        elif e["type"] == "string_type" and type(e.get("input")) in (int, float):
            # YAML reads 0.13 (in a file or a --set value) as a number: a version must be quoted, and 0.10
            # would otherwise become 0.1
            problems.append(KvsimError(f"expected text; quote it, e.g. \"{e['input']}\" (YAML reads it as a number)",
                                       field=field, value=e["input"]))
        else:
            problems.append(KvsimError(e["msg"].removeprefix("Value error, "), field=field, value=e.get("input")))
    first = problems[0]
    if len(problems) == 1:
        named = f"{first.field}: " if first.value is None else f"{first.field}={first.value!r}: "
        return KvsimError(str(first).removeprefix(named), field=first.field, value=first.value, file=file)
    more = len(problems) - SHOWN_ERRORS
    text = "; ".join(str(p) for p in problems[:SHOWN_ERRORS]) + (f"; and {more} more" if more > 0 else "")
    err_out = KvsimError(f"{len(problems)} problems: {text}", file=file)
    err_out.field, err_out.value = first.field, first.value
    return err_out
