"""Reading scenarios: YAML -> raw mapping -> ``--set`` overrides -> validated :class:`Scenario`."""

from __future__ import annotations

import copy
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from kvsim.errors import KvsimError, schema_error
from kvsim.fileio import load_yaml, read_yaml_file
from kvsim.scenario.schema import MAX_REQUESTS, LengthSpec, ScenarioSpec, WorkloadSpec

SWEEP_KEY = "sweep"  # read by `kvsim sweep`; kept aside here


@dataclass(frozen=True)
class Scenario:
    """A validated scenario: the typed spec, the file it came from (errors and relative paths),
    the raw mapping it was validated from (to re-apply overrides) and the ``sweep:`` block."""

    spec: ScenarioSpec
    file: str
    raw: dict = field(repr=False)
    sweep: dict | None = None

    @property
    def folder(self) -> Path:
        """Folder that relative paths in the file are resolved against."""
        return Path(self.file).resolve().parent if Path(self.file).is_file() else Path.cwd()


def scenario_from_dict(raw: dict, file: str) -> Scenario:
    """Validate a raw scenario mapping (as read from YAML). A top-level ``sweep:`` key is kept
    aside in ``Scenario.sweep``. Errors name the dotted key, the value and ``file``."""
    if not isinstance(raw, dict):
        raise KvsimError("expected a mapping at the top level", value=type(raw).__name__, file=file)
    body = {k: v for k, v in raw.items() if k != SWEEP_KEY}
    sweep = raw.get(SWEEP_KEY)
    if sweep is not None and not isinstance(sweep, dict):
        raise KvsimError("expected a mapping", field=SWEEP_KEY, value=sweep, file=file)
    try:
        spec = ScenarioSpec.model_validate(body)
    except ValidationError as err:
        raise schema_error(err, file, what="a scenario YAML: see docs/scenario.md") from None
    _check(spec, file)
    return Scenario(spec, file, copy.deepcopy(body), copy.deepcopy(sweep))


def _check(spec: ScenarioSpec, file: str) -> None:
    """Rules that span several keys."""
    w, e = spec.workload, spec.engine
    sources = [k for k in ("trace", "synthetic", "closed_loop") if getattr(w, k) is not None]
    if len(sources) != 1:
        raise KvsimError("give exactly one of workload.trace, workload.synthetic and workload.closed_loop",
                         field="workload", value=sources, file=file)
    if w.closed_loop is not None:
        for name in ("input", "output"):
            _check_length(getattr(w.closed_loop, name), f"workload.closed_loop.{name}", file)
        changed = [k for k in ("rate", "rate_scale", "start_s", "end_s", "max_requests", "images_per_request")
                   if getattr(w, k) != WorkloadSpec.model_fields[k].default]
        if changed:  # a closed loop has no arrival times to scale or cut
            raise KvsimError("does not apply to a closed loop (use closed_loop.num_requests)",
                             field=f"workload.{changed[0]}", value=getattr(w, changed[0]), file=file)
    if w.rate is not None and w.synthetic is not None:
        raise KvsimError("a synthetic stream's rate is workload.synthetic.rate", field="workload.rate",
                         value=w.rate, file=file)
    if w.rate is not None and "rate_scale" in w.model_fields_set:
        raise KvsimError("give workload.rate (requests/s) or workload.rate_scale (x the trace's rate), not both",
                         field="workload.rate", value=w.rate, file=file)
    if w.end_s is not None and w.end_s <= w.start_s:
        raise KvsimError(f"must be greater than workload.start_s={w.start_s}", field="workload.end_s",
                         value=w.end_s, file=file)
    if spec.disaggregation is not None and spec.replicas != 1:
        raise KvsimError("a disaggregated deployment's instances are disaggregation.prefill.replicas and "
                         "disaggregation.decode.replicas", field="replicas", value=spec.replicas, file=file)
    budget, seqs = e.max_num_batched_tokens, e.max_num_seqs
    if budget is not None and seqs is not None and budget < seqs:
        # vLLM refuses this too: every running sequence must be able to decode in one step.
        raise KvsimError(f"must be >= engine.max_num_seqs={e.max_num_seqs}",
                         field="engine.max_num_batched_tokens", value=e.max_num_batched_tokens, file=file)
    s = w.synthetic
    if s is not None:
        if s.num_requests is None and s.duration_s is None and w.max_requests is None and w.end_s is None:
            raise KvsimError("a synthetic stream is endless: give num_requests or duration_s",
                             field="workload.synthetic", value=None, file=file)
        seconds = min(x for x in (s.duration_s, w.end_s, math.inf) if x is not None)
        if s.num_requests is None and w.max_requests is None and s.rate * seconds > MAX_REQUESTS:
            raise KvsimError(f"rate {s.rate:g}/s for {seconds:g} s is over {MAX_REQUESTS:,} requests, more "
                             "than one run simulates; lower the rate or the duration",
                             field="workload.synthetic.duration_s", value=s.duration_s, file=file)
        if s.paired_lengths_from is None and (s.input is None or s.output is None):
            raise KvsimError("give input and output, or paired_lengths_from", field="workload.synthetic",
                             value=None, file=file)
        for name in ("input", "output"):
            if getattr(s, name) is not None:
                _check_length(getattr(s, name), f"workload.synthetic.{name}", file)
        if s.sessions is not None:
            _check_length(s.sessions.turns, "workload.synthetic.sessions.turns", file)
            if s.sessions.follow_up is not None:
                _check_length(s.sessions.follow_up, "workload.synthetic.sessions.follow_up", file)
            elif s.input is None:
                raise KvsimError("give follow_up when lengths come from paired_lengths_from",
                                 field="workload.synthetic.sessions.follow_up", value=None, file=file)


