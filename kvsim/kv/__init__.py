"""KV methods: one explicit registry mapping names to methods, and the layout of a stack."""

from __future__ import annotations

from types import MappingProxyType

from kvsim.kv import eviction, offload, precision, sharing
from kvsim.kv.layout import KVLayout
from kvsim.kv.method import Method, MethodCall, build_layout, parse_spec
from kvsim.spec.model import ModelSpec

METHODS: MappingProxyType[str, Method] = MappingProxyType(
    {m.name: m for family in (precision, eviction, sharing, offload) for m in family.METHODS})

DEFAULT_METHOD = "bf16"


def parse(spec: str, file: str | None = None) -> tuple[MethodCall, ...]:
    """Parse ``NAME[:k=v,...][+NAME...]`` against the registry."""
    return parse_spec(spec, METHODS, file)


def layout_for(model: ModelSpec, spec: str = DEFAULT_METHOD, file: str | None = None) -> KVLayout:
    """The KV layout of ``model`` under the method stack ``spec``."""
    return build_layout(model, parse(spec, file))
