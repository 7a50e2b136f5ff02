"""The GPU catalogue (kvsim/data/hardware) and its strict loader."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest
import yaml

from kvsim.errors import KvsimError
from kvsim.spec.hardware import hardware_names, load_hardware, peak_flops

REQUIRED = {"a100-sxm-40gb", "a100-sxm-80gb", "h100-sxm", "h100-pcie", "h200-sxm", "b200", "l40s",
            "rtx-4090", "rtx-pro-6000", "mi300x"}


def test_catalogue_has_required_gpus():
    assert REQUIRED <= set(hardware_names())
    assert hardware_names() == sorted(hardware_names())


@pytest.mark.parametrize("name", hardware_names())
def test_catalogue_entry_is_sane(name):
    hw = load_hardware(name)
    assert hw.name == name
    assert hw.memory_bytes > 0
    assert hw.hbm_bandwidth_bytes_per_s > 0
    assert hw.pcie_bandwidth_bytes_per_s > 0
    assert hw.nvlink_bandwidth_bytes_per_s >= 0
    assert hw.interconnect_latency_s > 0
    assert hw.host.memory_bytes > 0 and hw.host.nvme_read_bytes_per_s > 0
    assert hw.sources
    bf16 = peak_flops(hw, "bf16")
    assert 50 < bf16 / hw.hbm_bandwidth_bytes_per_s < 1000  # ridge point, FLOP/byte


def test_peaks_are_frozen():
    hw = load_hardware("h100-sxm")
    with pytest.raises(TypeError):
        hw.peak_flops_per_s["bf16"] = 1.0  # type: ignore[index]


def test_known_answers():
    h100 = load_hardware("h100-sxm")
    assert peak_flops(h100, "bf16") == pytest.approx(989.4e12)
    assert peak_flops(h100, "fp8") == pytest.approx(1978.9e12)
    assert h100.hbm_bandwidth_bytes_per_s == pytest.approx(3.35e12)
    assert h100.nvlink_bandwidth_bytes_per_s == pytest.approx(450e9)
    assert h100.family == "hopper" and h100.display_name == "NVIDIA H100 80GB HBM3"
    assert 79 * 2**30 < h100.memory_bytes < 80 * 2**30
    assert load_hardware("a100-sxm-80gb").hbm_bandwidth_bytes_per_s == pytest.approx(2.039e12)
    assert peak_flops(load_hardware("mi300x"), "bf16") == pytest.approx(1307.4e12)


def test_missing_unit_is_a_clear_error():
    with pytest.raises(KvsimError, match="no fp8 unit"):
        peak_flops(load_hardware("a100-sxm-40gb"), "fp8")
    with pytest.raises(KvsimError, match="unknown dtype"):
        peak_flops(load_hardware("h100-sxm"), "fp4")


def test_unknown_name_suggests_closest():
    with pytest.raises(KvsimError, match="did you mean h100-sxm") as err:
        load_hardware("h100sxm")
    assert err.value.field == "hardware"


def _write(tmp_path: Path, **changes: object) -> Path:
    raw = yaml.safe_load((files("kvsim") / "data" / "hardware" / "h100-sxm.yaml").read_text())
    raw.update(changes)
    path = tmp_path / "my_gpu.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_user_file_loads(tmp_path):
    hw = load_hardware(str(_write(tmp_path, name="my-gpu")))
    assert hw.name == "my-gpu"


def test_unknown_key_names_key_and_file(tmp_path):
    path = _write(tmp_path, hbm_bandwith_bytes_per_s=1e12)
    with pytest.raises(KvsimError, match="unknown key") as err:
        load_hardware(str(path))
    assert err.value.field == "hbm_bandwith_bytes_per_s"
    assert err.value.file == str(path)
    assert "hbm_bandwith_bytes_per_s" in str(err.value) and str(path) in str(err.value)


def test_negative_memory(tmp_path):
    with pytest.raises(KvsimError) as err:
        load_hardware(str(_write(tmp_path, memory_bytes=-1)))
    assert err.value.field == "memory_bytes" and err.value.value == -1


def test_wrong_type_names_dotted_field(tmp_path):
    path = _write(tmp_path, peak_flops_per_s={"fp32": 1e12, "tf32": 1e12, "bf16": "fast",
                                              "fp16": 1e12, "fp8": None, "int8": 1e12})
    with pytest.raises(KvsimError) as err:
        load_hardware(str(path))
    assert err.value.field == "peak_flops_per_s.bf16" and err.value.value == "fast"


def test_missing_field(tmp_path):
    path = _write(tmp_path)
    raw = yaml.safe_load(path.read_text())
    del raw["host"]["memory_bytes"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(KvsimError, match="missing") as err:
        load_hardware(str(path))
    assert err.value.field == "host.memory_bytes"


def test_missing_file():
    with pytest.raises(KvsimError, match="no such hardware file"):
        load_hardware("does/not/exist.yaml")


def test_kvsim_hardware_says_which_gpus_reach_their_peers(capsys) -> None:
    """`kvsim hardware` shows the catalogue's peer_to_peer: every NVLink GPU yes; over PCIe as cited in each
    YAML (the RTX PRO 6000 Server Edition yes, a stock RTX 4090 no, the L40S not known)."""
    import json

    from kvsim.cli import main

    assert main(["hardware", "--json"]) in (0, None)
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert all(r["peer_to_peer"] == "yes" for r in rows.values() if r["nvlink_gb_per_s"] > 0)
    assert [rows[g]["peer_to_peer"] for g in ("rtx-pro-6000", "rtx-4090", "l40s")] == ["yes", "no", "not known"]
