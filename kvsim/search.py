"""Capacity search (``kvsim search``): the highest request rate each configuration of a sweep
sustains within its SLOs, and the cheapest configuration that meets a target rate.

A configuration is one point of the scenario's ``sweep:`` section (GPU kind x TP x method x ...).
A rate *passes* when the simulated goodput (the fraction of requests that meet both the TTFT and
the TPOT SLO) is at least ``sweep.search.min_goodput``. From the scenario's own rate the search
doubles the rate until one fails (or halves it until one passes), then bisects geometrically
between the highest passing and the lowest failing rate until they are within ``tolerance`` of each
other (default 5%: the reported rate is at most 5% below the threshold, never above it, as long as
goodput falls monotonically with rate). The rate knob is ``workload.synthetic.rate`` (requests/s)
for synthetic workloads and ``workload.rate`` (requests/s, the trace's arrivals rescaled) for traces;
a closed loop is refused (its concurrency, not a rate, sets its load).

Cost of a configuration: GPUs per replica x price per GPU-hour (hardware catalogue) / the rate one
replica sustains; for a target rate, replicas = ceil(target / rate per replica).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvsim.backends import Backend, execute
from kvsim.errors import DoesNotFit, KvsimError
from kvsim.fileio import check_writable
from kvsim.sweep import RATE_PATHS, Point, SearchConfig, SearchSpace, SweepPlan, check_point, point_key

TRACE_RATE = "workload.rate"  # a trace's offered requests/s (kvsim.scenario.run.workload rescales the trace)

# What stops a configuration from going faster (the SLO it misses first, or why it cannot run).
# Calibration kinds measured on the GPU itself (by kvsim, or imported from a kernel database); a
# borrowed profile, the prior or the bare roofline ranks after them.
CALIBRATED = ("measured", "imported")
LIMITS = {"memory": "KV-cache memory", "ttft": "TTFT SLO", "tpot": "TPOT SLO",
          "error": "simulation error", "rate_max": "none up to rate_max"}


@dataclass(frozen=True)
class Probe:
    """One simulated rate and its verdict."""

    rate: float
    passes: bool
    goodput: float | None
    limit: str  # "" when it passes, else a key of LIMITS
    detail: str


@dataclass(frozen=True)
class RateSearch:
    """The outcome of a bisection: ``rate`` passes (0 when even ``rate_lo`` fails), ``fail_rate``
    fails (None when ``rate_max`` passes), ``limit``/``detail`` say why ``fail_rate`` fails."""

    rate: float
    fail_rate: float | None
    limit: str
    detail: str
    probes: tuple[Probe, ...]


def bisect_rate(evaluate: Callable[[float], Probe], rate_start: float, rate_min: float, rate_max: float,
                tolerance: float) -> RateSearch:
    """Highest rate in [rate_min, rate_max] for which ``evaluate`` passes, to a relative ``tolerance``.

    From ``rate_start`` the rate doubles while it passes (or halves while it fails), then geometric
    bisection closes the bracket: about |log2(rate/rate_start)| + log2(log 2 / log(1 + tolerance))
    evaluations (10 from 0.25 to 7.3 requests/s at 5%).
    """
    if not 0 < rate_min <= rate_start <= rate_max:
        raise KvsimError(f"need 0 < rate_min <= rate_start <= rate_max (rate_min={rate_min:g}, "
                         f"rate_max={rate_max:g})", field="sweep.search.rate_start", value=rate_start)
    probes: list[Probe] = []

    def run(rate: float) -> Probe:
        probes.append(evaluate(rate))
        return probes[-1]

    first = run(rate_start)
    ok: Probe | None = first if first.passes else None
    failing: Probe | None = None if first.passes else first
    while ok is None:  # halve until a rate passes
        assert failing is not None  # one of ok and failing is set
        if failing.rate <= rate_min:
            return RateSearch(0.0, failing.rate, failing.limit, failing.detail, tuple(probes))
        p = run(max(failing.rate / 2, rate_min))
        ok, failing = (p, failing) if p.passes else (None, p)
    while failing is None:  # double until a rate fails
        assert ok is not None
        if ok.rate >= rate_max:
            return RateSearch(ok.rate, None, "rate_max", f"meets the SLOs up to rate_max={rate_max:g}",
                              tuple(probes))
        p = run(min(2 * ok.rate, rate_max))
        ok, failing = (p, None) if p.passes else (ok, p)
    while (failing.rate - ok.rate) / ok.rate > tolerance:
        p = run(math.sqrt(ok.rate * failing.rate))
        ok, failing = (p, failing) if p.passes else (ok, p)
    return RateSearch(ok.rate, failing.rate, failing.limit, failing.detail, tuple(probes))


# ---------------------------------------------------------------- one configuration, simulated

def rate_path(raw: Mapping[str, Any], cfg: SearchConfig) -> str:
    """The dotted path the search varies: configured, else the synthetic rate, else the trace's
    rate in requests per second (``workload.rate``)."""
    if cfg.rate_path:
        return cfg.rate_path
    workload = raw.get("workload") or {}
    # `synthetic: null` (e.g. --set workload.synthetic=null beside a trace) is no synthetic stream
    return "workload.synthetic.rate" if isinstance(workload, Mapping) and workload.get("synthetic") is not None \
        else TRACE_RATE


def start_rate(raw: Mapping[str, Any], path: str, cfg: SearchConfig, file: str = "") -> float:
    """``rate_start``, else the scenario's own value at the rate path (for ``workload.rate`` unset:
    the trace's own rate x its rate_scale; else 1), within bounds."""
    if cfg.rate_start is not None:
        return cfg.rate_start
    node: Any = raw
    for part in path.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    if isinstance(node, (int, float)):
        value = float(node)
    elif path == TRACE_RATE:
        from kvsim.scenario import scenario_from_dict
        from kvsim.scenario.load import resolve_path
        from kvsim.scenario.run import trace_rate_per_s

        scenario = scenario_from_dict(dict(raw), file)
        w = scenario.spec.workload
        assert w.trace is not None  # check_searchable refuses workload.rate for other workloads
        value = trace_rate_per_s(scenario, resolve_path(w.trace, scenario)) * w.rate_scale
    else:
        value = 1.0
    return min(max(value, cfg.rate_min), cfg.rate_max)


