"""Offloaded KV: ShadowKV (low-rank keys and chunk landmarks on the GPU, values in pinned host
memory; arXiv 2410.21465), TTKV (recent tier in HBM, older tokens quantized K4/V2 in host DRAM;
arXiv 2604.19769) and MatKV (document KV loaded from a file instead of prefilled; arXiv 2512.22195).

A step selects the top-k chunks on the GPU, gathers their payload on the host into a pinned
staging buffer and copies it on a side stream while the main stream rebuilds keys (ShadowKV) or
attends over the recent tier (TTKV), then attends over the fetched tokens. Steps involve host work,
so they are timed with events around whole synchronized steps (median), not graph replays."""
from __future__ import annotations

import math
import os

import torch

from validation.common import bench_events, guarded, log, params_str, rel_error
from validation.kernels import quant_decode as qd
from validation.kernels import triton_decode as td
from validation.kernels.bench_common import LLAMA3, kv_bytes, ref_decode


def run(args, csv, budget):
    q_ = args.quick
    Hq, Hkv, D = LLAMA3
    for B, S in ([(1, 8192)] if q_ else [(1, 32768), (4, 32768), (16, 16384)]):
        if budget.ok(8):
            guarded(f"shadowkv B{B} S{S}", shadowkv_point, B, Hq, Hkv, D, S, csv)
        if budget.ok(8):
            guarded(f"ttkv B{B} S{S}", ttkv_point, B, Hq, Hkv, D, S, csv)
        torch.cuda.empty_cache()
    for tokens in ([1024] if q_ else [1024, 4096, 16384]):
        if budget.ok(8):
            guarded(f"matkv {tokens}", matkv_point, tokens, csv)


