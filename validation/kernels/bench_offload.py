"""Offloaded KV, measured as the papers run it: ShadowKV (low-rank pre-RoPE keys, chunk landmarks and
outlier chunks on the GPU, values in pinned host memory; arXiv 2410.21465), TTKV (recent tokens in
HBM, older tokens quantized K4/V2 in host DRAM; arXiv 2604.19769), MKA (local, pooled session and
host long-term memory; arXiv 2603.20586) and MatKV (document KV loaded from a file instead of
prefilled; arXiv 2512.22195).

Per layer, on the GPU: score the landmarks (ShadowKV, TTKV) or session entries (MKA) with the
query, take the top-k chunks (torch.topk), and gather those chunks' host rows with a Triton kernel
that reads the pinned host tensor directly over PCIe (zero-copy through unified addressing, as
ShadowKV's gather-copy CUDA kernel does), on a side CUDA stream. The fetch of layer l+1 is issued
before layer l's compute (ShadowKV: key rebuild from the low-rank factor; TTKV: attention over the
recent tier; then attention over everything), so PCIe time hides behind the previous layer's
compute. A step of `STEP_LAYERS` layers is timed with events (median); each row is one layer's
share (layers = 1, step_layers in params), the unit kvsim prices.

bytes_read is what kvsim's cost model counts for the row's spec (attention.decode bytes of a
1-layer model; tested in validation/tests/test_offload.py); params carry what the kernels read from
GPU memory (hbm_bytes: the same for ShadowKV and MKA; for TTKV it adds the block means used for
selection, which are not in kvsim's layout) and what crossed PCIe (pcie_bytes, equal to kvsim's
host_transfer bytes)."""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from validation.common import bench_events, guarded, log, params_str, rel_error
from validation.kernels import quant_decode as qd
from validation.kernels import triton_decode as td
from validation.kernels.bench_common import LLAMA3, ref_decode

STEP_LAYERS = 4  # layers per timed step: 3 of 4 fetches overlap a previous layer's compute
BF16 = 2


def run(args, csv, budget):
    q_ = args.quick
    Hq, Hkv, D = LLAMA3
    layers = 2 if q_ else STEP_LAYERS
    for B, S in ([(1, 8192)] if q_ else [(1, 32768), (4, 32768), (16, 8192), (1, 131072)]):
        for name, make, spec in (("shadowkv", Shadowkv, SHADOWKV), ("ttkv", Ttkv, TTKV), ("mka", Mka, MKA)):
            if budget.ok(8):
                guarded(f"{name} B{B} S{S}", offload_point, name, make, spec, B, Hq, Hkv, D, S, layers, csv)
            torch.cuda.empty_cache()
    for tokens in ([1024] if q_ else [1024, 4096, 16384]):
        if budget.ok(8):
            guarded(f"matkv {tokens}", matkv_point, tokens, csv)


# ----------------------------------------------------------------------------- GPU-side selection + gather
@triton.jit
def _gather_chunks_kernel(SRC, IDX, DST, s_b, s_h, s_t, i_b, i_h, d_b, d_h, d_t,
                          CHUNK: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr):
    """DST[b, h, j*CHUNK + r, :] = SRC[b, h, IDX[b, h, j]*CHUNK + r, :] for one selected chunk j.
    SRC may be pinned host memory: the loads then cross PCIe (unified addressing)."""
    b, h, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = tl.load(IDX + b * i_b + h * i_h + j).to(tl.int64)
    rows = tl.arange(0, CHUNK)[:, None]
    cols = tl.arange(0, W_PAD)[None, :]
    m = cols < W
    x = tl.load(SRC + b * s_b + h * s_h + (c * CHUNK + rows) * s_t + cols, mask=m)
    tl.store(DST + b * d_b + h * d_h + (j * CHUNK + rows) * d_t + cols, x, mask=m)


