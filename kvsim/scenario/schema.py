"""The scenario file: a strict schema (unknown keys are errors) for one serving deployment and its
workload. Documented key by key in docs/scenario.md."""

from __future__ import annotations

import typing
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationInfo, field_validator

from kvsim.memory import SAMPLERS, VLLM_DEFAULTS
from kvsim.serve.closed_loop import DELAYS, SAMPLINGS
from kvsim.serve.policy import DEFAULT_POLICY, POLICIES
from kvsim.serve.router import ROUTERS

# A run simulates at most this many requests (num_requests, or rate x duration_s): beyond it a
# run would take hours, and a typo such as 1e12 would look like a hang.
MAX_REQUESTS = 10_000_000


class _Strict(BaseModel):
    # Numbers may be written as 4 or 4.0 but must be finite; booleans and strings must be what
    # they say (pydantic alone would take `true` as 1 and `.inf` as a duration).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: object, info: ValidationInfo) -> object:
        annotation = cls.model_fields[info.field_name].annotation  # type: ignore[index]
        if isinstance(value, bool) and bool not in (annotation, *typing.get_args(annotation)):
            raise ValueError("expected a number, not true/false")
        return value


class LengthSpec(_Strict):
    """A token-count distribution: ``fixed`` (tokens), ``lognormal`` (mean + sigma, or p50 + p90),
    or ``empirical`` (resampled from a trace's input or output lengths)."""

    kind: Literal["fixed", "lognormal", "empirical"]
    tokens: int | None = Field(default=None, gt=0)
    mean: float | None = Field(default=None, gt=0)
    sigma: float | None = Field(default=None, ge=0)
    p50: float | None = Field(default=None, gt=0)
    p90: float | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)
    trace: StrictStr | None = None
    which: Literal["input", "output"] = "input"


class SessionsSpec(_Strict):
    """Multi-turn chat sessions: the arrival rate is then the rate of session starts."""

    turns: LengthSpec
    follow_up: LengthSpec | None = None  # new user tokens of turns 2.. (default: the input lengths)
    think_mean_s: float = Field(gt=0)
    think_cv: float = Field(default=1.0, gt=0)
    max_input_tokens: int | None = Field(default=None, gt=0)  # default: the context length


class SharedPrefixSpec(_Strict):
    tokens: int = Field(gt=0)
    num_users: int = Field(default=1, gt=0)
    num_prompts: int = Field(default=1, gt=0)


class SyntheticSpec(_Strict):
    rate: float = Field(gt=0)  # requests (or sessions) per second
    arrival_cv: float = Field(default=1.0, gt=0)  # 1: Poisson; >1 bursty (Gamma gaps)
    num_requests: int | None = Field(default=None, gt=0, le=MAX_REQUESTS)
    duration_s: float | None = Field(default=None, gt=0)
    input: LengthSpec | None = None
    output: LengthSpec | None = None
    paired_lengths_from: StrictStr | None = None  # a trace whose (input, output) rows are resampled
    sessions: SessionsSpec | None = None
    shared_prefix: SharedPrefixSpec | None = None