def _check_length(spec: LengthSpec, where: str, file: str) -> None:
    kind = spec.kind
    given = {k for k in ("tokens", "mean", "sigma", "p50", "p90", "trace")
             if getattr(spec, k) is not None}
    allowed = {"fixed": [{"tokens"}], "lognormal": [{"mean", "sigma"}, {"p50", "p90"}],
               "empirical": [{"trace"}]}[kind]
    if given not in allowed:
        want = " or ".join("+".join(sorted(a)) for a in allowed)
        raise KvsimError(f"a {kind} length needs {want}", field=where, value=sorted(given), file=file)
    if kind == "lognormal" and spec.p50 is not None and spec.p90 is not None and spec.p90 < spec.p50:
        raise KvsimError("must be >= p50", field=f"{where}.p90", value=spec.p90, file=file)


def load_raw(path: str | Path, sets: Sequence[str] = ()) -> dict:
    """A scenario YAML as a mapping (its ``sweep:`` block included), with ``--set key=value``
    overrides applied (values parsed as YAML scalars); ``kvsim run`` and ``kvsim sweep`` share it."""
    path = Path(path)
    if not path.is_file():
        raise KvsimError("no such scenario file", field="scenario", value=str(path))
    return apply_sets(read_yaml_mapping(path), sets, str(path))


def apply_sets(raw: dict, sets: Sequence[str], file: str) -> dict:
    """``raw`` with ``key=value`` overrides applied (values parsed as YAML scalars)."""
    for item in sets:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise KvsimError("write overrides as key=value", field="--set", value=item, file=file)
        try:
            value = load_yaml(text)
        except yaml.YAMLError:
            raise KvsimError("value is not a YAML scalar", field=key.strip(), value=text,
                             file=file) from None
        raw = apply_override(raw, key.strip(), value, file=file)
    return raw


def load_scenario(path: str | Path, sets: Sequence[str]) -> Scenario:
    """Read a scenario YAML, apply ``--set`` overrides, validate. The ``sweep:`` block is kept
    aside for ``kvsim sweep``."""
    return scenario_from_dict(load_raw(path, sets), str(Path(path)))


def read_yaml_mapping(path: Path) -> dict:
    """A scenario file's top-level mapping; a syntax error becomes one line with its position."""
    return read_yaml_file(path, "a scenario YAML")


def apply_override(raw: dict, dotted: str, value: object, file: str | None = None) -> dict:
    """A copy of ``raw`` with the field at ``dotted`` (e.g. ``engine.max_num_seqs``) set to
    ``value``; missing parent mappings are created. KvsimError if the path names no field."""
    parts = dotted.split(".")
    model: type[BaseModel] | None = ScenarioSpec
    for i, part in enumerate(parts):
        if model is None or part not in model.model_fields:
            known = sorted(model.model_fields) if model is not None else []
            where = ".".join(parts[:i]) or "the scenario"
            hint = f"; {where} has {', '.join(known)}" if known else f"; {where} has no sub-fields"
            raise KvsimError(f"no such field{hint}", field=dotted, value=value, file=file)
        model = _submodel(model.model_fields[part].annotation)
    out = copy.deepcopy(raw)
    node = out
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value
    return out


def _submodel(annotation: object) -> type[BaseModel] | None:
    """The pydantic model inside ``X`` or ``X | None``, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            sub = _submodel(arg)
            if sub is not None:
                return sub
    return None


def resolve_path(text: str, scenario: Scenario) -> Path:
    """A path from the scenario: ``shared:NAME`` is NAME in the shared traces folder
    ($KVSIM_SHARED_DATA, or ../shared/data/traces beside the checkout); a relative path is taken
    from the scenario file's folder."""
    if text.startswith("shared:"):
        from kvsim.serve.traces import shared_traces_dir

        root = shared_traces_dir()
        if root is None:
            raise KvsimError("the shared traces folder is absent (set KVSIM_SHARED_DATA)",
                             field="workload.trace", value=text, file=scenario.file)
        return root / text.removeprefix("shared:")
    p = Path(text).expanduser()
    return p if p.is_absolute() else scenario.folder / p