def gather_chunks(src, idx, dst, chunk):
    """Copy chunks idx [B, H, n] (int32) of src [B, H, T, W] into dst [B, H, n*chunk, W] (16-bit
    elements; last dims contiguous). Launched on the current stream."""
    B, H, n = idx.shape
    s, d = src.view(torch.int16), dst.view(torch.int16)
    W = s.shape[-1]
    _gather_chunks_kernel[(B, H, n)](s, idx, d, s.stride(0), s.stride(1), s.stride(2), idx.stride(0), idx.stride(1),
                                     d.stride(0), d.stride(1), d.stride(2), CHUNK=chunk, W=W,
                                     W_PAD=triton.next_power_of_2(W), num_warps=1 if chunk * W <= 1024 else 4)


def select_chunks(q, summaries, n):
    """Top-n chunks per KV head (sorted int32), scored by the query group's mean query against
    one summary key per chunk (ShadowKV's landmarks: the chunk's mean pre-RoPE key)."""
    B, Hq, D = q.shape
    Hkv = summaries.shape[1]
    qm = q.view(B, Hkv, Hq // Hkv, D).float().mean(2, keepdim=True)  # [B, Hkv, 1, D]
    s = torch.matmul(qm, summaries.float().transpose(-1, -2))[:, :, 0]  # [B, Hkv, chunks]
    return s.topk(n, -1).indices.sort(-1).values.to(torch.int32)


def token_rows(chunks, chunk):
    """Token indices [B, H, n*chunk] of chunks [B, H, n]."""
    return (chunks.long()[..., None] * chunk + torch.arange(chunk, device=chunks.device)).flatten(-2)


def host(t):
    """Pinned host copy of t (on a CPU-only machine a plain one: the CPU tests run the same code)."""
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
    return out.copy_(t)


class Pipeline:
    """One decode step over `layers` layers with the host fetch of layer l+1 issued on a side stream
    before layer l's compute. Subclasses give select(l) -> chunks, fetch(l, chunks) (side stream)
    and compute(l, chunks, fetched) -> output, where compute waits on `fetched` (an event) only
    before it reads the fetched rows."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.side = torch.cuda.Stream() if self.cuda else None

    def issue(self, l):
        sel = self.select(l)
        if not self.cuda:
            self.fetch(l, sel)
            return sel, None
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            self.fetch(l, sel)
            ev = torch.cuda.Event()
            ev.record()
        sel.record_stream(self.side)
        return sel, ev

    def wait(self, ev):
        if ev is not None:
            torch.cuda.current_stream().wait_event(ev)

    def __call__(self, outs=None):
        nxt, sels = self.issue(0), []
        for l in range(self.layers):
            sel, ev = nxt
            if l + 1 < self.layers:
                nxt = self.issue(l + 1)  # prefetch: crosses PCIe while layer l computes
            sels.append(sel)
            self.compute(l, sel, ev, None if outs is None else outs[l])
        return sels

    def check(self):
        """Poison every fetched/rebuilt buffer and output, run one step, and return the worst
        relative error of any layer (batch rows 0 and B-1) against the float64 reference."""
        for buf in self.poisoned():
            buf.fill_(float("nan"))
        outs = [torch.full((self.B, self.Hq, self.D), float("nan"), device=self.q[0].device, dtype=torch.bfloat16)
                for _ in range(self.layers)]
        td.POISON = True
        try:
            sels = self(outs)
        finally:
            td.POISON = False
        if self.cuda:
            torch.cuda.synchronize()
        rows = sorted({0, self.B - 1})
        return max(rel_error(outs[l][rows], self.reference(l, sels[l], rows)) for l in range(self.layers))


# ----------------------------------------------------------------------------- ShadowKV
SHADOWKV = dict(rank=160, chunk=8, outlier_chunks=48, budget=2048)  # kvsim's defaults (the paper's Llama-3-8B setting)


class Shadowkv(Pipeline):
    """ShadowKV decode (arXiv 2410.21465): the pre-RoPE keys are stored as a rank-r factor A [S, r]
    (one per sequence, shared by the KV heads) times a basis [r, Hkv*D]; one landmark (mean key) per
    chunk; the outlier chunks whole on the GPU; all values in host memory. A step scores the
    landmarks, selects budget/chunk chunks per KV head, fetches their values and rebuilds their keys
    (A rows @ basis; RoPE is left out: an element-wise pass over the rebuilt keys), and attends over
    outliers + selected."""

    def __init__(self, B, Hq, Hkv, D, S, layers, rank, chunk, outlier_chunks, budget, device="cuda", dtype=torch.bfloat16):
        super().__init__(device)
        d = dict(device=device, dtype=dtype)  # 16-bit caches (the CPU tests use fp16: the interpreter has no bf16)
        self.dtype = dtype
        self.B, self.Hq, self.Hkv, self.D, self.layers = B, Hq, Hkv, D, layers
        self.rank, self.chunk, self.n = rank, chunk, budget // chunk
        self.n_out = outlier_chunks * chunk
        self.scale = 1.0 / math.sqrt(D)
        self.q = [torch.randn(B, Hq, D, **d) for _ in range(layers)]
        self.a = [torch.randn(B, S, rank, **d) for _ in range(layers)]
        self.basis = [torch.randn(B, rank, Hkv, D, **d) / math.sqrt(rank) for _ in range(layers)]
        self.landmarks = [torch.randn(B, Hkv, S // chunk, D, **d) for _ in range(layers)]
        self.v_host = [host(torch.randn(B, Hkv, S, D, **d)) for _ in range(layers)]
        self.attended = self.n_out + budget
        # attended keys/values: the outlier chunks first (resident), the selected chunks after
        self.k = [torch.randn(B, Hkv, self.n_out + budget, D, **d) for _ in range(layers)]
        self.v = [torch.randn(B, Hkv, self.n_out + budget, D, **d) for _ in range(layers)]

    def select(self, l):
        return select_chunks(self.q[l], self.landmarks[l], self.n)

    def fetch(self, l, sel):
        gather_chunks(self.v_host[l], sel, self.v[l][:, :, self.n_out:], self.chunk)

    def compute(self, l, sel, ev, out):
        rows = token_rows(sel, self.chunk)  # [B, Hkv, budget]
        a = torch.gather(self.a[l][:, None].expand(-1, self.Hkv, -1, -1), 2, rows[..., None].expand(-1, -1, -1, self.rank))
        self.k[l][:, :, self.n_out:] = torch.matmul(a, self.basis[l].transpose(1, 2))  # [B,Hkv,n,r] @ [B,Hkv,r,D]
        self.wait(ev)
        return td.decode_attention(self.q[l], self.k[l], self.v[l], sm_scale=self.scale, out=out)

    def poisoned(self):
        return [x[:, :, self.n_out:] for x in self.k + self.v]

    def reference(self, l, sel, rows):
        tok = token_rows(sel, self.chunk)[rows].cpu()
        a = self.a[l][rows].double().cpu()
        k_sel = torch.stack([torch.stack([a[i, tok[i, h]] @ self.basis[l][b, :, h].double().cpu()
                                          for h in range(self.Hkv)]) for i, b in enumerate(rows)])
        v_sel = torch.gather(self.v_host[l][rows], 2, tok[..., None].expand(-1, -1, -1, self.D)).double()
        k = torch.cat([self.k[l][rows, :, :self.n_out].double().cpu(), k_sel], 2)
        v = torch.cat([self.v[l][rows, :, :self.n_out].double().cpu(), v_sel], 2)
        return ref_decode(self.q[l][rows].cpu(), k, v, self.scale)


def shadowkv_bytes(B, Hkv, D, S, rank, chunk, outlier_chunks, budget):
    """Per layer: (kvsim's attention.decode bytes, bytes the kernels read from GPU memory, PCIe bytes).
    kvsim (kvsim/kv/offload.py _shadowkv): the basis once per sequence, the outlier chunks, every
    landmark (scored to select), each KV head's own rows of the low-rank factor and the fetched
    values, all read from HBM: what the kernels read."""
    sel, out = min(S, budget), min(S, outlier_chunks * chunk, budget)
    v_fetch = B * Hkv * sel * D * BF16
    hbm = (B * rank * Hkv * D * BF16 + B * Hkv * out * 2 * D * BF16 + v_fetch
           + B * Hkv * sel * rank * BF16 + B * Hkv * (S // chunk) * D * BF16)
    return int(hbm), int(hbm), int(v_fetch)


# ----------------------------------------------------------------------------- TTKV
TTKV = dict(recent=4096, k_bits=4, v_bits=2, topk=2048)  # kvsim's defaults
TTKV_GROUP = 32  # channels per fp16 scale + zero (kvsim's _ttkv) and tokens per selectable block


class Ttkv(Pipeline):
    """TTKV decode (arXiv 2604.19769): the recent tokens in HBM at 16 bits; older tokens in host
    DRAM quantized per token (keys k_bits, values v_bits, groups of 32 channels with fp16 scale and
    zero), one packed row per token; a mean key per 32-token block stays on the GPU for selection.
    A step attends the recent tier (overlapping the fetch), fetches the top blocks' rows, dequantizes
    them and attends them, merging the two by their log-sum-exp."""

    def __init__(self, B, Hq, Hkv, D, S, layers, recent, k_bits, v_bits, topk, device="cuda", dtype=torch.bfloat16):
        super().__init__(device)
        d = dict(device=device, dtype=dtype)
        self.dtype = dtype
        self.B, self.Hq, self.Hkv, self.D, self.layers = B, Hq, Hkv, D, layers
        self.kb, self.vb, self.n = k_bits, v_bits, topk // TTKV_GROUP
        self.attended = recent + topk
        old = S - recent
        self.scale = 1.0 / math.sqrt(D)
        self.q = [torch.randn(B, Hq, D, **d) for _ in range(layers)]
        self.k_rec = [torch.randn(B, Hkv, recent, D, **d) for _ in range(layers)]
        self.v_rec = [torch.randn(B, Hkv, recent, D, **d) for _ in range(layers)]
        self.landmarks, self.host = [], []
        for _ in range(layers):
            k_old, v_old = torch.randn(B, Hkv, old, D, **d), torch.randn(B, Hkv, old, D, **d)
            self.landmarks.append(k_old.view(B, Hkv, old // TTKV_GROUP, TTKV_GROUP, D).mean(3))
            kc, ks, kz = qd.quantize_groups(k_old, k_bits, TTKV_GROUP, 3)
            vc, vs, vz = qd.quantize_groups(v_old, v_bits, TTKV_GROUP, 3)
            self.host.append(host(torch.cat([qd.pack16(kc, k_bits), qd.pack16(vc, v_bits)] +
                                            [x.view(torch.int16) for x in (ks, kz, vs, vz)], -1)))
        self.split = [D * k_bits // 16, D * v_bits // 16] + [D // TTKV_GROUP] * 4
        self.fetched = [torch.empty(B, Hkv, topk, sum(self.split), dtype=torch.int16, device=device)
                        for _ in range(layers)]

    def select(self, l):
        return select_chunks(self.q[l], self.landmarks[l], self.n)

    def fetch(self, l, sel):
        gather_chunks(self.host[l], sel, self.fetched[l], TTKV_GROUP)

    def dequant(self, l):
        pk, pv, ks, kz, vs, vz = self.fetched[l].split(self.split, -1)
        h = torch.float16
        k = qd.dequantize_groups(qd.unpack16(pk, self.kb), ks.view(h), kz.view(h), TTKV_GROUP, 3)
        v = qd.dequantize_groups(qd.unpack16(pv, self.vb), vs.view(h), vz.view(h), TTKV_GROUP, 3)
        return k, v

    def compute(self, l, sel, ev, out):
        o1, l1 = td.decode_attention(self.q[l], self.k_rec[l], self.v_rec[l], sm_scale=self.scale, return_lse=True)
        self.wait(ev)
        k, v = self.dequant(l)
        o2, l2 = td.decode_attention(self.q[l], k.to(self.dtype), v.to(self.dtype), sm_scale=self.scale,
                                     return_lse=True)
        m = torch.maximum(l1, l2)  # log2-sum-exp of each part: weights 2^(lse - max)
        w1, w2 = torch.exp2(l1 - m)[..., None], torch.exp2(l2 - m)[..., None]
        o = (o1.float() * w1 + o2.float() * w2) / (w1 + w2)
        return o.to(torch.bfloat16) if out is None else out.copy_(o)

    def poisoned(self):
        return [f.view(torch.float16) for f in self.fetched]

    def reference(self, l, sel, rows):
        tok = token_rows(sel, TTKV_GROUP)[rows].cpu()
        pk, pv, ks, kz, vs, vz = torch.gather(self.host[l][rows], 2, tok[..., None].expand(-1, -1, -1, sum(self.split))
                                              ).split(self.split, -1)
        h = torch.float16
        k = qd.dequantize_groups(qd.unpack16(pk, self.kb), ks.view(h), kz.view(h), TTKV_GROUP, 3).double()
        v = qd.dequantize_groups(qd.unpack16(pv, self.vb), vs.view(h), vz.view(h), TTKV_GROUP, 3).double()
        # the kernel attends the 16-bit rounding of the dequantized values; the reference does too
        k, v = k.to(self.dtype).double(), v.to(self.dtype).double()
        kk = torch.cat([self.k_rec[l][rows].double().cpu(), k], 2)
        vv = torch.cat([self.v_rec[l][rows].double().cpu(), v], 2)
        return ref_decode(self.q[l][rows].cpu(), kk, vv, self.scale)


def ttkv_bytes(B, Hkv, D, S, recent, k_bits, v_bits, topk):
    """Per layer: (kvsim bytes, GPU-memory bytes, PCIe bytes). kvsim (_ttkv): the recent tier at 16
    bits, the fetched rows at b + 32/32 bits per element (fp16 scale + zero per 32 channels), read
    from HBM once fetched; the block means used for selection are not in kvsim's layout."""
    rec = min(S, recent)
    fetched = min(max(S - recent, 0), topk)
    row = D * (k_bits + 1 + v_bits + 1) // 8  # bytes per token per KV head on the host
    pcie = B * Hkv * fetched * row
    kvsim = B * Hkv * rec * 2 * D * BF16 + pcie
    return int(kvsim), int(kvsim + B * Hkv * (max(S - recent, 0) // TTKV_GROUP) * D * BF16), int(pcie)


# ----------------------------------------------------------------------------- MKA
MKA = dict(local=2048, stride=16, topk=1024)  # kvsim's defaults


class Mka(Pipeline):
    """MKA decode (arXiv 2603.20586) as kvsim models it: local memory (the recent tokens, full K/V on
    the GPU), session memory (K/V mean-pooled over `stride` tokens, on the GPU) and long-term memory
    (full K/V in host memory). Routing scores the session keys with the query; the top entries'
    `stride` tokens are fetched from long-term memory. FastMKA fuses the three sources into one
    attention: one buffer [local | session | fetched], one kernel."""

    def __init__(self, B, Hq, Hkv, D, S, layers, local, stride, topk, device="cuda", dtype=torch.bfloat16):
        super().__init__(device)
        d = dict(device=device, dtype=dtype)
        self.dtype = dtype
        self.B, self.Hq, self.Hkv, self.D, self.layers = B, Hq, Hkv, D, layers
        self.stride, self.n = stride, topk // stride
        self.resident = local + S // stride
        self.attended = self.resident + topk
        self.scale = 1.0 / math.sqrt(D)
        self.q = [torch.randn(B, Hq, D, **d) for _ in range(layers)]
        self.kv_host, self.kv = [], []
        for _ in range(layers):
            k, v = torch.randn(B, Hkv, S, D, **d), torch.randn(B, Hkv, S, D, **d)
            pool = lambda x: x.view(B, Hkv, S // stride, stride, D).mean(3)  # noqa: E731
            self.kv_host.append(host(torch.cat([k, v], -1)))  # one row per token: key then value
            buf = torch.empty(B, Hkv, self.resident + topk, 2 * D, **d)
            buf[:, :, :local] = torch.cat([k[:, :, S - local:], v[:, :, S - local:]], -1)
            buf[:, :, local:self.resident] = torch.cat([pool(k), pool(v)], -1)
            self.kv.append(buf)
        self.local = local

    def select(self, l):
        return select_chunks(self.q[l], self.kv[l][:, :, self.local:self.resident, :self.D], self.n)

    def fetch(self, l, sel):
        gather_chunks(self.kv_host[l], sel, self.kv[l][:, :, self.resident:], self.stride)

    def compute(self, l, sel, ev, out):
        self.wait(ev)
        kv = self.kv[l]
        return td.decode_attention(self.q[l], kv[..., :self.D], kv[..., self.D:], sm_scale=self.scale, out=out)

    def poisoned(self):
        return [x[:, :, self.resident:] for x in self.kv]

    def reference(self, l, sel, rows):
        tok = token_rows(sel, self.stride)[rows].cpu()
        fetched = torch.gather(self.kv_host[l][rows], 2, tok[..., None].expand(-1, -1, -1, 2 * self.D)).double()
        kv = torch.cat([self.kv[l][rows, :, :self.resident].double().cpu(), fetched], 2)
        return ref_decode(self.q[l][rows].cpu(), kv[..., :self.D], kv[..., self.D:], self.scale)


def mka_bytes(B, Hkv, D, S, local, stride, topk):
    """Per layer: (kvsim bytes, GPU-memory bytes, PCIe bytes). kvsim (_mka): local K/V, every
    session entry (routed over and attended), the fetched long-term tokens read from HBM: what the
    kernels read."""
    tok = Hkv * 2 * D * BF16  # K and V of one token (or one session entry)
    fetched = min(S, topk)
    pcie = B * fetched * tok
    hbm = B * min(S, local) * tok + pcie + B * tok * (S // stride)
    return int(hbm), int(hbm), int(pcie)


# ----------------------------------------------------------------------------- one row per (method, shape)
BYTES = {"shadowkv": shadowkv_bytes, "ttkv": ttkv_bytes, "mka": mka_bytes}


def kvsim_spec(name, params):
    # reuse=0: the fetch is not cut by ShadowKV's cache of last step's chunks (a fixed query
    # selects the same chunks every step, which would be all reuse)
    extra = ",reuse=0" if name == "shadowkv" else ""
    return f"{name}:" + ",".join(f"{k}={v}" for k, v in params.items()) + extra


def offload_point(name, make, params, B, Hq, Hkv, D, S, layers, csv):
    step = make(B, Hq, Hkv, D, S, layers, **params)
    err = step.check()
    t = bench_events(step, iters=10)[0] / layers
    kvsim, hbm, pcie = BYTES[name](B, Hkv, D, S, **params)
    csv.row(method=f"{name}_step", batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, context=S,
            kvsim_spec=kvsim_spec(name, params), phase="decode", layers=1,
            params=params_str(step_layers=layers, hbm_bytes=hbm, pcie_bytes=pcie, gather="gpu_uva", timing="events"),
            time_s=t, bytes_read=kvsim, flops=4 * B * Hq * step.attended * D, rel_error=err)
    log(f"{name} B{B} S{S}: {t*1e6:.1f} us/layer  hbm {hbm/t/1e12:.2f} TB/s  pcie {pcie/t/1e9:.1f} GB/s  err {err:.2e}")


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