class ClosedLoopSpec(_Strict):
    """``concurrency`` clients, each sending its next request when the previous one ends
    (``vllm bench serve --max-concurrency``); lengths as vLLM's random dataset. With ``request_rate``
    the requests are also scheduled at that mean rate (``--request-rate``, Gamma gaps of shape
    ``burstiness``, ``--burstiness``) and each is sent when both its time has come and a client is free."""

    concurrency: int = Field(gt=0, le=MAX_REQUESTS)
    num_requests: int = Field(gt=0, le=MAX_REQUESTS)
    input: LengthSpec
    output: LengthSpec
    random_range_ratio: float = Field(default=0.0, ge=0, lt=1)
    request_rate: float | None = Field(default=None, gt=0)  # requests/s; None: all at once (inf)
    burstiness: float = Field(default=1.0, gt=0)  # Gamma shape of the gaps: 1 Poisson, < 1 burstier
    # the client round trip (kvsim.serve.closed_loop): mean time from sending to the engine receiving,
    # with the previous response's way back; 0: none (the engine receives what a client sends at once)
    round_trip_ms: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    round_trip_distribution: Literal[DELAYS] = "fixed"  # type: ignore[valid-type]
    # a client's think time between a request's end and its next send (outside TTFT); 0: none
    think_ms: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    think_distribution: Literal[DELAYS] = "fixed"  # type: ignore[valid-type]
    # a prompt dataset as aiperf's (--num-dataset-entries, --dataset-sampling-strategy): requests repeat its
    # prompts, which prefix caching reuses; None: every prompt new (vLLM's random dataset)
    dataset_entries: int | None = Field(default=None, gt=0, le=MAX_REQUESTS)
    dataset_sampling: Literal[SAMPLINGS] = "shuffle"  # type: ignore[valid-type]

    @field_validator("burstiness")
    @classmethod
    def _drawable(cls, burstiness: float) -> float:
        # the gaps' CV, 1/sqrt(burstiness), must be one kvsim.serve.synthetic.ArrivalProcess draws (1e-100..1e100)
        if not 1e-200 <= burstiness <= 1e200:
            raise ValueError("must be within 1e-200..1e200")
        return burstiness


class WorkloadSpec(_Strict):
    trace: StrictStr | None = None
    format: Literal["csv", "azure", "mooncake", "servegen"] | None = None
    prefix_block_tokens: int = Field(default=512, gt=0)  # csv hash blocks (read_csv's default)
    synthetic: SyntheticSpec | None = None
    closed_loop: ClosedLoopSpec | None = None
    rate_scale: float = Field(default=1.0, gt=0)
    rate: float | None = Field(default=None, gt=0)  # a trace's offered requests/s (instead of rate_scale)
    start_s: float = Field(default=0.0, ge=0)
    end_s: float | None = Field(default=None, gt=0)
    max_requests: int | None = Field(default=None, gt=0, le=MAX_REQUESTS)
    images_per_request: int = Field(default=0, ge=0)


