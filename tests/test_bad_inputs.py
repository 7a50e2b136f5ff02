"""A battery of user mistakes over every subcommand: each one exits 2 with one line on stderr that
names what is wrong, never a traceback or a hang (issue 10, items 4, 5 and 7). Run in-process; the
few cases about signals and worker processes run `kvsim` as a subprocess, bounded by timeouts."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kvsim.cli import main
from kvsim.kv import METHODS
from kvsim.scenario.schema import ScenarioSpec

ROOT = Path(__file__).resolve().parents[1]
H100 = (ROOT / "kvsim" / "data" / "hardware" / "h100-sxm.yaml").read_text()
LLAMA = (ROOT / "models" / "llama-3-8b.yaml").read_text()
SCENARIO = {"model": "llama-3-8b", "hardware": "h100-sxm",
            "workload": {"synthetic": {"rate": 8.0, "num_requests": 20, "input": {"kind": "fixed", "tokens": 256},
                                       "output": {"kind": "fixed", "tokens": 16}}},
            "slo": {"ttft_s": 0.5, "tpot_s": 0.05}}
DEPLOY = ["--model", "llama-3-8b", "--hardware", "h100-sxm"]


# ---------------------------------------------------------------- the table

def _method_cases() -> list[list[str]]:
    """Every numeric parameter of every method set to NaN, infinities and overflowing values,
    the rest of the method's example spec kept."""
    cases = []
    for m in METHODS.values():
        base = dict(p.split("=", 1) for p in m.example.partition(":")[2].split(",") if "=" in p)
        for p in m.params:
            bad = {float: ["nan", "inf", "-inf", "x"], int: ["nan", "1e400", "9" * 30, "1.5x"],
                   bool: ["maybe"], str: ["no-such-choice"] if p.choices else []}[p.kind]
            for value in bad:
                spec = ",".join(f"{k}={v}" for k, v in {**base, p.name: value}.items())
                cases.append(["memory", *DEPLOY, "--method", f"{m.name}:{spec}"])
    return cases


def _numeric_fields(model: type, prefix: str = "") -> list[str]:
    """Dotted paths of the scenario schema's number fields."""
    from kvsim.scenario.load import _submodel

    out = []
    for name, f in model.model_fields.items():
        sub = _submodel(f.annotation)
        if sub is not None:
            out += _numeric_fields(sub, f"{prefix}{name}.")
        elif {int, float} & {f.annotation, *getattr(f.annotation, "__args__", ())}:
            out.append(prefix + name)
    return out


def _scenario_cases(sc: str) -> list[list[str]]:
    cases = []
    for path in _numeric_fields(ScenarioSpec):
        if ".sessions." in path or ".shared_prefix." in path or "input." in path or "output." in path:
            continue  # needs a sibling block to exist; covered by the schema tests
        for value in (".nan", ".inf", "-.inf", "-1", "true", "abc", "[1]", "1e400"):
            cases.append(["run", sc, "--set", f"{path}={value}"])
    for key, value in (("workload.synthetic.num_requests", "1000000000000"),
                       ("workload.synthetic.num_requests", "1e12"),
                       ("tp", "3"), ("model", "no-such-model"),
                       ("hardware", "h100"), ("method", "kivi:bits=nan"), ("router", "random"),
                       ("engine.preemption", "never"), ("nope", "1"), ("engine.nope", "1"), ("slo", "1"),
                       # SGLang's flag on a vLLM engine, and a flag that is not a boolean
                       ("engine.enable_mixed_chunk", "true"), ("engine.enable_mixed_chunk", "sometimes")):
        cases.append(["run", sc, "--set", f"{key}={value}"])
    cases.append(["run", sc, "--set", "no-equals-sign"])
    return cases


def _write(folder: Path, name: str, data: str | bytes) -> str:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return str(path)