def _select_chunks(q, landmarks, k_chunks):
    """Top-k chunks per KV head by the group-mean query's score against each chunk landmark."""
    B, Hq, D = q.shape
    Hkv = landmarks.shape[1]
    qm = q.view(B, Hkv, Hq // Hkv, D).float().mean(2, keepdim=True)  # [B, Hkv, 1, D]
    s = torch.matmul(qm, landmarks.float().transpose(-1, -2))[:, :, 0]  # [B, Hkv, chunks]
    return s.topk(k_chunks, -1).indices.sort(-1).values


def _token_rows(chunks, chunk):
    return (chunks[..., None] * chunk + torch.arange(chunk, device=chunks.device)).flatten(-2)  # [B, Hkv, k*chunk]


def _host_fetch(host, rows_cpu, staging, dev, stream):
    """Gather rows of a pinned host tensor [B, Hkv, S, W] into pinned staging, copy on `stream`."""
    torch.gather(host, 2, rows_cpu[..., None].expand(-1, -1, -1, host.shape[-1]), out=staging)
    with torch.cuda.stream(stream):
        dev.copy_(staging, non_blocking=True)


def shadowkv_point(B, Hq, Hkv, D, S, csv, rank=160, chunk=8, budget_tok=2048):
    d = dict(device="cuda", dtype=torch.bfloat16)
    scale = 1.0 / math.sqrt(D)
    q = torch.randn(B, Hq, D, **d)
    k_low = torch.randn(B, S, rank, **d)  # pre-RoPE keys projected on a rank-160 basis (paper sec. 4)
    basis = torch.randn(rank, Hkv * D, **d) / math.sqrt(rank)
    landmarks = torch.randn(B, Hkv, S // chunk, D, **d)  # per-chunk mean keys
    v_host = torch.randn(B, Hkv, S, D, dtype=torch.bfloat16).pin_memory()
    n = budget_tok
    staging = torch.empty(B, Hkv, n, D, dtype=torch.bfloat16).pin_memory()
    v_sel = torch.empty(B, Hkv, n, D, **d)
    side = torch.cuda.Stream()

    def step():
        rows = _token_rows(_select_chunks(q, landmarks, n // chunk), chunk)  # [B, Hkv, n]
        rows_cpu = rows.cpu()
        _host_fetch(v_host, rows_cpu, staging, v_sel, side)
        # meanwhile on the main stream: rebuild the selected keys from the low-rank factors
        kl = torch.gather(k_low[:, None].expand(-1, Hkv, -1, -1), 2, rows[..., None].expand(-1, -1, -1, rank))
        k_sel = torch.einsum("bhnr,rhd->bhnd", kl, basis.view(rank, Hkv, D)).contiguous()
        torch.cuda.current_stream().wait_stream(side)
        return td.decode_attention(q, k_sel, v_sel, sm_scale=scale), k_sel, rows

    o, k_sel, rows = step()
    torch.cuda.synchronize()
    v_ref = torch.gather(v_host, 2, rows.cpu()[..., None].expand(-1, -1, -1, D)).cuda()
    err = rel_error(o[[0]], ref_decode(q, k_sel, v_ref, scale, [0]))
    t = bench_events(lambda: step(), iters=10)[0]
    byts = B * S * rank * 2 + B * Hkv * (S // chunk) * D * 2 + kv_bytes(B, Hkv, n, D, 2) // 2  # + fetched V
    csv.row(method="shadowkv_step", batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, context=S,
            kvsim_spec=f"shadowkv:rank={rank},chunk={chunk},budget={budget_tok}", phase="decode", layers=1,
            params=params_str(fetched_bytes=kv_bytes(B, Hkv, n, D, 2) // 2, gather="host", timing="events"),
            time_s=t, bytes_read=byts, flops=4 * B * Hq * n * D + 2 * B * Hkv * n * rank * D, rel_error=err)
    log(f"shadowkv B{B} S{S}: {t*1e3:.3f} ms err {err:.2e}")


def ttkv_point(B, Hq, Hkv, D, S, csv, recent=4096, topk=2048, kbits=4, vbits=2, chunk=32):
    d = dict(device="cuda", dtype=torch.bfloat16)
    scale = 1.0 / math.sqrt(D)
    old = S - recent
    q = torch.randn(B, Hq, D, **d)
    k_rec, v_rec = torch.randn(B, Hkv, recent, D, **d), torch.randn(B, Hkv, recent, D, **d)
    k_old, v_old = torch.randn(B, Hkv, old, D, **d), torch.randn(B, Hkv, old, D, **d)
    landmarks = k_old.view(B, Hkv, old // chunk, chunk, D).mean(3)  # block key summaries stay on the GPU
    kc, ks, kz = qd.quantize_groups(k_old, kbits, chunk, 3)  # per token, groups of 32 channels
    vc, vs, vz = qd.quantize_groups(v_old, vbits, chunk, 3)
    host = torch.cat([qd.pack16(kc, kbits), qd.pack16(vc, vbits), ks.view(torch.int16), kz.view(torch.int16),
                      vs.view(torch.int16), vz.view(torch.int16)], -1).cpu().pin_memory()  # one row per token
    w = [D * kbits // 16, D * vbits // 16, D // chunk, D // chunk, D // chunk, D // chunk]
    staging = torch.empty(B, Hkv, topk, host.shape[-1], dtype=torch.int16).pin_memory()
    fetched = torch.empty(B, Hkv, topk, host.shape[-1], dtype=torch.int16, device="cuda")
    side = torch.cuda.Stream()
    del k_old, v_old

    def step():
        rows = _token_rows(_select_chunks(q, landmarks, topk // chunk), chunk)
        _host_fetch(host, rows.cpu(), staging, fetched, side)
        o1, l1 = td.decode_attention(q, k_rec, v_rec, sm_scale=scale, return_lse=True)  # overlaps the copy
        torch.cuda.current_stream().wait_stream(side)
        pk, pv, a, b, c, e = fetched.split(w, -1)
        k = qd.dequantize_groups(qd.unpack16(pk, kbits), a.view(torch.float16), b.view(torch.float16), chunk, 3)
        v = qd.dequantize_groups(qd.unpack16(pv, vbits), c.view(torch.float16), e.view(torch.float16), chunk, 3)
        o2, l2 = td.decode_attention(q, k.to(torch.bfloat16), v.to(torch.bfloat16), sm_scale=scale, return_lse=True)
        m = torch.maximum(l1, l2)
        w1, w2 = torch.exp2(l1 - m)[..., None], torch.exp2(l2 - m)[..., None]
        return ((o1.float() * w1 + o2.float() * w2) / (w1 + w2)).to(torch.bfloat16), k, v

    o, k, v = step()
    torch.cuda.synchronize()
    kk = torch.cat([k_rec.float(), k.float()], 2)
    vv = torch.cat([v_rec.float(), v.float()], 2)
    err = rel_error(o[[0]], ref_decode(q, kk, vv, scale, [0]))
    t = bench_events(lambda: step(), iters=10)[0]
    fetched_bytes = fetched.numel() * 2
    byts = kv_bytes(B, Hkv, recent, D, 2) + B * Hkv * (old // chunk) * D * 2 + fetched_bytes
    csv.row(method="ttkv_step", batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, context=S,
            kvsim_spec=f"ttkv:recent={recent},k_bits={kbits},v_bits={vbits},topk={topk}", phase="decode", layers=1,
            params=params_str(fetched_bytes=fetched_bytes, gather="host", timing="events"), time_s=t,
            bytes_read=byts, flops=4 * B * Hq * (recent + topk) * D, rel_error=err)
    log(f"ttkv B{B} S{S}: {t*1e3:.3f} ms err {err:.2e}")


def matkv_point(tokens, csv, bytes_per_token=131072):
    """Load a document's precomputed KV (Llama-3-8B: 131,072 B/token) from a file, page cache dropped."""
    from validation.ceilings import drop_caches, load_file_to_gpu

    path = os.path.join(os.environ.get("VALIDATION_DISK_DIR", "/var/tmp"), "kvsim_matkv_doc.bin")
    n = tokens * bytes_per_token
    src = torch.randint(0, 255, (n,), dtype=torch.uint8)
    with open(path, "wb") as f:
        f.write(src.numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    times = []
    for _ in range(3):
        how = drop_caches(path)
        seconds, dev = load_file_to_gpu(path, n)
        times.append(seconds)
    ok = torch.equal(dev[: 1 << 20].cpu(), src[: 1 << 20])
    os.remove(path)
    t = sorted(times)[1]
    csv.row(method="matkv_load", batch=1, q_heads=LLAMA3[0], kv_heads=LLAMA3[1], head_dim=LLAMA3[2], context=tokens,
            kvsim_spec="matkv", phase="load", layers=32, params=params_str(drop=how, check=int(ok)), time_s=t,
            bytes_read=n, flops=0, rel_error=0.0 if ok else float("inf"))
    log(f"matkv {tokens} tokens ({n/2**20:.0f} MiB): {t*1e3:.1f} ms {n/t/1e9:.2f} GB/s ok={ok}")
