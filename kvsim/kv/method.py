"""What a KV method is, and how ``NAME[:k=v[,k=v]]`` specs stacked with ``+`` become a layout.

A method is a small frozen dataclass: a name, typed parameters with defaults, the paper it comes
from, and one pure function ``apply(layout, params) -> layout``. Methods of a stack are applied in
order of their stage (structure, then eviction, then precision, then placement, then serving), so
``kivi:bits=2+snapkv:budget=2048`` and ``snapkv:budget=2048+kivi:bits=2`` give the same layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import IntEnum
from types import MappingProxyType

from kvsim.errors import KvsimError, unknown_name
from kvsim.kv.layout import KVLayout, baseline_layout
from kvsim.spec.model import ModelSpec

# A parsed method parameter: Param.kind converts the raw text to one of these.
ParamValue = int | float | str | bool
Params = Mapping[str, ParamValue]


class Stage(IntEnum):
    """Order in which stacked methods apply; each stage admits one method, except structure."""

    STRUCTURE = 10  # which layers own KV, head counts and dims
    EVICTION = 20  # which tokens are kept
    PRECISION = 30  # how each element is stored
    PLACEMENT = 40  # which tier holds which tokens
    SERVING = 50  # how caches are shared between requests


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # int, float, str or bool
    default: ParamValue | None = None  # None: required
    choices: tuple[str, ...] = ()
    minimum: float | None = None  # inclusive
    maximum: float | None = None  # inclusive
    doc: str = ""


@dataclass(frozen=True)
class Method:
    name: str
    stage: Stage
    summary: str
    source: str  # arXiv id or engine documentation
    params: tuple[Param, ...]
    apply: Callable[[KVLayout, Params], KVLayout]
    example: str  # a spec that exercises the method (used by docs and tests)
    compresses_after_prefill: bool = False  # eviction: the full prompt exists during prefill
    alias_of: str = ""  # another method under other parameters, where kvsim does not model what differs


@dataclass(frozen=True)
class MethodCall:
    method: Method
    params: Params

    @property
    def spec(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.method.name}:{args}" if args else self.method.name


def _convert(method: Method, param: Param, raw: str, file: str | None) -> ParamValue:
    field = f"method.{method.name}.{param.name}"
    try:
        if param.kind is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            value: ParamValue = raw.lower() in ("true", "1")
        else:
            value = param.kind(raw)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError  # nan slips past every bound check, inf past a missing maximum
            if isinstance(value, int) and not -(2**63) < value < 2**63:
                raise ValueError  # token counts become int64 arrays
    except ValueError:
        kind = {float: "float (finite)", int: "int (64-bit)"}.get(param.kind, param.kind.__name__)
        raise KvsimError(f"expected {kind}", field=field, value=raw, file=file) from None
    if param.choices and value not in param.choices:
        raise KvsimError(f"must be one of {', '.join(param.choices)}", field=field, value=raw, file=file)
    # minimum and maximum bound int and float parameters
    if param.minimum is not None and isinstance(value, (int, float)) and value < param.minimum:
        raise KvsimError(f"must be >= {param.minimum}", field=field, value=raw, file=file)
    if param.maximum is not None and isinstance(value, (int, float)) and value > param.maximum:
        raise KvsimError(f"must be <= {param.maximum}", field=field, value=raw, file=file)
    return value


def parse_one(text: str, registry: Mapping[str, Method], file: str | None = None) -> MethodCall:
    name, _, args = text.strip().partition(":")
    name = name.strip().lower()
    if name not in registry:
        raise unknown_name("KV method", name, registry, field="method", file=file)
    method = registry[name]
    known = {p.name: p for p in method.params}
    values: dict[str, ParamValue] = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not raw.strip():
            raise KvsimError("parameters are written key=value", field=f"method.{name}", value=item, file=file)
        if key not in known:
            raise unknown_name(f"parameter of {name}", key, known, field=f"method.{name}", file=file)
        if key in values:
            raise KvsimError("parameter given twice", field=f"method.{name}.{key}", value=raw.strip(), file=file)
        values[key] = _convert(method, known[key], raw.strip(), file)
    for p in method.params:
        if p.name not in values:
            if p.default is None:
                raise KvsimError(f"{name} needs {p.name}=... ({p.doc})", field=f"method.{name}.{p.name}",
                                 value=None, file=file)
            values[p.name] = p.default
    return MethodCall(method, MappingProxyType(values))


def parse_spec(spec: str, registry: Mapping[str, Method], file: str | None = None) -> tuple[MethodCall, ...]:
    """Parse ``snapkv:budget=2048+kivi:bits=2`` into calls sorted by stage."""
    if not spec or not spec.strip():
        raise KvsimError("empty method spec", field="method", value=spec, file=file)
    calls = [parse_one(part, registry, file) for part in spec.split("+")]
    seen: dict[Stage, str] = {}
    for call in calls:
        stage = call.method.stage
        if stage != Stage.STRUCTURE and stage in seen:
            raise KvsimError(f"{seen[stage]} and {call.method.name} both set the {stage.name.lower()} "
                             "of the cache; stack at most one of each", field="method", value=spec, file=file)
        seen[stage] = call.method.name
    return tuple(sorted(calls, key=lambda c: c.method.stage))


def build_layout(model: ModelSpec, calls: tuple[MethodCall, ...]) -> KVLayout:
    """Apply a parsed stack to the model's baseline layout."""
    layout = baseline_layout(model)
    # Linear-attention / state-space layers hold a per-sequence state, not KV: no KV method applies to it.
    stateful = {layer.index: layer for layer in layout.layers if layer.kind in ("state", "none")}
    prefill: KVLayout | None = None
    for call in calls:
        if call.method.compresses_after_prefill and prefill is None:
            prefill = layout
        if stateful and call.method.stage in (Stage.STRUCTURE, Stage.PLACEMENT):  # they rework every layer
            raise KvsimError(f"{call.method.name} reworks every layer's KV, but {len(stateful)} of "
                             f"{model.name}'s layers are linear-attention/state-space layers without one",
                             field="method", value=call.spec)
        layout = call.method.apply(layout, call.params)
        if any(layout.layers[i] != layer for i, layer in stateful.items()):
            raise KvsimError(f"{call.method.name} would rewrite the per-sequence state of {model.name}'s "
                             f"{len(stateful)} linear-attention/state-space layers, which are not a KV cache",
                             field="method", value=call.spec)
        if prefill is not None and not call.method.compresses_after_prefill:
            # Precision/placement apply to the prefill view too (the prompt is quantized as written).
            prefill = call.method.apply(prefill, call.params)
    return replace(layout, methods=tuple(c.spec for c in calls), prefill=prefill)