def judge(summary: Mapping[str, Any], min_goodput: float) -> tuple[bool, float | None, str, str]:
    """(passes, goodput, limit, detail) of one run summary.

    ``goodput`` is the fraction of requests meeting both SLOs; when it falls short, the limit is
    memory if too many requests can never fit the KV cache (rejected at any rate), else the SLO
    met by fewer requests (``slo_attainment.ttft`` / ``.tpot``). A deployment whose weights do not
    fit never gets here: its run raises (see :func:`evaluate_rate`).
    """
    goodput = summary.get("goodput")
    if not isinstance(goodput, (int, float)):
        raise KvsimError("run summary has no numeric goodput: the scenario needs an `slo:` section",
                         field="goodput", value=goodput)
    if goodput >= min_goodput:
        return True, float(goodput), "", f"goodput {goodput:.1%}"
    too_big = (summary.get("rejected") or {}).get("by_reason", {}).get("exceeds_kv_cache", 0)
    if too_big > (1 - min_goodput) * summary.get("requests", 0):  # these fail at any rate
        return False, float(goodput), "memory", (f"{too_big} of {summary['requests']} requests need more KV "
                                                 f"blocks than the {summary['num_gpu_blocks']} there are")
    attain = summary.get("slo_attainment") or {}
    ttft, tpot = attain.get("ttft"), attain.get("tpot")
    limit = "ttft" if ttft is not None and (tpot is None or ttft <= tpot) else "tpot"
    return False, float(goodput), limit, f"{slo_miss(summary, limit)}; goodput {goodput:.1%} < {min_goodput:.0%}"


def slo_miss(summary: Mapping[str, Any], limit: str) -> str:
    """``TTFT p90 612 ms > SLO 500 ms (met by 81.0%)``: the limiting SLO's p90 against its target
    and the share of requests within it (the p90 is the percentile the default min_goodput of 90%
    asks for; a run can miss the goodput with both p90s inside their SLOs, when different requests
    miss each one)."""
    name, digits = ("TTFT", 0) if limit == "ttft" else ("TPOT", 1)
    p90 = (summary.get(f"{limit}_s") or {}).get("p90")
    target = (summary.get("slo") or {}).get(f"{limit}_s")
    met = (summary.get("slo_attainment") or {}).get(limit)
    if not isinstance(p90, (int, float)) or not isinstance(target, (int, float)):
        return f"{name} SLO met by {met:.1%}" if isinstance(met, (int, float)) else f"{name} SLO"
    sign = ">" if p90 > target else "<="
    return (f"{name} p90 {p90 * 1e3:.{digits}f} ms {sign} SLO {target * 1e3:.{digits}f} ms"
            + (f" (met by {met:.1%})" if isinstance(met, (int, float)) else ""))