def _file_cases(d: Path) -> list[list[str]]:
    cases: list[list[str]] = []
    sc = _write(d, "ok.yaml", yaml.safe_dump(SCENARIO))
    cases += _scenario_cases(sc)
    # scenario files themselves
    for i, text in enumerate([b"model: a\nmodel: b\n", b"[1, 2]\n", b"a: [\n", b"\xff\xfe\x00", b"",
                              yaml.safe_dump({**SCENARIO, "extra": 1}).encode(),
                              (yaml.safe_dump(SCENARIO) + "hardware: b200\n").encode()]):
        cases.append(["run", _write(d, f"sc{i}.yaml", text)])
    cases.append(["run", str(d / "missing.yaml")])
    # GPU YAML variants
    gpu = yaml.safe_load(H100)
    variants = [H100 + "name: other\n", "[]\n", "a: [\n", "", H100.replace("name: h100-sxm", "name: 7")]
    for key in ("name", "memory_bytes", "sm_count", "hbm_bandwidth_bytes_per_s", "family", "host", "peak_flops_per_s",
                "peer_to_peer"):
        variants.append(yaml.safe_dump({k: v for k, v in gpu.items() if k != key}))
    for key in ("memory_bytes", "hbm_bandwidth_bytes_per_s", "max_gpus_per_node", "interconnect_latency_s"):
        for value in (".nan", ".inf", "-1", "0", "true", "abc"):
            variants.append(H100.replace(f"\n{key}: ", f"\n{key}: {value} #"))
    # an NVLink GPU always reaches its peers; peer access is a yes, a no or null (not known)
    variants += [H100.replace("\npeer_to_peer: ", f"\npeer_to_peer: {value} #")
                 for value in ("false", "null", "1", "yes x")]
    for i, text in enumerate(variants):
        path = _write(d, f"gpu{i}.yaml", text)
        cases.append(["memory", "--model", "llama-3-8b", "--hardware", path])
        cases.append(["run", sc, "--set", f"hardware={path}"])
    cases.append(["memory", "--model", "llama-3-8b", "--hardware", _write(d, "gpu-bin.yaml", b"\xff\xfe")])
    cases.append(["memory", "--model", "llama-3-8b", "--hardware", str(d / "nope.yaml")])
    # model YAML variants: every top-level key dropped, duplicates, bad layer patterns
    model = yaml.safe_load(LLAMA)
    mvariants = [LLAMA + "name: again\n", "[]\n", "", b"\xff".decode("latin-1")]
    # (architecture may be absent: only the vLLM versions that pick a model runner by it need it, and
    # those say so; tests/test_memory.py)
    mvariants += [yaml.safe_dump({k: v for k, v in model.items() if k != key})
                  for key in model if key != "architecture"]
    for pattern in (["flash"], ["sliding:0"], ["sliding:x"], ["full kv=99"], ["full bogus"], ["mla"]):
        mvariants.append(yaml.safe_dump({**model, "layers": [{"repeat": 2, "pattern": pattern}]}))
    for i, text in enumerate(mvariants):
        cases.append(["memory", "--model", _write(d, f"model{i}.yaml", text), "--hardware", "h100-sxm"])
    # HF config.json variants
    for i, text in enumerate(["{", "[]", "{}", '{"model_type": "llama"}', b"\xff\xfe{}",
                              json.dumps({"model_type": "llama", "hidden_size": "x", "num_hidden_layers": 2}),
                              json.dumps({"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 0,
                                          "num_hidden_layers": 2, "intermediate_size": 1, "vocab_size": 10})]):
        cases.append(["memory", "--model", _write(d, f"hf{i}/config.json", text), "--hardware", "h100-sxm"])
    cases.append(["memory", "--model", str(d / "no" / "config.json"), "--hardware", "h100-sxm"])
    # traces of every format with broken rows and encodings
    good = {"csv": "arrival_time_s,input_tokens,output_tokens\n0.0,100,10\n",
            "azure": "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,100,10\n",
            "mooncake": '{"timestamp": 0, "input_length": 100, "output_length": 10, "hash_ids": [1]}\n'}
    broken = {"csv": ["0.1,\xff,10", "0.1,99999999999999999999,10", "0.1,100", "nan,1,1", "0.1,1e3,1",
                      "0.1,100,10,extra", "-1,1,1", "0.1,0,1", "inf,1,1", '0.1,"1\x00,1'],
              "azure": ["2023-11-16 18:15:47.0,\xff,1", "2023-11-16 18:15:47.0,99999999999999999999,1",
                        "yesterday,1,1", "2023-11-16 18:15:47.0,1", "2023-11-16 18:15:47.0,0,1"],
              "mooncake": ['{"timestamp": 1, "input_length": 1e400, "output_length": 1}',
                           '{"timestamp": 1, "input_length": 99999999999999999999, "output_length": 1}',
                           '{"timestamp": 1, "input_length": 100, "output_length": 1, "hash_ids": [1e30]}',
                           '{"timestamp": 1, "input_length": 100, "output_length": 1, '
                           '"hash_ids": [999999999999999999999]}',
                           '{"timestamp": "x", "input_length": 1, "output_length": 1}', "{", "[1]",
                           '{"timestamp": 1, "input_length": true, "output_length": 1}', "\xff"]}
    for fmt, rows in broken.items():
        for i, row in enumerate(rows):
            path = _write(d, f"trace-{fmt}-{i}.txt", good[fmt].encode() + row.encode("utf-8", "surrogateescape")
                          .replace("\xff".encode(), b"\xff") + b"\n")
            cases.append(["run", sc, "--set", "workload.synthetic=null", "--set", f"workload.trace={path}",
                          "--set", f"workload.format={fmt}"])
        header_only = _write(d, f"trace-{fmt}-empty.txt", good[fmt].splitlines()[0] + "\n" if fmt != "mooncake" else "")
        cases.append(["run", sc, "--set", "workload.synthetic=null", "--set", f"workload.trace={header_only}",
                      "--set", f"workload.format={fmt}"])
    cases.append(["run", sc, "--set", "workload.synthetic=null", "--set", f"workload.trace={d / 'no.csv'}"])
    # a damaged ServeGen client folder
    for i, dataset in enumerate(["{", "[]", '{"x": {}}', '{"0": {"input_tokens": "{a: b}", "output_tokens": "{1: 1}"}}',
                                 '{"0": {"input_tokens": "{1: nan}", "output_tokens": "{1: 1}"}}', b"\xff"]):
        _write(d, f"sg{i}/chunk-1-trace.csv", "0,1.0,1.0,Exponential,0,0\n")
        _write(d, f"sg{i}/chunk-1-dataset.json", dataset)
        cases.append(["run", sc, "--set", "workload.synthetic=null", "--set", f"workload.trace={d / f'sg{i}'}",
                      "--set", "workload.max_requests=5"])
    _write(d, "sgbad/chunk-1-trace.csv", "0,nan,1.0,Exponential,0,0\n")
    cases.append(["run", sc, "--set", "workload.synthetic=null", "--set", f"workload.trace={d / 'sgbad'}"])
    # sweep and search files
    sweeps = [{"grid": "x"}, {"grid": {"tp": "x"}}, {"grid": {"nope": [1]}}, {"zip": {"tp": [1], "seed": [1, 2]}},
              {"variants": [{"set": {}}]}, {"variants": [{"name": "a", "set": {"nope": 1}}]},
              {"grid": {"workload.synthetic.rate": [float("nan")]}}, {"grid": {"method": ["kivi:bits=nan"]}},
              {"search": {"tolerance": 2}}, {"unknown": 1}, [1]]
    for i, sw in enumerate(sweeps):
        path = _write(d, f"sweep{i}.yaml", yaml.safe_dump({**SCENARIO, "sweep": sw}))
        cases.append(["sweep", path, "--dry-run"])
        cases.append(["search", path, "--jobs", "1"])
    swp = _write(d, "sweep-ok.yaml", yaml.safe_dump({**SCENARIO, "sweep": {"grid": {"seed": [1, 2]}}}))
    for rate in ("nan", "inf", "-1", "0"):
        cases.append(["search", swp, "--target-rate", rate])
    cases += [["sweep", swp, "--jobs", "0", "--out", str(d / "s")], ["sweep", swp], ["search", swp, "--configs", "99"],
              ["search", swp, "--configs", "nope=1"], ["sweep", swp, "--backend", "local", "--address", "x:1",
                                                       "--out", str(d / "s2")]]
    # output paths: under a file, an unsupported figure suffix, a folder of another run
    afile = _write(d, "afile", "x")
    foreign = d / "foreign"
    foreign.mkdir()
    _write(foreign, "notes.txt", "mine")
    oldrun = d / "oldrun"
    for name in ("summary.json", "requests.csv"):
        _write(oldrun, name, "{}")
    cases += [["run", sc, "--out", f"{afile}/sub"], ["run", sc, "--out", afile], ["run", sc, "--out", str(foreign)],
              ["run", sc, "--out", str(foreign), "--force"], ["run", sc, "--out", str(oldrun)],
              ["sweep", swp, "--out", f"{afile}/x"], ["sweep", swp, "--out", str(oldrun)],
              ["search", swp, "--out", f"{afile}/x"], ["report", str(d), "--out", f"{afile}/r.html"]]
    for suffix in (".bmp", ".txt"):
        cases.append(["plot", "capacity", *DEPLOY, "--out", str(d / f"fig{suffix}")])
    cases.append(["plot", "capacity", *DEPLOY, "--out", f"{afile}/fig.png"])
    # plots, report and validation inputs
    cases += [["plot", "capacity", "--model", "nope", "--hardware", "h100-sxm", "--out", str(d / "f.png")],
              ["plot", "capacity", "--out", str(d / "f.png")],
              ["plot", "capacity", *DEPLOY, "--contexts", "nan", "--out", str(d / "f.png")],
              ["plot", "capacity", *DEPLOY, "--methods", "kivi:bits=nan", "--out", str(d / "f.png")],
              ["plot", "capacity-grid", "--model", "llama-3-8b,nope", "--hardware", "h100-sxm",
               "--out", str(d / "f.png")],
              ["plot", "latency", "--results", str(d / "none"), "--out", str(d / "f.png")],
              ["plot", "kv-usage", "--results", str(d), "--out", str(d / "f.png")],
              ["plot", "validation", "--gpu", "nope", "--out", str(d / "f.png")],
              ["report", str(d / "none")], ["report", str(oldrun)]]
    for i, (results, plan, search) in enumerate([
            ("point,variant,status,error,key\n1,,ok,,k\n", "{", None),
            ("\xff\n", "{}", None), ("a,b\n1,2\n", "{}", None),
            ("point,variant,status,error,key\n", '{"file": 1}', None),
            ("point,variant,status,error,key\n", '{"file": "f", "paths": [], "points": []}', "{"),
            ("point,variant,status,error,key\n", '{"file": "f", "paths": [], "points": []}', '{"configs": [{}]}')]):
        folder = d / f"damaged{i}"
        _write(folder, "results.csv", results.encode("latin-1"))
        _write(folder, "sweep.json", plan)
        if search is not None:
            _write(folder, "search.json", search)
        cases.append(["report", str(folder)])
    cases.append(["plot", "latency", "--results", str(d / "damaged2"), "--out", str(d / "f.png")])
    for i, text in enumerate(["time_s,blocks_used\n1,2\n", "\xff", "time_s,blocks_used,blocks_cached_free,blocks_free,"
                              "running,waiting\n1,2\n"]):
        _write(d / f"kv{i}", "timeseries.csv", text.encode("latin-1"))
        cases.append(["plot", "kv-usage", "--results", str(d / f"kv{i}"), "--out", str(d / "f.png")])
    for i, text in enumerate(["kind,model\n", "kind,model,measured,predicted\ndecode,m,x,1\n",
                              "kind,model,measured,predicted\ndecode,m,-1,1\n", "\xff"]):
        _write(d / "val" / f"g{i}", "validation.csv", text.encode("latin-1"))
        cases.append(["plot", "validation", "--gpu", f"g{i}", "--validation-results", str(d / "val"),
                      "--out", str(d / "f.png")])
        cases.append(["report", str(d / "damaged5"), "--validation", f"g{i}", "--validation-results", str(d / "val")])
    cases += [["calibrate", "--gpu", "nope"], ["calibrate", "--gpu", "x", "--results", str(d)],
              ["validate", "--gpu", "nope"], ["validate", "--gpu", "h100-sxm", "--calibration-from", "nope"]]
    # memory and predict sizes, names and calibrations
    for flag, values in (("--context", ["0", "-1", "100000000"]), ("--batch", ["0", "-5"]), ("--tp", ["0", "-1", "3"]),
                         ("--block-size", ["0"]), ("--max-num-seqs", ["0"]), ("--max-num-batched-tokens", ["0"]),
                         ("--gpu-memory-utilization", ["nan", "inf", "0", "-1", "2"])):
        cases += [["memory", *DEPLOY, flag, v] for v in values]
    # vLLM releases kvsim has no memory or batch rule for (before, between and after the modelled ranges)
    cases += [["memory", *DEPLOY, "--vllm-version", v] for v in ("0.5.0", "0.8.0", "99.0.0", "x", "", " ")]
    # what argparse itself refuses: an unknown command or option, a bad choice or type, a missing argument
    cases += [[], ["nope"], ["memory", *DEPLOY, "--bogus", "1"], ["memory", *DEPLOY, "--weights", "fp4"],
              ["memory", *DEPLOY, "--tp", "x"], ["memory", "--hardware", "h100-sxm"], ["predict", *DEPLOY]]
    for flag, values in (("--batch", ["0", "x", "nan", "", "1e400"]), ("--context", ["0", "nan", "1e400", "100000"]),
                         ("--prompt", ["0", "-1", "100000"]), ("--calibration", [str(d / "nope.yaml"), sc, afile]),
                         ("--tp", ["0", "3"])):
        for v in values:
            argv = ["predict", *DEPLOY, "--batch", "1", "--context", "128", flag, v]
            cases.append(argv)
    for name in ("", "llama", "../x", "nope.yaml"):
        cases.append(["memory", "--model", name, "--hardware", "h100-sxm"])
        cases.append(["memory", "--model", "llama-3-8b", "--hardware", name])
    for spec in ("", "+", "kivi:bits", "kivi:bits=", "kivi:nope=1", "nope", "kivi:bits=2+kivi:bits=4",
                 "snapkv:budget=-1", "fp8:format=e9m9", "kivi:bits=2,bits=4"):
        cases.append(["memory", *DEPLOY, "--method", spec])
    # found by a bug hunt (2026-12-07): each was a traceback, a hang or a silently wrong number
    long_name = str(d / ("a" * 300))
    cases += [["run", sc, "--out", ""], ["run", sc, "--out", " "], ["run", sc, "--out", long_name],
              ["sweep", sc, "--out", long_name], ["plot", "capacity", *DEPLOY, "--out", long_name + ".png"]]
    cases += [["memory", *DEPLOY, "--vllm-version", "0.20", "--cuda-graph-gib", v]
              for v in ("nan", "inf", "1e400", "-1")]
    cases += [["predict", *DEPLOY, "--batch", "2.9", "--context", "4096"],
              ["predict", *DEPLOY, "--batch", "2", "--context", "4096,2.7"]]
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
          "max_position_embeddings": 8192}
    for key, value in (("num_hidden_layers", 1.5), ("num_attention_heads", "32"), ("hidden_size", True)):
        path = _write(d / f"hf-{key}", "config.json", json.dumps({**hf, key: value}))
        cases.append(["memory", "--model", path, "--hardware", "h100-sxm"])
    cases += [["memory", *DEPLOY, "--tp", "16"],
              ["memory", "--model", "llama-2-13b", "--hardware", "h100-sxm", "--tp", "5"],
              ["memory", *DEPLOY, "--block-size", "7"], ["run", sc, "--set", "engine.block_size=100000"],
              ["memory", *DEPLOY, "--method", "offload:gpu_tokens=0"], ["memory", *DEPLOY, "--method", "ttkv:recent=0"]]
    cases += [["plot", "capacity", *DEPLOY, "--methods", "", "--out", str(d / "f.png")],
              ["plot", "capacity", *DEPLOY, "--contexts", "100000", "--out", str(d / "f.png")],
              ["predict", "--model", "llama-3-8b", "--hardware", "mi300x", "--weights", "nvfp4", "--batch", "1",
               "--context", "128"],
              ["run", sc, "--set", "engine.vllm_version=0.13"]]
    serving = str(ROOT / "validation" / "reference" / "public_vllm_serving.csv")
    cases += [["validate", "--serving", serving, "--calibration", str(d / "nope.yaml")],
              ["validate", "--serving", serving, "--calibration-from", "h100-sxm"],
              ["validate", "--serving", serving, "--results", str(d)],
              ["validate", "--gpu", "h100-sxm", "--calibration", "imported"]]
    return cases + _method_cases()


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> list[list[str]]:
    return _file_cases(tmp_path_factory.mktemp("bad"))


