"""All-reduce as vLLM runs it: custom all-reduce where vLLM would pick it, NCCL above 8 MiB, priced
from the imported measured tables (kvsim/data/collectives)."""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import replace

import numpy as np
import pytest
import yaml
from conftest import ROOT, examples
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsim.cost import Batch, CostModel
from kvsim.cost.collectives import CUSTOM_MAX_BYTES, custom_one_stage, host_staging, load_collectives, vllm_allreduce
from kvsim.cost.execution import eager_launch, vllm_execution, vllm_graph_sizes
from kvsim.kv import layout_for
from kvsim.spec.hardware import hardware_names, load_hardware
from kvsim.spec.model import load_model


def table_points(gpu: str, key: str, tp: int) -> tuple[list[int], list[float]]:
    data = yaml.safe_load((ROOT / "kvsim" / "data" / "collectives" / f"{gpu}.yaml").read_text())
    t = data[key]["tp"][tp]
    return t["bytes"], t["seconds"]


def test_measured_points_are_returned_exactly_and_interpolated_between() -> None:
    tables = load_collectives("h100-sxm")
    assert tables is not None
    sizes, seconds = table_points("h100-sxm", "custom_allreduce", 8)
    got = tables.custom[8].seconds(np.array(sizes, dtype=float))
    np.testing.assert_allclose(got, seconds, rtol=1e-12)
    mid = tables.custom[8].seconds(np.array([np.sqrt(sizes[3] * sizes[4])]))[0]  # log-log midpoint
    assert mid == pytest.approx(np.sqrt(seconds[3] * seconds[4]), rel=1e-12)
    # past the largest measured message: bandwidth-bound, twice the bytes take twice the time
    big = tables.nccl[8].seconds(np.array([2.0 * sizes[-1] * 4, 4.0 * sizes[-1] * 4]))
    assert big[1] == pytest.approx(2 * big[0])


def test_database_message_sizes_are_element_counts_of_two_bytes() -> None:
    """aiconfigurator logs all-reduce sizes in 16-bit elements (its collectors and its SDK's
    ``CustomAllReduce.query``: "count, not size in bytes"); kvsim's tables hold bytes."""
    from kvsim.importers.aiconfigurator import _by_tp

    rows = {"num_gpus": [2, 2, 4], "message_size": [1024, 4096, 1024], "latency": [0.01, 0.02, 0.03],
            "op_name": ["all_reduce"] * 3, "nccl_dtype": ["half"] * 3}
    got = _by_tp(rows, {"op_name": "all_reduce", "nccl_dtype": "half"}, ROOT / "nccl_perf.parquet")
    assert got == {2: {"bytes": [2048, 8192], "seconds": [1e-5, 2e-5]}, 4: {"bytes": [2048], "seconds": [3e-5]}}


@pytest.mark.parametrize("gpu", ["a100-sxm-80gb", "b200", "b300", "gb200", "h100-sxm", "h200-sxm"])
def test_largest_nccl_all_reduce_moves_near_the_nvlink_rate(gpu: str) -> None:
    """Bus bandwidth (algorithm bandwidth x 2(n-1)/n, as nccl-tests report it) of the largest
    measured NCCL all-reduce: 0.5-1.1x the per-direction NVLink bandwidth (NVLink SHARP reduces in the
    switch, so TP 8 can reach the link rate). Reading the sizes as bytes gave 0.3-0.5x."""
    link = load_hardware(gpu).nvlink_bandwidth_bytes_per_s
    data = yaml.safe_load((ROOT / "kvsim" / "data" / "collectives" / f"{gpu}.yaml").read_text())
    for tp, t in data["nccl_allreduce"]["tp"].items():
        bus = t["bytes"][-1] / t["seconds"][-1] * 2 * (tp - 1) / tp
        assert 0.5 * link <= bus <= 1.1 * link, (gpu, tp, bus / link)


def test_vllm_uses_its_custom_all_reduce_on_nvlink_up_to_8_mib() -> None:
    hw = load_hardware("h100-sxm")
    ar = vllm_allreduce(hw, 8)
    assert ar.custom is not None and ar.nccl is not None and "custom all-reduce (measured table)" in ar.source
    ring = np.array([1.0, 1.0])
    small, large = float(CUSTOM_MAX_BYTES), float(CUSTOM_MAX_BYTES) * 2
    got = ar.seconds(np.array([small, large]), ring)
    assert got[0] == ar.custom.seconds(np.array([small]))[0]
    assert got[1] == ar.nccl.seconds(np.array([large]))[0]