def at_rate(raw: Mapping[str, Any], path: str, rate: float, min_requests: int) -> dict:
    """The scenario offered ``rate``; a synthetic stream given by duration is stretched to at least
    ``min_requests`` requests (so low rates are not judged on a handful of requests)."""
    from kvsim.scenario import apply_override

    if path == TRACE_RATE and "rate_scale" in (raw.get("workload") or {}):  # the rate replaces the scale
        raw = {**raw, "workload": {k: v for k, v in raw["workload"].items() if k != "rate_scale"}}
    out = apply_override(dict(raw), path, rate)
    synthetic = (out.get("workload") or {}).get("synthetic") or {}
    if path == "workload.synthetic.rate" and synthetic.get("duration_s"):
        duration_s = max(synthetic["duration_s"], min_requests / rate)
        out = apply_override(out, "workload.synthetic.duration_s", duration_s)
    return out


def evaluate_rate(raw: Mapping[str, Any], file: str, path: str, rate: float, min_goodput: float,
                  min_requests: int = 1) -> Probe:
    """Simulate one configuration at one rate. A scenario error is a failed probe, not a crash."""
    from kvsim.scenario import run_scenario, scenario_from_dict

    try:
        result = run_scenario(scenario_from_dict(at_rate(raw, path, rate, min_requests), file))
    except KvsimError as err:  # the file is the search's own scenario: its name adds nothing here
        text = str(err).removeprefix(f"{err.file}: ") if err.file else str(err)
        return Probe(rate, False, None, "memory" if isinstance(err, DoesNotFit) else "error", text)
    passes, goodput, limit, detail = judge(result.summary, min_goodput)
    return Probe(rate, passes, goodput, limit, detail)


def search_config(raw: Mapping[str, Any], file: str, cfg: Mapping[str, Any]) -> dict:
    """Worker: bisect one configuration's rate. Takes and returns plain data (process pool, Ray)."""
    config = SearchConfig(**cfg)
    path = rate_path(raw, config)
    try:
        def evaluate(rate: float) -> Probe:
            return evaluate_rate(raw, file, path, rate, config.min_goodput, config.min_requests)

        found = bisect_rate(evaluate, start_rate(raw, path, config, file), config.rate_min, config.rate_max,
                            config.tolerance)
    except Exception as err:  # noqa: BLE001 - one broken configuration must not stop the search
        text = str(err) if isinstance(err, KvsimError) else f"{type(err).__name__}: {err}"
        found = RateSearch(0.0, None, "error", text, ())
    return {"rate_path": path, **asdict(found), **provenance(raw, file)}


def provenance(raw: Mapping[str, Any], file: str) -> dict:
    """Where a configuration's speed comes from (its GPU's calibration) and the KV methods its
    engine does not ship: a ranking shows both."""
    from kvsim.engines import unshipped
    from kvsim.scenario import scenario_from_dict
    from kvsim.scenario.run import deployment

    try:
        scenario = scenario_from_dict(dict(raw), file)
        dep = deployment(scenario)
    except KvsimError:
        return {"calibration": "", "calibrated": False, "unshipped": []}
    cal = dep.cost.cal
    return {"calibration": cal.label, "calibrated": cal.kind in CALIBRATED,
            "unshipped": unshipped(scenario.spec.engine.kind, dep.layout.methods)}


# ---------------------------------------------------------------- the deployments a search tries

MAX_CONFIGS = 256  # configurations x deployments one search simulates at most (about 10 runs each)