def test_table_is_large(table: list[list[str]]) -> None:
    assert len(table) >= 400, len(table)


def test_every_bad_input_is_one_line_and_exit_2(table: list[list[str]], capsys: pytest.CaptureFixture) -> None:
    failures = []
    for argv in table:
        try:
            main(argv)
            code: object = 0
        except SystemExit as e:
            code = e.code
        except Exception as e:  # noqa: BLE001 - a traceback is what this test hunts
            code = f"{type(e).__name__}: {e}"
        err = capsys.readouterr().err.strip()
        if code != 2 or len(err.splitlines()) != 1 or not err.startswith("kvsim: error: "):
            failures.append(f"{argv}: exit {code}: {err[:300]!r}")
    assert not failures, f"{len(failures)} of {len(table)}:\n" + "\n".join(failures)


# ---------------------------------------------------------------- outputs

def test_output_files_get_the_umask(tmp_path: Path) -> None:
    from kvsim.fileio import write_atomic

    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640


def test_run_out_replaces_a_run_only_with_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sc = _write(tmp_path, "s.yaml", yaml.safe_dump(SCENARIO))
    out = tmp_path / "out"
    main(["run", sc, "--out", str(out), "--json"])
    first = json.loads((out / "summary.json").read_text())
    with pytest.raises(SystemExit):
        main(["run", sc, "--out", str(out), "--set", "seed=5"])
    main(["run", sc, "--out", str(out), "--set", "seed=5", "--force", "--json"])
    assert json.loads((out / "summary.json").read_text()) != first
    assert sorted(p.name for p in out.iterdir()) == ["requests.csv", "summary.json", "timeseries.csv", "trace.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging folder left


def test_run_force_never_deletes_a_folder_named_like_a_run_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--force replaces an earlier run's four files; a user's folder that happens to be called
    trace.json is not one of them, and survives."""
    sc = _write(tmp_path, "s.yaml", yaml.safe_dump(SCENARIO))
    out = tmp_path / "out"
    (out / "trace.json").mkdir(parents=True)
    (out / "trace.json" / "precious.txt").write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["run", sc, "--out", str(out), "--force"])
    assert e.value.code == 2 and "not a `kvsim run` output (trace.json)" in capsys.readouterr().err
    assert (out / "trace.json" / "precious.txt").read_text() == "x"


def test_sweep_force_never_deletes_a_users_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--force discards a sweep's own files; a user's folder under runs/ (where --keep-runs writes run
    folders) or under a sweep file's name survives."""
    sc = _write(tmp_path, "s.yaml", yaml.safe_dump(SCENARIO))
    out = tmp_path / "out"
    for mine in (out / "runs" / "mine", out / "results.csv"):
        mine.mkdir(parents=True)
        (mine / "precious.txt").write_text("x")
        with pytest.raises(SystemExit) as e:
            main(["sweep", sc, "--out", str(out), "--force"])
        assert e.value.code == 2 and "--force would delete what is not a sweep's output" in capsys.readouterr().err
        assert (mine / "precious.txt").read_text() == "x"


def test_a_sweep_refuses_another_sweeps_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = _write(tmp_path, "a.yaml", yaml.safe_dump({**SCENARIO, "sweep": {"grid": {"seed": [1]}}}))
    b = _write(tmp_path, "b.yaml", yaml.safe_dump({**SCENARIO, "sweep": {"grid": {"seed": [2]}}}))
    out = str(tmp_path / "out")
    main(["sweep", a, "--out", out, "--jobs", "1"])
    main(["sweep", a, "--out", out, "--jobs", "1"])  # its own folder: resumes
    assert "1 already done" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["sweep", b, "--out", out, "--jobs", "1"])
    assert e.value.code == 2 and "another sweep" in capsys.readouterr().err
    main(["sweep", b, "--out", out, "--jobs", "1", "--force"])
    assert len((tmp_path / "out" / "points.jsonl").read_text().splitlines()) == 1


