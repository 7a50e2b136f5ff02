"""Machine ceilings measured in every run: copy bandwidth, bf16/fp8 GEMM rate, pinned H2D/D2H,
disk read (page cache dropped + O_DIRECT), KV-blob file->GPU load (MatKV-style), device memory,
and metadata.  Writes meta.json and ceilings.json into --out."""
from __future__ import annotations

import datetime
import json
import mmap
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from validation.common import bench, bench_events, guarded, load_ceilings, log, part_args  # noqa: E402


def sh(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"ERR {e}"


def metadata() -> dict:
    import torch
    import triton

    p = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    smi = sh("nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,"
             "power.limit,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader")
    return dict(
        date_utc=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        gpu_name=p.name,
        sm_count=p.multi_processor_count,
        l2_bytes=getattr(p, "L2_cache_size", None),
        compute_capability=f"{p.major}.{p.minor}",
        total_memory_bytes=p.total_memory,
        mem_get_info_free_bytes=free,
        mem_get_info_total_bytes=total,
        nvidia_smi=smi,
        driver=sh("nvidia-smi --query-gpu=driver_version --format=csv,noheader"),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        triton=triton.__version__,
        python=platform.python_version(),
        kernel=platform.release(),
        cpu_count=os.cpu_count(),
        nvcc=sh("nvcc --version | tail -2 | head -1"),
    )


def warm_up(seconds: float = 1.5):
    """Run bf16 GEMMs for ~`seconds` so the clocks leave idle (an idle H100 read 345 MHz; the first
    full run measured its copy ceiling at idle clocks: 2.44 TB/s, below the 3.12 its kernels reached)."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t0 = time.time()
    n = 0
    while time.time() - t0 < seconds:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        n += 10
    del a
    torch.cuda.empty_cache()
    return dict(seconds=round(time.time() - t0, 2), gemms=n, clocks=sh("nvidia-smi --query-gpu=clocks.sm,clocks.mem "
                                                                           "--format=csv,noheader"))


def copy_bw(sizes_gib=(1.0, 2.0, 4.0, 8.0)):
    """Device-to-device copy, bytes read + written, at several sizes: the best median is the ceiling."""
    import torch

    per = {}
    for gib in sizes_gib:
        n = int(gib * 2**30) // 4  # two buffers of gib/2 each: gib moved per copy
        a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        b = torch.empty_like(a)
        med, p10, p90 = bench(lambda: b.copy_(a), rep_ms=100)
        assert torch.equal(a[-1024:], b[-1024:])
        per[str(gib)] = (2 * a.numel() * a.element_size()) / med
        del a, b
        torch.cuda.empty_cache()
    best = max(per, key=per.get)
    return dict(bw_Bps=per[best], best_gib=float(best), by_size_Bps=per, note="read+write, best median over sizes")


def stream_bw(sizes_gib=(1.0, 4.0, 8.0)):
    """Read-only and write-only ceilings (validation/kernels/stream.py), each the best median over
    sizes far above L2 and over a few launch shapes; torch's own sum (read) and fill_ (write) are
    timed too and the better one kept, with which one in `impl`. Reads are checked against a float64
    sum; writes by reading back."""
    import torch

    from validation.kernels.stream import stream_read, stream_write

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    res = {"read": {}, "write": {}}
    for gib in sizes_gib:
        n = int(gib * 2**30) // 2
        x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        part = torch.empty(64 * sms, device="cuda", dtype=torch.float32)
        ref = x.double().sum().item() if gib <= 1.0 else None
        for progs, block, warps in ((4 * sms, 4096, 8), (8 * sms, 2048, 8), (16 * sms, 2048, 4), (32 * sms, 1024, 4)):
            part.fill_(float("nan"))
            g = stream_read(x, part, progs, block, warps)
            torch.cuda.synchronize()
            got = part[:g].double().sum().item()
            if ref is not None:
                assert abs(got - ref) <= 1e-3 * max(1.0, abs(ref)) + 1e-2 * (n ** 0.5), (got, ref)
            med, _, _ = bench(lambda: stream_read(x, part, progs, block, warps), rep_ms=100)
            res["read"][f"{gib}GiB triton p{progs} b{block} w{warps}"] = n * 2 / med
        med, _, _ = bench(lambda: x.sum(dtype=torch.float32), rep_ms=100)
        res["read"][f"{gib}GiB torch.sum"] = n * 2 / med
        for progs, block, warps in ((4 * sms, 4096, 8), (16 * sms, 2048, 4)):
            x.fill_(0.0)
            stream_write(x, 1.5, progs, block, warps)
            torch.cuda.synchronize()
            assert bool((x == 1.5).all()), "stream_write left elements unwritten"
            med, _, _ = bench(lambda: stream_write(x, 2.5, progs, block, warps), rep_ms=100)
            res["write"][f"{gib}GiB triton p{progs} b{block} w{warps}"] = n * 2 / med
        med, _, _ = bench(lambda: x.fill_(3.5), rep_ms=100)
        res["write"][f"{gib}GiB torch.fill_"] = n * 2 / med
        del x, part
        torch.cuda.empty_cache()
    out = {}
    for kind, d in res.items():
        best = max(d, key=d.get)
        out[kind] = dict(bw_Bps=d[best], impl=best, by_variant_Bps=d,
                         note=f"{kind}-only bytes, best median over sizes and launch shapes")
    return out


def gemm_rate(dtype: str, n: int = 8192):
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    if dtype == "bf16":
        fn = lambda: a @ b  # noqa: E731
        ref = None
    else:
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.t().contiguous().to(torch.float8_e4m3fn).t()  # column-major second operand
        one = torch.ones((), device="cuda", dtype=torch.float32)
        fn = lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
        ref = (a8.float() @ b8.float())
    out = fn()
    torch.cuda.synchronize()
    if ref is not None:
        err = (out.float() - ref).norm().item() / ref.norm().item()
    else:
        r = a[:256].double() @ b.double()
        err = (out[:256].double() - r).norm().item() / r.norm().item()
    med, p10, p90 = bench(fn, rep_ms=300)
    fl = 2 * n**3
    return dict(m=n, n=n, k=n, time_s=med, flops=fl, rate_flops=fl / med, rate_p90=fl / p10, rel_error=err)


def host_bw(gib: float = 1.0):
    import torch

    n = int(gib * 2**30)
    h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    h.random_(0, 255)
    d = torch.empty(n, dtype=torch.uint8, device="cuda")
    h2d = bench_events(lambda: d.copy_(h, non_blocking=True), iters=8)
    d2h = bench_events(lambda: h.copy_(d, non_blocking=True), iters=8)
    # pageable for comparison
    hp = torch.empty(n // 4, dtype=torch.uint8)
    dp = d[: n // 4]
    h2d_pg = bench_events(lambda: dp.copy_(hp), iters=3)
    return dict(bytes=n, h2d_pinned_Bps=n / h2d[0], d2h_pinned_Bps=n / d2h[0],
                h2d_pageable_Bps=(n // 4) / h2d_pg[0])


def drop_caches(path):
    ok = []
    try:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        ok.append("fadvise")
    except Exception:  # noqa: BLE001
        pass
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        ok.append("drop_caches")
    except Exception:  # noqa: BLE001
        pass
    return "+".join(ok) or "none"


def load_file_to_gpu(path: str, nbytes: int, chunk: int = 64 * 2**20):
    """Read a file into a GPU buffer through two pinned host buffers: the read of chunk i+1 overlaps
    the copy of chunk i on a side stream. Returns (seconds, device uint8 tensor)."""
    import torch

    pinned = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    evs = [None, None]
    torch.cuda.synchronize()
    t = time.time()
    with open(path, "rb", buffering=0) as f:
        off, i = 0, 0
        while off < nbytes:
            slot = i % 2
            if evs[slot] is not None:
                evs[slot].synchronize()
            got = f.readinto(memoryview(pinned[slot].numpy())[: min(chunk, nbytes - off)])
            if not got:
                break
            with torch.cuda.stream(stream):
                dev[off: off + got].copy_(pinned[slot][:got], non_blocking=True)
                evs[slot] = torch.cuda.Event()
                evs[slot].record(stream)
            off += got
            i += 1
    torch.cuda.synchronize()
    return time.time() - t, dev[:off]


def disk_bw(gib: float = 3.0, dirpath: str | None = None):
    """Write a file, drop page cache, read it back (buffered) and with O_DIRECT; then a
    MatKV-style KV blob load file -> pinned host -> GPU."""
    import numpy as np
    import torch

    dirpath = dirpath or os.environ.get("VALIDATION_DISK_DIR", "/var/tmp")
    os.makedirs(dirpath, exist_ok=True)
    path = os.path.join(dirpath, "kvsim_disk_probe.bin")
    n = int(gib * 2**30)
    chunk = 64 * 2**20
    buf = np.random.default_rng(0).integers(0, 255, size=chunk, dtype=np.uint8).tobytes()
    res = dict(path=dirpath, bytes=n, fs=sh(f"df -T {dirpath} | tail -1"))
    t = time.time()
    with open(path, "wb") as f:
        for _ in range(n // chunk):
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    res["write_Bps"] = n / (time.time() - t)
    res["drop_method"] = drop_caches(path)
    t = time.time()
    with open(path, "rb", buffering=0) as f:
        mv = bytearray(chunk)
        while f.readinto(mv):
            pass
    res["read_buffered_cold_Bps"] = n / (time.time() - t)
    # O_DIRECT with an aligned (mmap) buffer
    try:
        drop_caches(path)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        m = mmap.mmap(-1, chunk)
        t = time.time()
        tot = 0
        while True:
            r = os.readv(fd, [m])
            if r <= 0:
                break
            tot += r
        res["read_odirect_Bps"] = tot / (time.time() - t)
        os.close(fd)
    except Exception as e:  # noqa: BLE001
        res["read_odirect_error"] = str(e)[:200]
    t = time.time()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(mv):
            pass
    res["read_buffered_warm_Bps"] = n / (time.time() - t)
    try:  # MatKV-style: KV blob file -> pinned host buffer -> GPU (cold cache)
        drop_caches(path)
        seconds, dev = load_file_to_gpu(path, min(n, 2 * 2**30))
        res["kv_blob_file_to_gpu_Bps"] = dev.numel() / seconds
        res["kv_blob_bytes"] = dev.numel()
        res["kv_blob_check"] = bool(torch.equal(dev[:chunk].cpu(), torch.frombuffer(bytearray(buf), dtype=torch.uint8)))
        del dev
    except Exception as e:  # noqa: BLE001
        res["kv_blob_error"] = str(e)[:200]
    res["read_Bps"] = max(res.get("read_odirect_Bps", 0.0), res["read_buffered_cold_Bps"])  # what kvsim calibrate reads
    try:
        os.remove(path)
    except OSError:
        pass
    return res


def main():
    ap = part_args(60)
    ap.add_argument("--end", action="store_true", help="re-measure the copy only, recorded as copy_end")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    q = a.quick
    path = os.path.join(a.out, "ceilings.json")
    if a.end:
        c = load_ceilings(a.out)
        guarded("warm-up", warm_up, 0.5)
        c["copy_end"] = guarded("copy_end", copy_bw, (0.5,) if q else (1.0, 4.0))
        log("copy_end", c["copy_end"])
        st = guarded("stream_end", stream_bw, (0.25,) if q else (4.0,)) or {}
        c["read_end"], c["write_end"] = st.get("read"), st.get("write")
        log("read_end", c["read_end"])
        write_json(path, c)
        return
    meta = guarded("metadata", metadata) or {}
    write_json(os.path.join(a.out, "meta.json"), meta)
    log(json.dumps(meta, indent=1))
    c = {"warm_up": guarded("warm-up", warm_up, 0.3 if q else 2.0)}
    log("warm-up", c["warm_up"])
    c["copy"] = guarded("copy", copy_bw, (0.25, 0.5) if q else (1.0, 2.0, 4.0, 8.0))
    log("copy", c["copy"])
    st = guarded("stream", stream_bw, (0.25,) if q else (1.0, 4.0, 8.0)) or {}
    c["read"], c["write"] = st.get("read"), st.get("write")
    log("read", c["read"])
    log("write", c["write"])
    c["gemm_bf16"] = guarded("gemm_bf16", gemm_rate, "bf16", 2048 if q else 8192)
    log("gemm_bf16", c["gemm_bf16"])
    c["gemm_fp8"] = guarded("gemm_fp8", gemm_rate, "fp8", 2048 if q else 8192)
    log("gemm_fp8", c["gemm_fp8"])
    c["host"] = guarded("host", host_bw, 0.25 if q else 1.0)
    log("host", c["host"])
    c["disk"] = guarded("disk", disk_bw, 0.25 if q else 3.0)
    log("disk", c["disk"])
    import torch

    free, total = torch.cuda.mem_get_info()
    c["memory"] = dict(total_memory=torch.cuda.get_device_properties(0).total_memory,
                       mem_get_info_free=free, mem_get_info_total=total)
    c["quick"] = q
    write_json(path, c)
    cp = (c.get("copy") or {}).get("bw_Bps", 0)
    g = (c.get("gemm_bf16") or {}).get("rate_flops", 0)
    g8 = (c.get("gemm_fp8") or {}).get("rate_flops", 0)
    rd = (c.get("read") or {}).get("bw_Bps", 0)
    wr = (c.get("write") or {}).get("bw_Bps", 0)
    log(f"CEILINGS copy {cp/1e12:.3f} TB/s  read {rd/1e12:.3f}  write {wr/1e12:.3f}  bf16 {g/1e12:.0f} TF/s  fp8 {g8/1e12:.0f} TF/s")


def write_json(path: str, obj: dict):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)  # whole or not at all


if __name__ == "__main__":
    main()