@dataclass(frozen=True)
class Layout:
    """One deployment of ``sweep.search.space``: an aggregated replica (``prefill`` is None) or a
    disaggregated unit of prefill and decode instances, each side ``(instances, TP)``."""

    tp: int  # the aggregated replica's TP degree (0 when disaggregated)
    prefill: tuple[int, int] | None = None
    decode: tuple[int, int] | None = None

    @property
    def gpus(self) -> int:
        if self.prefill is None or self.decode is None:
            return self.tp
        return self.prefill[0] * self.prefill[1] + self.decode[0] * self.decode[1]

    @property
    def label(self) -> str:
        if self.prefill is None or self.decode is None:
            return f"aggregated TP{self.tp}"
        (p, p_tp), (d, d_tp) = self.prefill, self.decode
        return f"disaggregated {p}P TP{p_tp} : {d}D TP{d_tp} ({p * p_tp}:{d * d_tp} GPUs)"

    def fields(self, link: Mapping[str, Any] | None) -> dict[str, tuple[str, Any]]:
        """The scenario paths :meth:`apply` sets, each with the ``sweep.search.space`` field and
        value that chose it (what an error in the resulting scenario is blamed on)."""
        space = "sweep.search.space"
        if self.prefill is None or self.decode is None:
            return {"tp": (f"{space}.tp", self.tp)}
        return {"disaggregation.prefill.tp": (f"{space}.prefill_tp", self.prefill[1]),
                "disaggregation.decode.tp": (f"{space}.decode_tp", self.decode[1]),
                "disaggregation.prefill.replicas": (f"{space}.prefill_replicas", self.prefill[0]),
                "disaggregation.decode.replicas": (f"{space}.decode_replicas", self.decode[0]),
                "disaggregation.link": (f"{space}.link", dict(link or {}))}

    def apply(self, raw: Mapping[str, Any], link: Mapping[str, Any] | None) -> dict:
        """``raw`` deployed as this layout (one copy: ``replicas: 1``)."""
        out = {k: v for k, v in raw.items() if k != "disaggregation"}
        out["replicas"] = 1
        if self.prefill is None or self.decode is None:
            out["tp"] = self.tp
            return out
        out["disaggregation"] = {"prefill": {"replicas": self.prefill[0], "tp": self.prefill[1]},
                                 "decode": {"replicas": self.decode[0], "tp": self.decode[1]},
                                 "link": dict(link or {})}
        return out


def layouts(space: SearchSpace) -> list[Layout]:
    """Every deployment of ``space`` within its GPU cap, aggregated ones first."""
    out = [Layout(tp) for tp in sorted(space.tp) if tp <= space.max_gpus]  # the schema refuses repeats
    for p, d in itertools.product(sorted(space.prefill_replicas), sorted(space.decode_replicas)):
        if math.gcd(p, d) != 1:  # a multiple of a smaller unit: the target is met with more copies of that
            continue
        for p_tp, d_tp in itertools.product(sorted(space.prefill_tp), sorted(space.decode_tp)):
            layout = Layout(0, (p, p_tp), (d, d_tp))
            if layout.gpus <= space.max_gpus:
                out.append(layout)
    return out


def space_link(space: SearchSpace, raw: Mapping[str, Any], file: str) -> dict | None:
    """The link of the disaggregated candidates: the space's, else the scenario's own; an error
    naming ``sweep.search.space.link`` when there are disaggregated candidates and neither gives one."""
    if space.link is not None:
        return space.link.model_dump()
    own = (raw.get("disaggregation") or {}).get("link")
    if own is None and space.prefill_tp and space.decode_tp:
        raise KvsimError("disaggregated candidates need a link between prefill and decode: give "
                         "sweep.search.space.link {bandwidth_gbps, latency_us} or a disaggregation.link",
                         field="sweep.search.space.link", value=None, file=file)
    return dict(own) if own is not None else None


@dataclass(frozen=True)
class Candidate:
    """One configuration the search bisects: a sweep point, deployed as ``layout`` (None: as written)."""

    point: Point
    layout: Layout | None
    raw: Mapping[str, Any]

    def label(self, rate_path: str) -> str:
        """The point's swept values (but the searched rate) and the layout."""
        base = self.point.label(exclude=rate_path)
        if self.layout is None:
            return base
        return self.layout.label if base == "base scenario" else f"{base}, {self.layout.label}"