def test_a_user_gpu_yaml_wins_over_the_catalogue_entry_of_its_name(tmp_path: Path) -> None:
    from kvsim.cost import Batch, CostModel
    from kvsim.kv import layout_for
    from kvsim.spec.hardware import load_hardware
    from kvsim.spec.model import load_model

    slow = _write(tmp_path, "slow.yaml", H100.replace("hbm_bandwidth_bytes_per_s: 3.35e+12",
                                                      "hbm_bandwidth_bytes_per_s: 1.0e+12"))
    model = load_model("llama-3-8b")
    import numpy as np

    times = [CostModel(model, load_hardware(hw), layout_for(model), 1).step(
        Batch(decode_context=np.full(32, 4096))).total_s for hw in ("h100-sxm", slow)]
    assert times[1] > 2 * times[0]


def test_duplicate_yaml_keys_name_the_key(tmp_path: Path) -> None:
    from kvsim.errors import KvsimError
    from kvsim.fileio import read_yaml_file

    path = tmp_path / "d.yaml"
    path.write_text("a: 1\nb: {c: 1, c: 2}\n")
    with pytest.raises(KvsimError, match=r"d\.yaml.*line 2.*duplicate key 'c'"):
        read_yaml_file(path, "a test file")


# ---------------------------------------------------------------- signals and workers (subprocesses)