class EngineSpec(_Strict):
    # Defaults are vLLM's, kept in one place: kvsim.memory.EngineMemoryConfig (VLLM_DEFAULTS); the step
    # limits left unset below are vLLM's per GPU and version (kvsim/data/vllm_batch_defaults.yaml).
    # kind: whose kernel database an imported calibration profile comes from (docs/calibration.md); the
    # scheduler is vLLM's for every kind, except that SGLang runs a prefill batch alone unless
    # enable_mixed_chunk (kvsim.serve.policy)
    kind: Literal["vllm", "sglang", "trtllm"] = "vllm"
    # None: what `vllm serve` of the engine's vLLM version uses on the GPU (kvsim.memory.vllm_batch_limits,
    # kvsim/data/vllm_batch_defaults.yaml), reported in the summary's engine_limits
    max_num_seqs: int | None = Field(default=None, gt=0)
    max_num_batched_tokens: int | None = Field(default=None, gt=0)
    block_size: int = Field(default=VLLM_DEFAULTS.block_size, gt=0)
    gpu_memory_utilization: float = Field(default=VLLM_DEFAULTS.gpu_memory_utilization, gt=0, le=1)
    # None: the version's default (on, except 0.6.x: kvsim.memory.vllm_batch_limits)
    enable_chunked_prefill: bool | None = Field(default=None, strict=True)
    enable_prefix_caching: StrictBool = True
    preemption: Literal["recompute", "swap"] = "recompute"
    swap_space_gib: float = Field(default=4.0, ge=0)  # vLLM --swap-space default, GiB per GPU
    max_model_len: int | None = Field(default=None, gt=0)  # default: the model's context length
    num_gpu_blocks_override: int | None = Field(default=None, gt=0)  # vLLM's, "for testing preemption"
    # memory rule (kvsim/data/vllm_memory.yaml); None: its default_version (an empty string is a mistake)
    vllm_version: StrictStr | None = Field(default=None, min_length=1)
    # no CUDA graphs: none charged (vLLM >= 0.20), no step padded; step times a labelled lower bound
    enforce_eager: StrictBool = False
    # vLLM --async-scheduling (V1, 0.10.2+): the engine loop's CPU time overlaps the GPU's step; None: the
    # version's default (off up to 0.12, on from 0.14; 0.13 must say: kvsim.cost.execution)
    async_scheduling: bool | None = Field(default=None, strict=True)
    # the sampler's top-k/top-p implementation, which sets the profiling run's memory peak (kvsim.memory
    # SAMPLERS): native (vLLM's own) or flashinfer (0.10.2-0.11 wherever FlashInfer is installed, as in
    # vLLM's images; 0.12+ with VLLM_USE_FLASHINFER_SAMPLER=1)
    sampler: Literal[SAMPLERS] = "native"  # type: ignore[valid-type]
    # vLLM --cudagraph-capture-sizes: the decode token counts with a captured graph (a smaller step is
    # padded to the next one); None: vLLM's default list (kvsim.cost.execution.vllm_graph_sizes)
    cudagraph_capture_sizes: list[Annotated[int, Field(gt=0)]] | None = Field(default=None, min_length=1)
    cuda_graph_gib: float | None = Field(default=None, ge=0)  # vLLM >= 0.20's measured CUDA-graph estimate
    fast_forward: StrictBool = True
    scheduling_policy: Literal[POLICIES] = DEFAULT_POLICY  # type: ignore[valid-type]  # kvsim.serve.policy
    # SGLang --enable-mixed-chunk (engine.kind sglang only): running decodes join each prefill batch; None or
    # false: SGLang's default, a prefill batch runs alone and the decodes wait (kvsim.serve.policy)
    enable_mixed_chunk: bool | None = Field(default=None, strict=True)
    # vLLM --data-parallel-size and --enable-expert-parallel (kvsim.spec.parallel): DP ranks of tp GPUs
    # each behind one endpoint; a MoE model's ranks step in lockstep
    data_parallel_size: int = Field(default=1, gt=0)
    expert_parallel: StrictBool = False


class SLOSpec(_Strict):
    ttft_s: float = Field(gt=0)
    tpot_s: float = Field(gt=0)


class OutputSpec(_Strict):
    timeseries_interval_s: float = Field(default=1.0, gt=0)


class DisaggSideSpec(_Strict):
    """One side of a disaggregated deployment: its instances, their TP and (default: the
    scenario's) GPU."""

    replicas: int = Field(gt=0)
    tp: int | None = Field(default=None, gt=0)  # default: the scenario's tp
    hardware: StrictStr | None = None  # default: the scenario's hardware


class LinkSpec(_Strict):
    bandwidth_gbps: float = Field(gt=0)  # gigabits per second, as NICs are rated
    latency_us: float = Field(default=0.0, ge=0)


class DisaggregationSpec(_Strict):
    """Prefill instances send each prompt's KV over ``link`` to decode instances (kvsim.serve.disagg)."""

    prefill: DisaggSideSpec
    decode: DisaggSideSpec
    link: LinkSpec


class ScenarioSpec(_Strict):
    name: StrictStr | None = None
    description: StrictStr | None = None
    model: StrictStr
    hardware: StrictStr
    method: StrictStr = "bf16"
    weights: Literal["bf16", "fp8", "int8", "int4", "mxfp4", "nvfp4"] | None = None  # None: as the checkpoint
    tp: int = Field(default=1, gt=0)
    replicas: int = Field(default=1, gt=0)
    router: Literal[ROUTERS] = "round_robin"  # type: ignore[valid-type]
    calibration: StrictStr | None = None
    engine: EngineSpec = EngineSpec()
    workload: WorkloadSpec
    slo: SLOSpec | None = None  # without it the summary has no goodput (and says so)
    seed: int = Field(default=0, ge=0)
    output: OutputSpec = OutputSpec()
    disaggregation: DisaggregationSpec | None = None  # None: every replica prefills and decodes
