"""vLLM's fused-MoE tiling choice (validation/kernels/vllm_tilings.py): the file name it looks up, the closest
token-count entry, Triton's defaults where an entry names no warps or stages, the block-FP8 BLOCK_K clamp, the
default rules of 0.12 and 0.19 (known answers read off get_default_config), and the shipped table covering every
file the measured shapes need."""
import re

import pytest

from validation.kernels import vllm_tilings as vt

ENTRY = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 256, "GROUP_SIZE_M": 1}
NAME = "E=128,N=768,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"
TABLE = {"versions": {"0.12": {"files": {NAME: {"1": ENTRY, "4": dict(ENTRY, BLOCK_SIZE_M=64, num_warps=8,
                                                                        num_stages=5)}}}}}


def test_device_and_file_names_follow_get_config_file_name():
    assert vt.device_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert vt.device_name("NVIDIA H200 NVL") == "NVIDIA_H200"
    assert vt.intermediate_size(1536, 4096, "qwen3-235b.tp2.w13") == vt.intermediate_size(4096, 768, "x.w2") == 768
    assert vt.file_name(128, 768, "NVIDIA_H200", "fp8_block") == NAME
    with pytest.raises(ValueError, match="neither w13 nor w2"):
        vt.intermediate_size(1, 1, "llama.qkv")


def test_the_closest_entry_first_in_file_order_on_a_tie():
    pick = lambda tokens: vt.vllm_tiling(TABLE, "0.12", "NVIDIA H200", 128, 768, "fp8_block", tokens)  # noqa: E731
    assert pick(2).bm == 16  # 1 and 4 are 1 and 2 away
    assert pick(3).bm == 64
    assert pick(2.5).bm == 16  # a tie: the file's first key
    t = pick(1)
    assert (t.bk, t.warps, t.stages, t.source) == (128, vt.TRITON_WARPS, vt.TRITON_STAGES, "config")  # BK 256 clamped
    assert pick(8192).cfg() == dict(BM=64, BN=128, BK=128, GROUP_M=1, warps=8, stages=5)


def test_default_rules():
    assert vt.default_0_12(128, 128, "fp8") == vt.Tiling(16, 32, 64, 1, 4, 3, "default")
    assert vt.default_0_12(129, 128, "bf16") == vt.Tiling(64, 64, 32, 8, 4, 3, "default")
    assert vt.default_0_12(1, 256, "fp8_block") == vt.Tiling(64, 128, 128, 32, 4, 3, "default")
    assert vt.default_0_19(16, 128, "fp8_block") == vt.Tiling(16, 128, 128, 1, 4, 3, "default")
    assert vt.default_0_19(1024, 128, "bf16") == vt.Tiling(128, 128, 64, 1, 8, 3, "default")
    assert vt.default_0_19(64, 8, "fp8") == vt.Tiling(32, 64, 128, 1, 4, 3, "default")
    assert vt.default_0_19(8192, 8, "bf16").group_m == 16  # 1,024 tokens per expert


def test_a_missing_file_takes_the_versions_default_rule():
    table = {"versions": {v: {"files": {NAME: None}} for v in vt.DEFAULT_RULES}}
    for version, rule in vt.DEFAULT_RULES.items():
        assert vt.vllm_tiling(table, version, "NVIDIA H200", 128, 768, "fp8_block", 32) == rule(32, 128, "fp8_block")
    with pytest.raises(KeyError, match="regenerate"):
        vt.vllm_tiling(table, "0.12", "NVIDIA H100 80GB HBM3", 128, 768, "fp8_block", 32)


def test_the_shipped_table_holds_every_file_the_shapes_need():
    pytest.importorskip("torch")  # validation.gemm, which lists the shapes, imports torch
    table = vt.load_table()
    assert set(table["versions"]) == set(vt.DEFAULT_RULES)
    for version in vt.DEFAULT_RULES:
        files = table["versions"][version]["files"]
        assert sorted(files) == sorted(vt.needed_files())
        for name, entries in files.items():
            if entries and "block_shape" in name:  # kernels/fused_moe.py takes one scale block per K step
                e, n = (int(x) for x in re.match(r"E=(\d+),N=(\d+),", name).groups())
                gpu = "NVIDIA H200" if "H200" in name else "NVIDIA H100 80GB HBM3"
                bks = {vt.vllm_tiling(table, version, gpu, e, n, "fp8_block", int(m)).bk for m in entries}
                assert bks == {vt.SCALE_BLOCK}


def test_summary_pairs_each_vllm_row_with_its_calls_best_of_13(tmp_path):
    head = "mode,experts,top_k,tokens,active_experts,n,k,time_s,flops,bytes,rel_error,layer,params,run\n"
    row = "fp8,128,8,{t},8,1536,4096,{s},1,1,1e-3,x.w13,src={src};BM=16,{run}\n"
    path = tmp_path / "fused_moe.csv"
    path.write_text(head + "".join(row.format(t=t, s=s, src=src, run=run) for t, s, src, run in [
        (1, 1.0, "best-of-13", "a"), (1, 1.5, "vllm-0.12-default", "a"), (1, 1.2, "vllm-0.19-default", "a"),
        (1, 2.0, "best-of-13", "b"), (1, 2.0, "vllm-0.12-default+vllm-0.19-default", "b"),
        (4096, 1.0, "vllm-0.12-config", "c")]))  # no best-of-13 beside it: not counted
    lines = vt.summary(str(path)).splitlines()[1:]
    assert [line.split() for line in lines] == [["0.12", "fp8", "1-16", "2", "1.250", "1.000", "1.500"],
                                               ["0.19", "fp8", "1-16", "2", "1.100", "1.000", "1.200"]]