def test_pcie_groups_and_odd_degrees_use_nccl_or_the_ring_model() -> None:
    pcie = vllm_allreduce(load_hardware("h100-pcie"), 4)  # no NVLink in the catalogue entry: no custom kernel
    assert pcie.custom is None and "custom" not in pcie.source
    assert vllm_allreduce(load_hardware("h100-sxm"), 3).custom is None  # not a custom-kernel world size
    plain = vllm_allreduce(replace(load_hardware("rtx-4090"), peer_to_peer=True), 4)  # no imported tables at all
    assert plain.custom is None and plain.nccl is None and plain.staging is None and "ring model" in plain.source
    ring = np.array([3e-5])
    assert plain.seconds(np.array([1e5]), ring)[0] == ring[0]


def test_over_pcie_vllm_runs_its_custom_kernel_only_on_two_gpus_with_peer_access() -> None:
    """CustomAllreduce.__init__: "not supported on more than two PCIe-only GPUs", and off without P2P (_can_p2p).
    The RTX PRO 6000 Server Edition has peer access (vllm-project/vllm issue 56128): its measured custom table at
    TP 2, NCCL's at TP 4 (aiconfigurator's TP 4 custom table was collected by forcing the kernel on). An L40S's
    peer access is not recorded: NCCL's measured table, no custom kernel, and the label says why."""
    pro = load_hardware("rtx-pro-6000")
    assert pro.peer_to_peer is True and load_hardware("l40s").peer_to_peer is None
    two, four = vllm_allreduce(pro, 2), vllm_allreduce(pro, 4)
    assert two.custom is load_collectives("rtx-pro-6000").custom[2] and "two PCIe GPUs with peer access" in two.source
    assert four.custom is None and not four.custom_ok and four.nccl is not None and four.staging is None
    l40s = vllm_allreduce(load_hardware("l40s"), 2)
    assert l40s.custom is None and l40s.nccl is not None and "peer-to-peer access not recorded" in l40s.source


def test_without_peer_access_nccl_stages_through_host_memory_as_measured_on_one_host() -> None:
    """8 x RTX 4090 on one host (blog.chlc.cc), nccl-tests with the stock driver (SHM) and a patched one (P2P):
    small messages take the same 39 us, 128 MiB 16,253 us against 11,382 (1.43x). Stock GeForce Ada has no peer
    access (sglang issue 4814), so its TP 2 group runs NCCL, not the custom kernel, priced staged: a 64 KiB decode
    all-reduce no slower than with peer access, a 128 MiB one 1.43x slower."""
    staging = host_staging()
    assert staging.slowdown(np.array([8.0]))[0] == pytest.approx(38.83 / 38.82, rel=1e-3)
    assert staging.slowdown(np.array([2.0**27, 2.0**30]))[0] == pytest.approx(16253 / 11382, rel=1e-3)
    hw = load_hardware("rtx-4090")
    assert hw.peer_to_peer is False
    stock, patched = vllm_allreduce(hw, 2), vllm_allreduce(replace(hw, peer_to_peer=True), 2)
    assert stock.staging is staging and not stock.custom_ok and "no peer-to-peer access" in stock.source
    assert patched.staging is None and patched.custom_ok  # two PCIe GPUs with peer access: vLLM's custom kernel
    assert vllm_allreduce(replace(hw, peer_to_peer=True), 4).custom_ok is False
    unknown = vllm_allreduce(load_hardware("l4"), 2)
    assert unknown.staging is staging and "not recorded" in unknown.source
    model = load_model("llama-3-8b")
    cost = {p2p: CostModel(model, replace(hw, peer_to_peer=p2p), layout_for(model), 4, None,
                           vllm_execution(replace(hw, peer_to_peer=p2p), 4, 256, 8192, "")) for p2p in (False, True)}
    small, big = np.array([65536.0]), np.array([2.0**27])
    assert cost[False]._allreduce_call_s(small)[0] == pytest.approx(cost[True]._allreduce_call_s(small)[0], rel=0.05)
    assert cost[False]._allreduce_call_s(big)[0] == pytest.approx(1.428 * cost[True]._allreduce_call_s(big)[0],
                                                                  rel=0.01)


