"""User-facing errors: one line naming the field, the value and the file; the CLI exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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


def unknown_name(kind: str, name: str, known: Iterable[str], *, field: str,
                 file: str | None = None) -> KvsimError:
    """Error for an unknown catalogue name, suggesting the closest known names."""
    known = sorted(known)
    close = difflib.get_close_matches(name.lower(), known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(known)}"
    return KvsimError(f"unknown {kind}; {hint}", field=field, value=name, file=file)