def check_searchable(plan: SweepPlan, points: Sequence[Point]) -> None:
    """Input errors that would otherwise be a "cannot run" row for every configuration: a point
    without SLOs (no goodput to judge a rate by), a closed loop (no rate sets its load) or a rate
    path that is not a request rate of the point's workload (RATE_PATHS)."""
    for p in points:
        workload = p.raw.get("workload") or {}
        if workload.get("closed_loop") is not None:
            raise KvsimError("a closed loop's load is set by its concurrency, not by a rate, so a search would report "
                             "rates it never offered; search a synthetic or trace workload (kvsim sweep can vary "
                             "workload.closed_loop.concurrency)", field="workload.closed_loop", value=None,
                             file=plan.file)
        kind = next(k for k in RATE_PATHS if workload.get(k) is not None)  # the scenario schema wants one
        if rate_path(p.raw, plan.search) not in RATE_PATHS[kind]:  # only a configured path can miss
            raise KvsimError(f"not a rate of a workload.{kind}: give {' or '.join(RATE_PATHS[kind])}",
                             field="sweep.search.rate_path", value=plan.search.rate_path, file=plan.file)
        if p.raw.get("slo") is None:
            raise KvsimError("a search judges every rate by the share of requests within both SLOs: give "
                             "slo: {ttft_s, tpot_s}", field="slo", value=None, file=plan.file)


def candidates(plan: SweepPlan, points: Sequence[Point]) -> list[Candidate]:
    """The configurations a search bisects: each distinct point, crossed with the space's layouts.
    Raises on an input error (:func:`check_searchable`; a space's deployment the sweep's own
    check refuses, e.g. a TP degree that does not divide the heads)."""
    check_searchable(plan, points)
    chosen = distinct_configs(plan, points)
    space = plan.search.space
    if space is None:
        return [Candidate(p, None, p.raw) for p in chosen]
    out = []
    fields: list[dict[str, tuple[str, Any]]] = []
    for p in chosen:
        link = space_link(space, p.raw, plan.file)
        for layout in layouts(space):
            out.append(Candidate(p, layout, layout.apply(p.raw, link)))
            fields.append(layout.fields(link))
    if not out:
        raise KvsimError(f"no deployment within max_gpus={space.max_gpus}", field="sweep.search.space",
                         value=space.model_dump(exclude_none=True), file=plan.file)
    if len(out) > MAX_CONFIGS:
        raise KvsimError(f"{len(out)} configurations to search, more than {MAX_CONFIGS}: narrow the sweep or "
                         "sweep.search.space (fewer TP degrees, instance counts or a lower max_gpus)",
                         field="sweep.search.space", value=space.model_dump(exclude_none=True), file=plan.file)
    checked: dict[str, None] = {}
    for c, assigned in zip(out, fields, strict=True):
        check_point(dict(c.raw), assigned, c.label(rate_path(c.raw, plan.search)), plan.file, checked)
    return out


# ---------------------------------------------------------------- ranking by cost

def gpus_per_replica(raw: Mapping[str, Any]) -> int:
    """GPUs one copy of a scenario's deployment occupies: TP degree x DP ranks x the scenario's
    replicas (for a disaggregated one, each side's instances x their TP degree)."""
    tp = int(raw.get("tp", 1))
    d = raw.get("disaggregation")
    if d:
        return sum(int(d[side]["replicas"]) * int(d[side].get("tp") or tp) for side in ("prefill", "decode"))
    dp = int((raw.get("engine") or {}).get("data_parallel_size", 1))
    return tp * dp * int(raw.get("replicas", 1))


def price_per_gpu_hour(raw: Mapping[str, Any], file: str, prices: Mapping[str, float] | None = None) -> float | None:
    """The scenario GPU's price: ``prices`` (``sweep.search.prices`` or ``--price``) by GPU name,
    else the catalogue's (a GPU YAML path is read relative to the scenario file)."""
    from kvsim.scenario import scenario_from_dict
    from kvsim.scenario.load import resolve_path
    from kvsim.spec.hardware import load_hardware

    name = str(raw["hardware"])
    for side in ("prefill", "decode"):
        other = ((raw.get("disaggregation") or {}).get(side) or {}).get("hardware")
        if other is not None and other != name:
            raise KvsimError("a search prices one GPU per configuration: give both sides the scenario's hardware",
                             field=f"disaggregation.{side}.hardware", value=other, file=file)
    if "/" in name or name.endswith((".yaml", ".yml")):
        name = str(resolve_path(name, scenario_from_dict(dict(raw), file)))
    hw = load_hardware(name)
    return (prices or {}).get(hw.name, hw.price_per_gpu_hour_usd)