def test_public_pcie_all_reduce_sweeps_as_kvsim_prices_them() -> None:
    """kvsim's NCCL over PCIe (RTX 4090, no tables of its own: the ring on the Ada link terms, staged without peer
    access) against every public nccl-tests sweep of RTX 4090 hosts (validation/reference/public_allreduce_pcie.csv;
    README): at decode sizes (4 KiB-512 KiB) kvsim is 2-2.6x too fast on every host without peer access, and the
    bandwidth-bound sizes (>= 4 MiB) spread with the host (busbw 2.2-15 GB/s on the same GPUs): kvsim 0.6-1.0x
    of the two kalavai hosts, 4x of the dual-EPYC one. Figures are held here so a change to them is reviewed."""
    rows = list(csv.DictReader((ROOT / "validation" / "reference" / "public_allreduce_pcie.csv").open()))
    sweeps: dict = defaultdict(list)
    for r in rows:
        sweeps[(r["host"], int(r["gpus"]), r["peer_to_peer"] == "true")].append((float(r["bytes"]),
                                                                                  float(r["time_us"]) * 1e-6))
    model, got = load_model("llama-3-8b"), {}
    for (host, gpus, p2p), points in sweeps.items():
        hw = replace(load_hardware("rtx-4090"), peer_to_peer=p2p)
        cost = CostModel(model, hw, layout_for(model), gpus, None, vllm_execution(hw, gpus, 256, 8192, ""))
        b, s = np.array(points).T
        ratio = cost._allreduce_call_s(b) / s
        got[(host[:14], gpus, p2p)] = (round(float(np.median(ratio[(b >= 4096) & (b <= 2**19)])), 2),
                                       round(float(np.median(ratio[b >= 2**22])), 2))
    assert len(rows) == 166 and len(got) == 6
    assert got == {("kalavai docker", 2, False): (0.39, 0.6), ("kalavai docker", 4, False): (0.52, 0.7),
                   ("kalavai Kubern", 2, False): (0.47, 1.02),
                   ("kalavai Kubern", 4, False): (0.52, 0.71),
                   ("2 x EPYC 7542,", 8, False): (0.92, 3.95), ("2 x EPYC 7542,", 8, True): (0.92, 3.95)}


def test_a_gpu_without_tables_borrows_those_of_its_nvlink_twin() -> None:
    """The A100 SXM4 40 GB sits on the same HGX A100 NVLink fabric as the 80 GB one, whose tables were imported:
    it prices vLLM's all-reduce on them, labelled, where it had the ring model (2 x 7 hops at TP 8). A PCIe GPU
    (peer-to-peer access not in the catalogue) and an NVLink GPU without a twin (MI300X) borrow nothing."""
    twin = vllm_allreduce(load_hardware("a100-sxm-80gb"), 8)
    a40 = vllm_allreduce(load_hardware("a100-sxm-40gb"), 8)
    assert load_collectives("a100-sxm-40gb") is None and a40.custom is twin.custom and a40.nccl is twin.nccl
    assert a40.source.endswith("borrowed from a100-sxm-80gb (same family and NVLink)")
    assert "borrowed" not in twin.source
    for gpu in ("l4", "rtx-4090", "mi300x"):
        assert "borrowed" not in vllm_allreduce(load_hardware(gpu), 4).source


def test_vllm_picks_its_custom_kernel_stage_by_group_size_and_bytes() -> None:
    """csrc/custom_all_reduce.cuh: 2 GPUs always one stage; below 512 KiB at 4 GPUs, 256 KiB at 6-8."""
    sizes = np.array([1024.0, 255 * 1024, 256 * 1024, 511 * 1024, 512 * 1024, 8 * 2**20])
    assert custom_one_stage(2, sizes).all()
    assert custom_one_stage(4, sizes).tolist() == [True, True, True, True, False, False]
    assert custom_one_stage(6, sizes).tolist() == custom_one_stage(8, sizes).tolist() == [True, True, False, False,
                                                                                          False, False]