def _slow_sweep(tmp_path: Path) -> tuple[str, Path]:
    slow = {**SCENARIO, "workload": {"synthetic": {**SCENARIO["workload"]["synthetic"], "num_requests": 200000}},
            "sweep": {"grid": {"seed": [1, 2, 3, 4, 5, 6]}}}
    return _write(tmp_path, "slow.yaml", yaml.safe_dump(slow)), tmp_path / "out"


def _start(tmp_path: Path, marker: Path) -> tuple[subprocess.Popen, Path]:
    sc, out = _slow_sweep(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(marker)])}
    argv = [sys.executable, "-m", "kvsim.cli", "sweep", sc, "--jobs", "2", "--quiet", "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while len(_processes_with(marker)) < 3 and time.monotonic() < deadline:  # parent, forkserver, workers
        time.sleep(0.2)
    return proc, out


def _processes_with(marker: Path) -> list[int]:
    """Pids whose command line names ``marker`` (the sweep's PYTHONPATH, inherited by its pool)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(marker).encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


linux_only = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")


@linux_only
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_is_one_line_and_the_sweep_resumes(tmp_path: Path, sig: int, code: int) -> None:
    marker = tmp_path / f"marker-{sig}"
    proc, out = _start(tmp_path, marker)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (out / "sweep.json").is_file()
    deadline = time.monotonic() + 10
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_with(marker)


@linux_only
def test_workers_die_with_a_killed_parent(tmp_path: Path) -> None:
    marker = tmp_path / "marker-kill"
    proc, _ = _start(tmp_path, marker)
    assert len(_processes_with(marker)) >= 3
    proc.kill()
    proc.communicate(timeout=30)  # returns only once no process holds its pipes
    deadline = time.monotonic() + 10
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_with(marker)


def test_an_unmodelled_vllm_version_names_the_modelled_ranges(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["memory", *DEPLOY, "--vllm-version", "0.5.0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "vllm_version='0.5.0'" in err and "modelled: " in err and "0.12.0-<" in err, err