@dataclass(frozen=True)
class ConfigResult:
    point: int
    label: str
    hardware: str
    gpus_per_replica: int  # GPUs of one copy (a disaggregated copy: both sides)
    price_per_gpu_hour_usd: float | None
    rate_path: str
    max_rate: float  # highest rate verified to meet the SLOs (0: none)
    limit: str  # what fails above max_rate
    limit_detail: str
    probes: tuple[tuple[float, float | None], ...]  # (rate, goodput) of every simulated probe
    replicas: int | None  # copies for the target rate
    cost_usd_per_hour: float | None  # copies x GPUs x price (for the target) or one copy
    usd_per_hour_per_rate: float | None  # GPUs x price / max_rate
    rank: int | None = None
    verdict: str = ""
    calibration: str = ""  # where the GPU's speed figures come from (Calibration.label)
    calibrated: bool = True  # measured or imported on this GPU (else ranked after those that are)
    unshipped: tuple[str, ...] = ()  # KV methods the engine does not ship (flagged)
    deployment: str = ""  # the sweep.search.space layout (Layout.label); "" for a point as written
    disaggregated: bool = False


def _cost(r: ConfigResult, target: float | None) -> ConfigResult:
    if r.max_rate <= 0 or r.price_per_gpu_hour_usd is None:
        return r
    per_replica = r.gpus_per_replica * r.price_per_gpu_hour_usd
    replicas = math.ceil(target / r.max_rate - 1e-9) if target else 1
    return ConfigResult(**{**asdict(r), "replicas": replicas, "cost_usd_per_hour": replicas * per_replica,
                           "usd_per_hour_per_rate": per_replica / r.max_rate})


def rate_unit(path: str) -> str:
    return "x trace rate" if path.endswith("rate_scale") else "req/s"


def _limit(r: ConfigResult) -> str:
    """What stops one copy from going faster, in words."""
    if r.limit == "rate_max":
        return f"meets the SLOs up to rate_max={r.max_rate:.3g} {rate_unit(r.rate_path)}"
    return (f"limited by the {LIMITS.get(r.limit, r.limit)} above {r.max_rate:.3g} {rate_unit(r.rate_path)}: "
            f"{r.limit_detail}")


def _gpus(r: ConfigResult) -> str:
    return f"{r.replicas} x {r.gpus_per_replica} {r.hardware} at ${r.price_per_gpu_hour_usd:.2f}"


def rank(results: Sequence[ConfigResult], target: float | None) -> list[ConfigResult]:
    """Ranked configurations, cheapest first (for the target rate, else per unit of rate), each
    loser with the reason it lost."""
    from kvsim.spec.hardware import PRICE_SOURCE

    costed = [_cost(r, target) for r in results]
    viable = [r for r in costed if r.cost_usd_per_hour is not None]
    key = (lambda r: (r.cost_usd_per_hour, -r.max_rate)) if target else \
        (lambda r: (r.usd_per_hour_per_rate, -r.max_rate))
    # configurations on GPUs without their own calibration rank after all calibrated ones
    viable.sort(key=lambda r: (not r.calibrated, *key(r)))
    out = []
    for i, r in enumerate(viable):
        best = viable[0]
        limit = _limit(r)
        flags = ([] if r.calibrated else [f"UNCALIBRATED GPU ({r.calibration or 'unknown'}): ranked after "
                                          "calibrated ones"])
        if r.unshipped:
            flags.append(f"{', '.join(r.unshipped)} not shipped by the engine (what-if)")
        limit = limit + "".join(f"; {f}" for f in flags)
        if i == 0:
            verdict = (f"cheapest: {_gpus(r)} = ${r.cost_usd_per_hour:.2f}/h; {limit}"
                       if target else f"cheapest per unit of rate; {limit}")
        elif math.isclose(key(r)[0], key(best)[0], rel_tol=1e-9):
            lower = "lower" if r.max_rate < best.max_rate else "equal"
            verdict = f"ties with #1 on cost; {lower} rate per copy; {limit}"
        elif target:
            verdict = (f"costs {_gpus(r)} (${r.cost_usd_per_hour:.2f}/h) vs {_gpus(best)} "
                       f"(${best.cost_usd_per_hour:.2f}/h); {limit}")
        else:
            verdict = (f"costs ${r.usd_per_hour_per_rate:.3f}/h per unit of rate vs "
                       f"${best.usd_per_hour_per_rate:.3f}: {limit}")
        out.append(ConfigResult(**{**asdict(r), "rank": i + 1, "verdict": verdict}))
    for r in costed:
        if r.cost_usd_per_hour is not None:
            continue
        if r.limit == "memory":
            verdict = r.limit_detail if "does not fit" in r.limit_detail else f"does not fit: {r.limit_detail}"
        elif r.limit == "error":
            verdict = f"cannot run: {r.limit_detail}"
        elif r.max_rate <= 0:
            verdict = f"misses the SLOs even at the lowest rate (rate_min): {r.limit_detail}"
        else:
            verdict = (f"no price per GPU-hour for {r.hardware}: the catalogue's one source ({PRICE_SOURCE}) "
                       f"lists none; give --price {r.hardware}=USD")
        out.append(ConfigResult(**{**asdict(r), "verdict": verdict}))
    return out