def _without_custom_table(hw_name: str, tp: int) -> CostModel:
    hw, model = load_hardware(hw_name), load_model("llama-3-8b")
    ex = vllm_execution(hw, tp, 256, 8192, "")
    return CostModel(model, hw, layout_for(model), tp, None, replace(ex, allreduce=replace(ex.allreduce, custom=None)))


def test_the_custom_kernel_without_a_table_is_not_a_ring() -> None:
    """A group that runs vLLM's custom all-reduce with no measured table (MI300X; any GPU at TP 6) prices its
    one- and two-stage kernels on the calibrated link: a decode-sized call barely grows from TP 2 to TP 8,
    where the 2(tp-1)-hop ring grew sevenfold. Over the 17 measured custom tables of the six NVLink GPUs
    (each priced as if it had none) the model is closer than the ring: median |log2(model / measured)| 0.64
    against 1.15 (README)."""
    mi = {tp: _without_custom_table("mi300x", tp) for tp in (2, 8)}
    assert "one-/two-stage kernels" in vllm_allreduce(load_hardware("mi300x"), 8).source
    msg = np.array([8 * 4096 * 2.0])  # 8 tokens of Llama-3-8B's hidden state
    assert mi[8]._allreduce_call_s(msg)[0] < 1.5 * mi[2]._allreduce_call_s(msg)[0]
    assert mi[8]._ring_s(msg, 8, 2)[0] > 4 * mi[2]._ring_s(msg, 2, 2)[0]
    model_err, ring_err = [], []
    for name in hardware_names():
        tables, hw = load_collectives(name), load_hardware(name)
        if tables is None or hw.nvlink_bandwidth_bytes_per_s <= 0:
            continue
        for tp, table in tables.custom.items():
            cost = _without_custom_table(name, tp)
            b, s = np.exp2(table.log2_bytes), np.exp2(table.log2_seconds)
            b, s = b[b <= CUSTOM_MAX_BYTES], s[b <= CUSTOM_MAX_BYTES]
            model_err += list(np.abs(np.log2(cost._allreduce_call_s(b) / s)))
            ring_err += list(np.abs(np.log2(cost._ring_s(b, tp, 2) / s)))
    assert len(model_err) > 200 and np.median(model_err) < 0.8 < np.median(ring_err)


def test_a_qwen3_32b_decode_step_gets_faster_from_tp4_to_tp8_on_h100() -> None:
    """Measured with vLLM 0.12 (../shared/data/measured, 8 clients, 1,024 + 1,024 tokens): TPOT 10.6 ms at
    TP 4, 8.0 ms at TP 8. A ring of 2(tp-1) hops per all-reduce made TP 8 the slower one."""
    model, hw = load_model("qwen3-32b"), load_hardware("h100-sxm")
    steps = {}
    for tp in (4, 8):
        cost = CostModel(model, hw, layout_for(model), tp, None, vllm_execution(hw, tp, 256, 8192, ""))
        steps[tp] = cost.step(Batch(decode_context=np.full(8, 1536, dtype=np.int64)))
    assert steps[8].total_s < 0.85 * steps[4].total_s
    ring = CostModel(model, hw, layout_for(model), 8).step(Batch(decode_context=np.full(8, 1536, dtype=np.int64)))
    assert steps[8].breakdown["allreduce"] < ring.breakdown["allreduce"] / 3  # 14 hops of the ring model


