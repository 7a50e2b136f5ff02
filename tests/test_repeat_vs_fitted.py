"""scripts/repeat_vs_fitted.py: a repeated device run against the fitted rows. Known answers on hand-made
CSVs: ratios per kernel over shared points only, the last row of a point counting, ``src=`` rows kept
apart, and the summary's percentiles (sorted ratios at n // 10 and 9 n // 10)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_script

rvf = load_script("repeat_vs_fitted")

GEMM = "dtype,m,n,k,time_s,flops,bytes,layer,run\n"
DECODE = ("method,batch,q_heads,kv_heads,head_dim,context,params,time_s,bytes_read,flops,rel_error,kvsim_spec,phase,"
          "layers,run\n")


def _write(folder: Path, name: str, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)


def test_ratios_per_kernel_over_shared_points(tmp_path: Path) -> None:
    fitted, repeat = tmp_path / "gpu", tmp_path / "gpu" / "repeat_x"
    _write(fitted, "gemm.csv", GEMM + "bf16,1,64,64,4e-6,0,0,a,r1\n"
                                      "bf16,1,64,64,2e-6,0,0,a,r2\n"  # a point measured again: this row counts
                                      "bf16,8,64,64,5e-6,0,0,a,r1\n"
                                      "fp8,1,64,64,1e-6,0,0,a,r1\n")  # the repeat did not measure it
    _write(repeat, "gemm.csv", GEMM + "bf16,1,64,64,3e-6,0,0,a,r3\n"
                                      "bf16,8,64,64,5e-6,0,0,a,r3\n"
                                      "bf16,16,64,64,9e-6,0,0,a,r3\n")  # the fitted rows lack it
    _write(fitted, "attention_decode.csv", DECODE + "fa,1,8,1,64,512,x;src=with-metadata,2e-6,0,0,0,bf16,decode,1,r1\n"
                                                    "fa,1,8,1,64,512,x,1e-6,0,0,0,bf16,decode,1,r1\n")
    _write(repeat, "attention_decode.csv", DECODE + "fa,1,8,1,64,512,x;src=with-metadata,3e-6,0,0,0,bf16,decode,1,r3\n"
                                                    "fa,1,8,1,64,512,x,1e-6,0,0,0,bf16,decode,1,r3\n")
    got = rvf.ratios(repeat, fitted)
    assert sorted(got) == ["attention_decode fa", "attention_decode fa src=with-metadata", "gemm bf16"]
    assert got["gemm bf16"] == pytest.approx([1.5, 1.0])
    assert got["attention_decode fa"] == pytest.approx([1.0])
    assert got["attention_decode fa src=with-metadata"] == pytest.approx([1.5])


def test_summary_takes_percentiles_at_tenths_of_the_sorted_ratios() -> None:
    s = rvf.summary([float(x) for x in range(20, 0, -1)])
    assert s == {"n": 20, "median": 10.5, "p10": 3.0, "p90": 19.0, "min": 1.0, "max": 20.0}