def check_search_folder(out: Path, force: bool) -> None:
    """Before a search: ``out`` must be writable, and an earlier search.json there is replaced only
    with ``force`` (a sweep folder without one is fine: the report reads both)."""
    check_writable(out, "--out", folder=True)
    if (out / "search.json").exists() and not force:
        raise KvsimError("holds the search.json of an earlier search; add --force to replace it",
                         field="--out", value=str(out))


def run_search(plan: SweepPlan, target_rate: float | None = None, jobs: int | None = None,
               backend: Backend = "local", address: str | None = None,
               points: Sequence[Point] | None = None,
               on_done: Callable[[int, int], None] | None = None,
               prices: Mapping[str, float] | None = None) -> list[ConfigResult]:
    """Search every configuration of ``plan`` (each point, or each point x ``sweep.search.space``
    deployment), in parallel, and rank them by cost (``prices``: USD per GPU-hour by GPU name, over
    the scenario's and the catalogue's)."""
    chosen = candidates(plan, points if points is not None else plan.points)
    cfg = plan.search.model_dump()
    all_prices = {**plan.search.prices, **(prices or {})}
    tasks = [(dict(c.raw), plan.file, cfg) for c in chosen]
    results: dict[int, ConfigResult] = {}
    for i, found in execute(search_config, tasks, backend, jobs, address):
        c = chosen[i]
        results[i] = ConfigResult(
            point=c.point.index, label=c.label(found["rate_path"]), hardware=str(c.raw.get("hardware", "")),
            gpus_per_replica=gpus_per_replica(c.raw),
            price_per_gpu_hour_usd=price_per_gpu_hour(c.raw, plan.file, all_prices),
            rate_path=found["rate_path"], max_rate=found["rate"], limit=found["limit"],
            limit_detail=found["detail"], probes=tuple((p["rate"], p["goodput"]) for p in found["probes"]),
            replicas=None, cost_usd_per_hour=None,
            usd_per_hour_per_rate=None, calibration=found["calibration"], calibrated=found["calibrated"],
            unshipped=tuple(found["unshipped"]), deployment=c.layout.label if c.layout else "",
            disaggregated=bool(c.raw.get("disaggregation")))
        if on_done:
            on_done(len(results), len(chosen))
    return rank([results[i] for i in sorted(results)], target_rate or plan.search.target_rate)


def distinct_configs(plan: SweepPlan, points: Sequence[Point]) -> list[Point]:
    """Points that differ in more than the searched rate (points differing only in the rate are one
    configuration to the search; the first of them stands for it)."""
    from kvsim.scenario import apply_override

    seen: set[str] = set()
    out = []
    for p in points:
        key = point_key(apply_override(dict(p.raw), rate_path(p.raw, plan.search), 1.0))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def select_points(plan: SweepPlan, selectors: Sequence[str]) -> list[Point]:
    """Points chosen by ``--configs``: point indices (``3``) and/or ``path=value`` filters."""
    chosen = list(plan.points)
    indices = {int(s) for s in selectors if s.isdigit()}
    if indices:
        bad = sorted(indices - {p.index for p in plan.points})
        if bad:
            raise KvsimError(f"no such configuration (0..{len(plan.points) - 1})", field="--configs",
                             value=bad[0])
        chosen = [p for p in chosen if p.index in indices]
    for s in selectors:
        if s.isdigit():
            continue
        path, eq, value = s.partition("=")
        if not eq:
            raise KvsimError("expected a point index or PATH=VALUE", field="--configs", value=s)
        if path not in plan.paths and path != "variant":
            swept = ", ".join(plan.paths) or "none"
            raise KvsimError(f"not a swept path (swept: {swept})", field="--configs", value=path,
                             file=plan.file)
        chosen = [p for p in chosen if str(p.variant if path == "variant" else p.values[path]) == value]
    if not chosen:
        raise KvsimError("no configuration matches", field="--configs", value=" ".join(selectors))
    return chosen