def test_vllm_pads_a_step_to_its_captured_cuda_graph_size() -> None:
    """vllm/config/vllm.py _set_cudagraph_sizes: 1, 2, 4, multiples of 8 to 256, of 16 to
    min(2 x max_num_seqs, 512). A decode batch of 9 runs the graph of 16; past 512 nothing is padded."""
    assert vllm_graph_sizes(256, 8192)[:5] == (1, 2, 4, 8, 16) and vllm_graph_sizes(256, 8192)[-1] == 512
    # past 256 tokens: every 16 from 0.12, every 8 in 0.10.2 and 0.11 (their _set_cudagraph_sizes)
    assert vllm_graph_sizes(256, 8192, vllm_version="0.12.0")[34:36] == (256, 272)
    assert vllm_graph_sizes(256, 8192, vllm_version="0.11.0")[34:36] == (256, 264)
    assert len(vllm_graph_sizes(256, 8192, vllm_version="0.10.2")) == 3 + 64
    assert vllm_graph_sizes(8, 8192)[-1] == 16 and vllm_graph_sizes(256, 64)[-1] == 64
    model, hw = load_model("llama-3-8b"), load_hardware("h100-sxm")
    vllm = CostModel(model, hw, layout_for(model), 1, None, vllm_execution(hw, 1, 256, 8192, ""))
    exact = CostModel(model, hw, layout_for(model), 1)

    def gemm_s(cost: CostModel, batch: int) -> float:
        return cost.step(Batch(decode_context=np.full(batch, 1000, dtype=np.int64))).breakdown["gemm.mlp"]

    assert gemm_s(vllm, 9) == gemm_s(vllm, 16) == gemm_s(exact, 16) != gemm_s(exact, 9)
    assert gemm_s(vllm, 600) == gemm_s(exact, 600)  # above the largest captured size: no graph, no padding
    kv_write = [c.step(Batch(decode_context=np.full(9, 1000, dtype=np.int64))).breakdown["kv_write"]
                for c in (vllm, exact)]
    assert kv_write[0] == kv_write[1]  # the padding rows write no KV
    # --cudagraph-capture-sizes 1..16 (as aiconfigurator's generated deployments pass them): every batch
    # up to 16 has its own graph, so 9 runs at 9; sizes above the token budget are dropped
    assert vllm_graph_sizes(256, 8192, [16, *range(1, 17)]) == tuple(range(1, 17))
    assert vllm_graph_sizes(8, 12, range(1, 17)) == tuple(range(1, 13))
    listed = CostModel(model, hw, layout_for(model), 1, None, vllm_execution(hw, 1, 16, 8192, "", range(1, 17)))
    assert gemm_s(listed, 9) == gemm_s(exact, 9) and gemm_s(listed, 17) == gemm_s(exact, 17)
    # --enforce-eager captures no graph: nothing is padded, and a step takes at least the CPU time of launching
    # its kernels (kvsim/data/eager_launch.yaml, per decoder layer), a labelled prior; the GPU work hides it at
    # large batches, and the breakdown names what it adds
    eager = CostModel(model, hw, layout_for(model), 1, None,
                      vllm_execution(hw, 1, 256, 8192, "0.12.0", enforce_eager=True))
    graphed = CostModel(model, hw, layout_for(model), 1, None, vllm_execution(hw, 1, 256, 8192, "0.12.0"))
    assert gemm_s(eager, 9) == gemm_s(exact, 9) != gemm_s(vllm, 9)
    assert any(n.startswith("PRIOR: engine.enforce_eager") and "eager_launch" in n for n in eager.notes)
    assert not any("enforce_eager" in n for n in vllm.notes)
    layer_s, _ = eager_launch()
    one = eager.step(Batch(decode_context=np.full(1, 1000, dtype=np.int64)))
    host = one.breakdown["host.step"]
    assert one.total_s == pytest.approx(layer_s * model.num_layers + host)  # launch-bound
    assert one.total_s == pytest.approx(sum(one.breakdown.values()))
    # Llama-3-8B, one sequence: 1.5-2.5x the graph's step, as eager steps measured (reference engine 1.9x, public
    # vLLM 1.7-4.3x); at 512 sequences the kernels outlast the launching
    ratio = one.total_s / graphed.step(Batch(decode_context=np.full(1, 1000, dtype=np.int64))).total_s
    assert 1.5 < ratio < 2.5
    big = Batch(decode_context=np.full(512, 1000, dtype=np.int64))
    assert eager.step(big).breakdown["host.eager_launch"] == 0.0
    assert "host.eager_launch" not in graphed.step(big).breakdown


_PAD_MODEL = load_model("llama-3-8b")
_PAD_HW = load_hardware("h100-sxm")
_PAD_EXACT = CostModel(_PAD_MODEL, _PAD_HW, layout_for(_PAD_MODEL), 1)


@settings(max_examples=examples(25))
@given(sizes=st.lists(st.integers(1, 96), min_size=1, max_size=12), budget=st.integers(1, 128),
       batch=st.integers(1, 128))
def test_any_capture_list_pads_a_step_to_the_next_listed_size(sizes: list[int], budget: int, batch: int) -> None:
    """For any --cudagraph-capture-sizes and token budget: the graph sizes are the listed ones within
    the budget, ascending and distinct; a decode batch is priced at the smallest listed size that
    holds it (its model work exactly that size's), or at its own size above the largest."""
    graphs = vllm_graph_sizes(256, budget, sizes)
    assert list(graphs) == sorted({s for s in sizes if s <= budget})
    listed = CostModel(_PAD_MODEL, _PAD_HW, layout_for(_PAD_MODEL), 1, None,
                       vllm_execution(_PAD_HW, 1, 256, budget, "0.19.0", sizes))
    runs_at = next((g for g in graphs if g >= batch), batch)

    def gemm_s(cost: CostModel, rows: int) -> float:
        return cost.step(Batch(decode_context=np.full(rows, 1000, dtype=np.int64))).breakdown["gemm.mlp"]

    # (not >= the unpadded time: measured GEMM curves are not monotone row by row)
    assert gemm_s(listed, batch) == gemm_s(_PAD_EXACT, runs_at)


def test_host_step_adds_without_async_scheduling_and_hides_with_it() -> None:
    """vLLM 0.12 (no async scheduling by default) adds the time between GPU steps, fitted on real
    vLLM 0.12 runs, to the GPU's; 0.19 (async scheduling) hides the engine loop's prior CPU time
    behind a longer GPU step; 0.13 is not modelled."""
    from kvsim.cost.execution import HOST_FIXED_S, HOST_PER_SEQUENCE_S, sync_host_fit, vllm_host_step
    from kvsim.errors import KvsimError

    model, hw = load_model("qwen3-32b"), load_hardware("h100-sxm")
    batch = Batch(decode_context=np.full(64, 1000, dtype=np.int64))
    old = CostModel(model, hw, layout_for(model), 2, None, vllm_execution(hw, 2, 256, 8192, "0.12.0")).step(batch)
    new = CostModel(model, hw, layout_for(model), 2, None, vllm_execution(hw, 2, 256, 8192, "0.19")).step(batch)
    fit = sync_host_fit()
    assert fit is not None and fit.source.startswith("fitted on real vLLM runs")
    assert vllm_host_step("0.12.0").source.startswith(fit.source) and "prior" in vllm_host_step("0.19").source
    assert old.breakdown["host.step"] == pytest.approx(fit.fixed_s + 64 * fit.per_sequence_s)
    assert new.breakdown["host.step"] == pytest.approx(HOST_FIXED_S + 64 * HOST_PER_SEQUENCE_S)
    kernels = sum(o.seconds for o in old.ops if o.name != "host.step")
    assert old.total_s == pytest.approx(kernels + old.breakdown["host.step"], rel=1e-12)  # sync: after the GPU
    assert new.total_s == pytest.approx(max(kernels, new.breakdown["host.step"]), rel=1e-12) == pytest.approx(kernels)
    with pytest.raises(KvsimError, match="0.13"):
        vllm_host_step("0.13.0")


def test_async_scheduling_as_set_overrides_the_versions_default() -> None:
    """`--async-scheduling` on vLLM 0.12 hides the engine loop behind the GPU's step (its prior CPU time,
    overlapped), off on 0.19 adds the fitted time between steps; 0.13 runs once the flag is given, and
    the V0 engine of 0.6.x, which has no such flag, refuses it."""
    from kvsim.cost.execution import HOST_FIXED_S, sync_host_fit, vllm_host_step
    from kvsim.errors import KvsimError

    fit = sync_host_fit()
    assert fit is not None
    on = vllm_host_step("0.12.0", True)
    assert on.overlapped and on.fixed_s == HOST_FIXED_S and on.source.endswith("overlaps the GPU (as set)")
    off = vllm_host_step("0.19", False)
    assert not off.overlapped and off.fixed_s == fit.fixed_s and off.source.endswith("(as set)")
    assert vllm_host_step("0.13.0", True).overlapped and not vllm_host_step("0.13.0", False).overlapped
    assert not vllm_host_step("0.6.5", False).overlapped
    with pytest.raises(KvsimError, match="no --async-scheduling") as err:
        vllm_host_step("0.6.5", True)
    assert err.value.field == "async_scheduling"
