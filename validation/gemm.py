"""GEMM times over LLM layer shapes (bf16, fp8 via torch._scaled_mm, and W4A16: 4-bit weights in groups
of 128 dequantized inside torch's tinygemm kernel, torch._weight_int4pack_mm); with --part w4a16, 4-bit
weights dequantized in registers before a bf16 MMA (kernels/w4a16.py, the design of the kernels vLLM runs
for 4-bit weights; gemm.csv dtype w4a16_dq, the rows kvsim calibrate fits); with --part grouped and
--part fused_moe, routed experts (torch._grouped_mm; the vLLM-style Triton fused-MoE kernel in bf16, FP8
and block FP8, writing fused_moe.csv); with --part elementwise, the reference engine's element-wise and
MoE-routing kernels (elementwise.py); with --part fp32_router, routers vLLM runs in fp32 (MiniMax-M2's gate).
y[M,N] = x[M,K] @ W[N,K]^T.  Writes gemm.csv (dtype,m,n,k,time_s,flops,bytes,layer) and
elementwise.csv (op,tokens,hidden,time_s,bytes,impl,rel_error,params,kernels)."""
from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from validation.common import Budget, CsvOut, guarded, log, part_args  # noqa: E402

# (N, K, label) from real layers (HF config.json of each model; fused qkv and gate_up as serving engines do)
SHAPES = [
    (6144, 4096, "llama-3-8b.qkv"), (4096, 4096, "llama-3-8b.o"), (28672, 4096, "llama-3-8b.gate_up"),
    (4096, 14336, "llama-3-8b.down"), (128256, 4096, "llama-3-8b.lm_head"),
    (12288, 4096, "llama-2-7b.qkv"), (22016, 4096, "llama-2-7b.gate_up"), (4096, 11008, "llama-2-7b.down"),
    (4608, 3584, "qwen2.5-7b.qkv"), (3584, 3584, "qwen2.5-7b.o"), (37888, 3584, "qwen2.5-7b.gate_up"),
    (3584, 18944, "qwen2.5-7b.down"),
    (10240, 8192, "llama-3-70b.qkv"), (8192, 8192, "llama-3-70b.o"), (57344, 8192, "llama-3-70b.gate_up"),
    (8192, 28672, "llama-3-70b.down"),
    (2560, 2048, "gemma-2b.qkv"), (32768, 2048, "gemma-2b.gate_up"), (2048, 16384, "gemma-2b.down"),
    (18432, 16384, "llama-3-405b.qkv"), (16384, 16384, "llama-3-405b.o"), (16384, 53248, "llama-3-405b.down"),
    (2816, 2048, "qwen1.5-moe.expert.gate_up"), (2048, 1408, "qwen1.5-moe.expert.down"),
    (4096, 7168, "deepseek-v3.expert.gate_up"), (7168, 2048, "deepseek-v3.expert.down"),
    (576, 7168, "deepseek-v3.kv_a"), (24576, 1536, "deepseek-v3.q_b"),
    (4672, 4544, "falcon-7b.qkv"), (18176, 4544, "falcon-7b.up"), (4544, 18176, "falcon-7b.down"),
    # the small end, below every shape above in weight bytes: TP-8 shards' attention linears and a bf16
    # router (gpt-oss-120b config.json: hidden 2880, 64 query and 8 KV heads of 64 dims, 128 experts;
    # MiniMax-M2.5 config.json: hidden 3072, 48 query and 8 KV heads of 128 dims, block-FP8 weights)
    (640, 2880, "gpt-oss-120b.tp8.qkv"), (2880, 512, "gpt-oss-120b.tp8.o"), (128, 2880, "gpt-oss-120b.router"),
    (1024, 3072, "minimax-m2.tp8.qkv"), (3072, 768, "minimax-m2.tp8.o"),
]
# Routers that vLLM runs in fp32 (N = experts, K = hidden): MiniMax-M2's gate is a ReplicatedLinear with
# params_dtype float32 on hidden states cast to fp32 (vllm/model_executor/models/minimax_m2.py); the other
# shapes widen the curve (Qwen3-235B / Qwen3-30B: 128 x 4096 and 128 x 2048, DeepSeek-V3: 256 x 7168)
ROUTER_SHAPES = [(256, 3072, "minimax-m2.router"), (128, 4096, "qwen3-235b.router"),
                 (128, 2048, "qwen3-30b.router"), (256, 7168, "deepseek-v3.router")]
MS_FULL = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 3, 24, 48, 96, 100, 192, 384, 768,
           1000, 1536, 3000, 6144, 12288]
MS_QUICK = [1, 16, 128, 1024]


LOGGED_MS = (1, 16, 256, 4096, 16384)  # the row counts a run prints (every row goes to the CSV)


def log_gemm(label, what, m, n, k, t, nbytes):
    """One printed line for a timed GEMM (t None: it failed, already logged)."""
    if t is not None:
        log(f"gemm {label} {what} m{m}: {t*1e6:.1f} us {2*m*n*k/t/1e12:.1f} TF/s {nbytes/t/1e12:.2f} TB/s")


def weight_copies(wbytes) -> int:
    """Copies of a weight matrix to call in turn so each call reads it from HBM, not the L2 (up to 8,
    256 MiB in all)."""
    return int(min(8, max(1, (256 * 2**20) // max(int(wbytes), 1))))


def make_weights(n, k):
    nw = weight_copies(n * k * 2)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(nw)]
    return ws, [w.to(torch.float8_e4m3fn) for w in ws]


W4A16_GROUP = 128  # weights per bf16 (scale, zero) pair, as GPTQ/AWQ checkpoints group them
W4A16_INNER_K_TILES = 8  # torch._convert_weight_to_int4pack tiling: K must be a multiple of 16 x this


def make_w4a16(n, k):
    """Packed int4 weights with bf16 (scale, zero) per group of 128 along K (torch tinygemm layout):
    w = (q - 8) * scale + zero; returns (packed, scales_and_zeros, dequantized bf16 reference)."""
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
    packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), W4A16_INNER_K_TILES)
    sz = torch.rand(k // W4A16_GROUP, n, 2, device="cuda", dtype=torch.bfloat16) * 0.02
    scale = sz[..., 0].t().repeat_interleave(W4A16_GROUP, dim=1)  # [n, k]
    zero = sz[..., 1].t().repeat_interleave(W4A16_GROUP, dim=1)
    return packed, sz, ((q - 8).to(torch.bfloat16) * scale + zero)


def w4a16_point(m, n, k, label, csv, w):
    """One W4A16 GEMM: bf16 activations x 4-bit weights (bytes: 4-bit weights + 2 bf16 per group)."""
    from validation.common import bench

    packed, sz, ref_w = w
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    fn = lambda: torch._weight_int4pack_mm(x, packed, W4A16_GROUP, sz)  # noqa: E731
    ref = x[: min(m, 4)].float() @ ref_w.float().t()
    err = ((fn()[: min(m, 4)].float() - ref).norm() / ref.norm()).item()
    if not err < 2e-2:
        log(f"[WARN] gemm w4a16 {m}x{n}x{k} rel error {err:.2e} (layout assumption: w = (q - 8) * scale + zero)")
    fl = 2 * m * n * k
    byts = n * k // 2 + (k // W4A16_GROUP) * n * 4 + m * k * 2 + m * n * 2
    t = bench(fn, rep_ms=max(6.0, min(60.0, (max(fl / 600e12, byts / 2.5e12) + 5e-6) * 1.5e4)), flush=False)[0]
    csv.row(dtype="w4a16", m=m, n=n, k=k, time_s=t, flops=fl, bytes=byts, layer=label)
    return t


# dtype -> (bytes per input element, bytes per output element, a peak (flop/s) that sizes the timing run,
# the relative error a correct product stays under). fp32 is a GEMM as torch runs one by default (no TF32:
# torch.backends.cuda.matmul.allow_tf32 False, which vLLM leaves as it is), checked against float64: a TF32
# product would be ~1e-3 off.
GEMM_DTYPES = {"bf16": (2, 2, 600e12, 2e-2), "fp8": (1, 2, 600e12, 2e-2), "fp32": (4, 4, 50e12, 1e-5)}


def gemm_point(dtype, m, n, k, label, csv, ws):
    """One GEMM of m rows against the weights ``ws`` (rotated past the L2), checked, timed, one gemm.csv row."""
    from validation.common import bench

    eb, ob, peak, tol = GEMM_DTYPES[dtype]
    nw = len(ws)
    x = torch.randn(m, k, device="cuda", dtype=torch.float32 if dtype == "fp32" else torch.bfloat16)
    if dtype == "fp8":
        x = x.to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda", dtype=torch.float32)

        def fn(i):
            return torch._scaled_mm(x, ws[i % nw].t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    else:
        def fn(i):
            return x @ ws[i % nw].t()
    exact = torch.float64 if dtype == "fp32" else torch.float32
    ref = x[: min(m, 4)].to(exact) @ ws[0].to(exact).t()
    err = ((fn(0)[: min(m, 4)].to(exact) - ref).norm() / ref.norm()).item()
    if not err < tol:
        log(f"[WARN] gemm {dtype} {m}x{n}x{k} rel error {err:.2e}" + (" (TF32 on?)" if dtype == "fp32" else ""))
    fl = 2 * m * n * k
    byts = (m * k + n * k) * eb + m * n * ob
    est = max(fl / peak, byts / 2.5e12) + 5e-6
    t = bench(fn, rep_ms=max(6.0, min(60.0, est * 1.5e4)), flush=False, indexed=True)[0]
    csv.row(dtype=dtype, m=m, n=n, k=k, time_s=t, flops=fl, bytes=byts, layer=label)
    return t


def run_fp32_router(args, out, budget):
    """fp32 router GEMMs (ROUTER_SHAPES) into gemm.csv, dtype fp32: kvsim calibrate fits gemm.fp32."""
    torch.backends.cuda.matmul.allow_tf32 = False  # torch's default, stated: the kernel vLLM's fp32 gate runs
    csv = CsvOut(os.path.join(out, "gemm.csv"), ["dtype", "m", "n", "k", "time_s", "flops", "bytes", "layer"])
    for (n, k, label) in ROUTER_SHAPES[:1] if args.quick else ROUTER_SHAPES:
        nw = weight_copies(n * k * 4)
        ws = [torch.randn(n, k, device="cuda", dtype=torch.float32) for _ in range(nw)]
        for m in MS_QUICK if args.quick else MS_FULL:
            if not budget.ok(2):
                log("fp32_router: budget spent")
                return
            t = guarded(f"gemm fp32 {m}x{n}x{k}", gemm_point, "fp32", m, n, k, label, csv, ws)
            if t is not None and m in (1, 256, 4096, 16384):
                log(f"gemm {label} fp32 m{m}: {t*1e6:.1f} us {2*m*n*k/t/1e12:.1f} TF/s")
        del ws


def run_gemm(args, out, budget):
    csv = CsvOut(os.path.join(out, "gemm.csv"), ["dtype", "m", "n", "k", "time_s", "flops", "bytes", "layer"])
    shapes = only_layers(args, SHAPES, lambda s: s[2])
    shapes = shapes[:3] if args.quick else shapes
    ms = MS_QUICK if args.quick else MS_FULL
    for (n, k, label) in shapes:
        if not budget.ok(3):
            log("gemm: budget spent")
            return
        w = guarded("weights", make_weights, n, k)
        if w is None:
            continue
        for m in ms:
            for dtype, ws in (("bf16", w[0]), ("fp8", w[1])):
                if not budget.ok(2):
                    break
                mm = m
                if dtype == "fp8" and (m % 16):
                    mm = ((m + 15) // 16) * 16  # _scaled_mm needs multiples of 16
                    if mm in ms:
                        continue
                t = guarded(f"gemm {dtype} {mm}x{n}x{k}", gemm_point, dtype, mm, n, k, label, csv, ws)
                if m in LOGGED_MS:
                    log_gemm(label, dtype, mm, n, k, t, (mm * k + n * k) * (1 if dtype == "fp8" else 2) + mm * n * 2)
        del w
        q4 = guarded("w4a16 weights", make_w4a16, n, k) if k % (16 * W4A16_INNER_K_TILES) == 0 else None
        for m in ms if q4 is not None else ():
            if not budget.ok(2):
                break
            t = guarded(f"gemm w4a16 {m}x{n}x{k}", w4a16_point, m, n, k, label, csv, q4)
            if t is not None and m in (1, 16, 256, 4096):
                log(f"gemm {label} w4a16 m{m}: {t*1e6:.1f} us {2*m*n*k/t/1e12:.1f} TF/s")
        del q4
        torch.cuda.empty_cache()


W4A16_MS = [1, 16, 64, 256, 1024, 4096, 16384, 4, 32, 128, 512, 2048, 8192]  # the first seven first


def w4a16_dq_point(m, n, k, label, csv, w):
    """The fastest tiling of kernels/w4a16.py for one shape (checked against x @ W); bytes = packed weights +
    one bf16 scale per group + rows in and out."""
    from validation.common import bench
    from validation.kernels import w4a16 as wk

    packed, scales, ref_w = w
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    ref = x[: min(m, 4)].float() @ ref_w.float()
    fl = 2 * m * n * k
    byts = n * k // 2 + (k // wk.GROUP) * n * 2 + m * k * 2 + m * n * 2
    best = None
    for tiling in [t for t in wk.TILINGS_N if t[3] == 1 or m <= wk.SPLIT_MAX_M]:
        out = guarded(f"w4a16_dq {m}x{n}x{k} {tiling}", wk.matmul, x, packed, scales, tiling, c)
        if out is None:
            continue
        err = ((out[: min(m, 4)].float() - ref).norm() / ref.norm()).item()
        if not err < 2e-2:
            log(f"[WARN] w4a16_dq {m}x{n}x{k} {tiling} rel error {err:.2e}: not timed")
            continue
        t = bench(lambda t_=tiling: wk.matmul(x, packed, scales, t_, c), flush=False,
                  rep_ms=max(6.0, min(40.0, (max(fl / 600e12, byts / 2.5e12) + 5e-6) * 1e4)))[0]
        if best is None or t < best[0]:
            best = (t, tiling)
    if best is None:
        return None
    csv.row(dtype="w4a16_dq", m=m, n=n, k=k, time_s=best[0], flops=fl, bytes=byts, layer=label)
    return best


def run_w4a16(args, out, budget):
    from validation.kernels import w4a16 as wk

    csv = CsvOut(os.path.join(out, "gemm.csv"), ["dtype", "m", "n", "k", "time_s", "flops", "bytes", "layer"])
    shapes = [s for s in SHAPES if s[1] % wk.GROUP == 0]
    ms = MS_QUICK if args.quick else W4A16_MS
    for (n, k, label) in shapes[:3] if args.quick else shapes:
        if not budget.ok(4):
            log("w4a16: budget spent")
            return
        w = guarded("w4a16_dq weights", wk.make_weights, n, k)
        for m in ms if w is not None else ():
            if not budget.ok(2):
                break
            r = guarded(f"gemm w4a16_dq {m}x{n}x{k}", w4a16_dq_point, m, n, k, label, csv, w)
            if r is not None and m in (1, 16, 256, 4096, 16384):
                log(f"gemm {label} w4a16_dq m{m}: {r[0]*1e6:.1f} us {2*m*n*k/r[0]/1e12:.1f} TF/s tiling {r[1]}")
        del w
        torch.cuda.empty_cache()


MARLIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vendor", "marlin")
MARLIN_GROUP = 128  # one fp16 scale per 128 weights along K, symmetric (Marlin's grouped format, GPTQ/AWQ's usual)
MARLIN_BITS = 4 + 16 / MARLIN_GROUP  # storage bits per weight, scale included (kvsim.spec.quant._int_bits)
MARLIN_CHECK_N = 512  # output columns of the checked slice of each shape


def load_marlin():
    """IST-DASLab's Marlin (validation/fetch_marlin.py unpacks it into validation/vendor/marlin), compiled here
    for this GPU's architecture; returns its Python package."""
    import importlib

    from torch.utils.cpp_extension import load

    src = os.path.join(MARLIN_DIR, "marlin")
    if not os.path.isdir(src):
        raise SystemExit("validation/vendor/marlin is missing: run python3 validation/fetch_marlin.py and carry "
                         "validation/vendor")
    major, minor = torch.cuda.get_device_capability()
    sys.modules["marlin_cuda"] = load(
        "marlin_cuda", [os.path.join(src, "marlin_cuda.cpp"), os.path.join(src, "marlin_cuda_kernel.cu")],
        extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"])
    sys.path.insert(0, MARLIN_DIR)
    return importlib.import_module("marlin")


def marlin_check(mar, k: int) -> float:
    """Relative error of Marlin against x @ W on fake-quantized weights ([k, MARLIN_CHECK_N], packed by its own
    Layer.pack), at 1, 64 and 1,024 rows (rows past 64 in whole 16-row blocks: its parallel path takes no
    padding): the compiled kernel is right on this GPU at this K."""
    n = MARLIN_CHECK_N
    q = torch.randint(0, 16, (k, n), device="cuda")
    scale = torch.rand(k // MARLIN_GROUP, n, device="cuda", dtype=torch.half) * 0.02 + 0.001
    w = ((q - 8).half() * scale.repeat_interleave(MARLIN_GROUP, dim=0))  # [k, n]: exactly representable
    linear = torch.nn.Linear(k, n, bias=False).half().cuda()
    linear.weight.data = w.t().contiguous()
    layer = mar.Layer(k, n, groupsize=MARLIN_GROUP).cuda()
    layer.pack(linear.cpu(), scale.t().cpu())
    worst = 0.0
    for m in (1, 64, 1024):
        x = torch.randn(m, k, device="cuda", dtype=torch.half)
        out = layer(x)
        ref = x.double() @ w.double()
        worst = max(worst, ((out.double() - ref).norm() / ref.norm()).item())
    return worst


def marlin_point(m, n, k, label, csv, mar, packs):
    """One Marlin GEMM (fp16 activations x 4-bit weights), weights rotated past the L2 as the bf16 rows are;
    bytes = packed weights + one fp16 scale per group + rows in and out."""
    from validation.common import bench, bench_events

    x = torch.randn(m, k, device="cuda", dtype=torch.half)
    c = torch.empty(m, n, device="cuda", dtype=torch.half)
    ws = torch.zeros(n // 128 * 16, dtype=torch.int, device="cuda")
    fl = 2 * m * n * k
    byts = int(n * k * MARLIN_BITS / 8) + m * k * 2 + m * n * 2
    def call(i):
        mar.mul(x, packs[i % len(packs)][0], c, packs[i % len(packs)][1], ws)

    try:  # CUDA-graph replays, as every GEMM here is timed
        t = bench(call, indexed=True, flush=False,
                  rep_ms=max(6.0, min(40.0, (max(fl / 600e12, byts / 2.5e12) + 5e-6) * 1e4)))[0]
    except RuntimeError as err:  # Marlin's launcher sets kernel attributes per call; should capture refuse it
        log(f"marlin {m}x{n}x{k}: no CUDA graph ({str(err)[:80]}); timed call by call with events")
        state = {"i": 0}

        def rotate():
            call(state["i"])
            state["i"] += 1
        t = bench_events(rotate, iters=20)[0]
    csv.row(dtype="w4a16_marlin", m=m, n=n, k=k, time_s=t, flops=fl, bytes=byts, layer=label)
    return t


def only_layers(args, shapes: list, label_of) -> list:
    """--layers: a call that completes an earlier one measures only the shapes it lacks, in the order
    listed (a part that runs shape after shape until its budget is spent reaches the first ones first;
    checked against every shape of the part, before --quick keeps the first few)."""
    if not args.layers:
        return shapes
    wanted = args.layers.split(",")
    by_label = {label_of(s): s for s in shapes}
    unknown = sorted(set(wanted) - set(by_label))
    if unknown:
        raise SystemExit(f"--layers: unknown layer(s) {unknown} for --part {args.part}")
    return [by_label[w] for w in dict.fromkeys(wanted)]


def run_marlin(args, out, budget):
    """W4A16 GEMMs in Marlin at every layer shape it takes (K a multiple of 128, N of 256): the rows kvsim
    calibrate fits as gemm.w4a16."""
    csv = CsvOut(os.path.join(out, "gemm.csv"), ["dtype", "m", "n", "k", "time_s", "flops", "bytes", "layer"])
    mar = load_marlin()
    log(f"marlin: compiled ({open(os.path.join(MARLIN_DIR, 'COMMIT')).read().strip()[:10]})")
    shapes = [s for s in SHAPES if s[1] % MARLIN_GROUP == 0 and s[0] % 256 == 0]
    shapes = only_layers(args, shapes, lambda s: s[2])[:3 if args.quick else None]
    ms = MS_QUICK if args.quick else W4A16_MS
    checked: dict[int, float] = {}
    for (n, k, label) in shapes:
        if not budget.ok(4):
            log("marlin: budget spent")
            return
        if k not in checked:
            checked[k] = guarded(f"marlin check k{k}", marlin_check, mar, k) or float("inf")
            log(f"marlin check k{k}: rel error {checked[k]:.2e}")
        # Marlin sums the thread blocks' partial results through C in fp16, so its error grows with K:
        # 8e-4 at 4,096 to 1.6e-2 at 53,248 (run h100-call20); a wrong layout or tile gives ~1
        if not checked[k] < 5e-2:
            log(f"[WARN] marlin {label}: the check at K {k} failed, not timed")
            continue
        copies = weight_copies(n * k * MARLIN_BITS / 8)
        packs = [(torch.randint(-2**31, 2**31 - 1, (k // 16, n * 16 // 8), dtype=torch.int, device="cuda"),
                  torch.rand(k // MARLIN_GROUP, n, device="cuda", dtype=torch.half) * 0.02) for _ in range(copies)]
        for m in ms:
            if not budget.ok(2):
                break
            t = guarded(f"gemm marlin {m}x{n}x{k}", marlin_point, m, n, k, label, csv, mar, packs)
            if m in LOGGED_MS:
                log_gemm(label, "marlin", m, n, k, t, n * k * MARLIN_BITS / 8 + m * k * 2 + m * n * 2)
        del packs
        torch.cuda.empty_cache()


# Routed-expert GEMMs as the engine runs them (torch._grouped_mm over [E, K, N] weights, rows sorted by
# expert): (experts, top_k, N, K, label) from each MoE model's config.json (gate_up fused, then down).
GROUPED = [
    (60, 4, 2816, 2048, "qwen1.5-moe.w13"), (60, 4, 2048, 1408, "qwen1.5-moe.w2"),
    (64, 6, 2816, 2048, "deepseek-v2-lite.w13"), (64, 6, 2048, 1408, "deepseek-v2-lite.w2"),
    (8, 2, 28672, 4096, "mixtral-8x7b.w13"), (8, 2, 4096, 14336, "mixtral-8x7b.w2"),
]
GROUPED_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]


def grouped_point(E, k, n, kk, tokens, w, label, csv, gen):
    """tokens each pick k distinct experts uniformly at random (a random router): rows sorted by
    expert, one grouped GEMM over all of them; bytes = the touched experts' weights + rows in/out."""
    from validation.common import bench

    choice = torch.rand(tokens, E, generator=gen, device="cuda").topk(k, dim=1).indices.reshape(-1)
    counts = torch.bincount(choice, minlength=E)
    ends = torch.cumsum(counts, 0).to(torch.int32)
    rows = tokens * k
    x = torch.randn(rows, kk, device="cuda", dtype=torch.bfloat16)
    wt = w.transpose(1, 2)  # [E, K, N] view of [E, N, K] weights, as the engine passes them
    fn = lambda: torch._grouped_mm(x, wt, offs=ends)  # noqa: E731
    out = fn()
    first = int(choice.sort().values[0])  # check the first expert's rows against a float GEMM
    m0 = int(counts[first])
    ref = x[:m0].float() @ w[first].float().t()
    err = ((out[:m0].float() - ref).norm() / ref.norm()).item()
    t = bench(fn, rep_ms=30, flush=False)[0]
    active = int((counts > 0).sum())
    byts = active * n * kk * 2 + rows * (kk + n) * 2
    csv.row(experts=E, top_k=k, tokens=tokens, active_experts=active, n=n, k=kk, time_s=t, flops=2 * rows * n * kk,
            bytes=byts, rel_error=f"{err:.2e}", layer=label)
    return t, byts


def run_grouped(args, out, budget):
    csv = CsvOut(os.path.join(out, "gemm_grouped.csv"),
                 ["experts", "top_k", "tokens", "active_experts", "n", "k", "time_s", "flops", "bytes", "rel_error",
                  "layer"])
    gen = torch.Generator(device="cuda").manual_seed(0)
    for (E, k, n, kk, label) in (GROUPED[:2] if args.quick else GROUPED):
        if not budget.ok(3):
            log("grouped: budget spent")
            return
        w = torch.randn(E, n, kk, device="cuda", dtype=torch.bfloat16)
        for tokens in ([1, 64] if args.quick else GROUPED_TOKENS):
            if not budget.ok(2):
                break
            r = guarded(f"grouped {label} T{tokens}", grouped_point, E, k, n, kk, tokens, w, label, csv, gen)
            if r is not None and tokens in (1, 64, 1024):
                log(f"grouped {label} T{tokens}: {r[0]*1e6:.1f} us {r[1]/r[0]/1e12:.2f} TB/s")
        del w
        torch.cuda.empty_cache()


# Routed experts through the vLLM-style Triton fused-MoE kernel (kernels/fused_moe.py) in bf16, FP8
# per-tensor and FP8 128x128 blocks, at the per-rank shards the served MoE models run: (experts, top_k,
# N, K, label), N and K from each config.json (hidden_size, moe_intermediate_size / tp; gate_up fused).
FUSED_MOE = [
    (128, 8, 1536, 4096, "qwen3-235b.tp2.w13"), (128, 8, 4096, 768, "qwen3-235b.tp2.w2"),
    (128, 8, 768, 4096, "qwen3-235b.tp4.w13"), (128, 8, 4096, 384, "qwen3-235b.tp4.w2"),
    (128, 8, 1536, 2048, "qwen3-30b-a3b.w13"), (128, 8, 2048, 768, "qwen3-30b-a3b.w2"),
    (256, 8, 512, 7168, "deepseek-v3.tp8.w13"), (256, 8, 7168, 256, "deepseek-v3.tp8.w2"),
    (128, 8, 384, 4096, "qwen3-235b.tp8.w13"), (128, 8, 4096, 192, "qwen3-235b.tp8.w2"),
    (8, 2, 28672, 4096, "mixtral-8x7b.w13"), (8, 2, 4096, 14336, "mixtral-8x7b.w2"),  # beside the _grouped_mm rows
]
# Candidate tilings, the kind vLLM's tuned configs hold for these shapes on Hopper (e.g. configs/E=128,N=768,
# device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json: BLOCK_SIZE_M 16 up to 128 rows, 64 above;
# BLOCK_SIZE_N 128; BLOCK_SIZE_K 128; 4 warps; 3-5 stages); each point keeps the fastest (a tuned engine).
MOE_CONFIGS = [
    dict(BM=16, BN=64, BK=128, GROUP_M=1, warps=4, stages=3),
    dict(BM=16, BN=128, BK=128, GROUP_M=16, warps=4, stages=3),
    dict(BM=16, BN=128, BK=128, GROUP_M=1, warps=4, stages=5),
    dict(BM=32, BN=128, BK=128, GROUP_M=16, warps=4, stages=3),
    dict(BM=64, BN=128, BK=128, GROUP_M=16, warps=4, stages=4),
    dict(BM=128, BN=128, BK=128, GROUP_M=16, warps=8, stages=3),
    dict(BM=64, BN=256, BK=64, GROUP_M=16, warps=8, stages=3),  # bf16 / fp8 only (block scales need BK 128)
    # large token counts (prefill chunks): wider row blocks, more column blocks sharing each in L2
    dict(BM=128, BN=128, BK=128, GROUP_M=32, warps=4, stages=3),
    dict(BM=64, BN=128, BK=128, GROUP_M=32, warps=4, stages=3),
    dict(BM=128, BN=64, BK=128, GROUP_M=16, warps=4, stages=4),
    # the kind of vLLM's tuned 16-bit tilings for 2,048-4,096 tokens on the H100 (vLLM 0.12 configs/E=128,N=192,
    # device_name=NVIDIA_H100_80GB_HBM3.json at 2,048 and E=128,N=1856,... at 4,096: BM 128, BN 256, BK 64, 8 warps,
    # 4 stages): BK 64, wide column blocks, 8 warps, deep pipelines (bf16 / fp8 only)
    dict(BM=128, BN=256, BK=64, GROUP_M=1, warps=8, stages=4),
    dict(BM=64, BN=256, BK=64, GROUP_M=1, warps=8, stages=5),
    dict(BM=64, BN=128, BK=64, GROUP_M=1, warps=4, stages=3),
]
ELEM = {"bf16": 2, "fp8": 1, "fp8_block": 1}


def moe_inputs(E, top_k, kk, tokens, mode, gen):
    """Routing (tokens each pick top_k distinct experts at random) and quantized activations of one point."""
    from validation.kernels import fused_moe as fm

    ids = torch.rand(tokens, E, generator=gen, device="cuda").topk(top_k, dim=1).indices.to(torch.int32)
    xq, sa = fm.quantize_acts(torch.randn(tokens, kk, device="cuda", dtype=torch.bfloat16), mode)
    return ids, xq, sa


def time_moe(xq, wq, sa, sb, ids, mode, cfg, what):
    """One tiling's time (CUDA graph, L2 flushed: the next layer's experts are elsewhere); None if it failed."""
    from validation.common import bench
    from validation.kernels import fused_moe as fm

    return guarded(f"{what} {cfg}", lambda: bench(fm.moe_gemm(xq, wq, sa, sb, ids, mode, cfg), rep_ms=10)[0])


def best_moe_tiling(xq, wq, sa, sb, ids, mode, what):
    """(time, tiling) of the fastest of MOE_CONFIGS (BK 128 alone for block scales), or None."""
    from validation.kernels import fused_moe as fm

    best = None
    for cfg in MOE_CONFIGS:
        if mode == "fp8_block" and cfg["BK"] != fm.GROUP:
            continue
        t = time_moe(xq, wq, sa, sb, ids, mode, cfg, what)
        if t is not None and (best is None or t < best[0]):
            best = (t, cfg)
    return best


def record_moe(E, top_k, n, kk, tokens, xq, wq, sa, sb, ids, mode, cfg, t, ref, label, csv, src=""):
    """Check one tiling against the float reference on a poisoned output and write its row (params led by
    src=SOURCE when given). bytes = touched experts' weights and scales + rows in/out. Returns (bytes, error)."""
    from validation.common import params_str, rel_error
    from validation.kernels import fused_moe as fm

    launch = fm.moe_gemm(xq, wq, sa, sb, ids, mode, cfg)
    launch().fill_(float("nan"))  # poison, then the checked run must overwrite every row
    err = rel_error(launch().float(), ref)
    active = int(torch.unique(ids).numel())
    scale_bytes = {"bf16": 0, "fp8": 4, "fp8_block": 4 * -(-n // fm.GROUP) * -(-kk // fm.GROUP)}[mode]
    rows = tokens * top_k
    byts = active * (n * kk * ELEM[mode] + scale_bytes) + tokens * kk * ELEM[mode] + rows * n * 2
    params = params_str(**({"src": src} if src else {}), **cfg)
    csv.row(mode=mode, experts=E, top_k=top_k, tokens=tokens, active_experts=active, n=n, k=kk, time_s=t,
            flops=2 * rows * n * kk, bytes=byts, rel_error=f"{err:.2e}", layer=label, params=params)
    return byts, err


def fused_moe_point(E, top_k, n, kk, tokens, wq, sb, wr, mode, label, csv, gen):
    """Every candidate tiling timed, the fastest checked and recorded (a tuned engine)."""
    from validation.kernels import fused_moe as fm

    ids, xq, sa = moe_inputs(E, top_k, kk, tokens, mode, gen)
    best = best_moe_tiling(xq, wq, sa, sb, ids, mode, f"fused_moe {label} {mode} T{tokens}")
    if best is None:
        return None
    t, cfg = best
    ref = fm.reference(fm.dequantized_acts(xq, sa, mode), wr, ids)
    byts, err = record_moe(E, top_k, n, kk, tokens, xq, wq, sa, sb, ids, mode, cfg, t, ref, label, csv)
    return t, byts, err


def fused_moe_vllm_point(E, top_k, n, kk, tokens, wq, sb, wr, mode, label, csv, gen, table, gpu):
    """vLLM's own tilings (0.12 and 0.19, kernels/vllm_tilings.py) beside the best of MOE_CONFIGS, timed in the
    same call on the same routing; a row for each (params src=best-of-13, src=vllm-<version>-<config|default>, the
    versions joined by '+' where they launch the same tiling: kvsim calibrate fits none of these rows).
    Returns {source: time}."""
    from validation.kernels import fused_moe as fm
    from validation.kernels import vllm_tilings as vt

    ids, xq, sa = moe_inputs(E, top_k, kk, tokens, mode, gen)
    what = f"fused_moe {label} {mode} T{tokens}"
    inter = vt.intermediate_size(n, kk, label)
    chosen: dict[vt.Tiling, list[str]] = {}  # a tiling -> the versions that launch it, timed once
    for version in vt.DEFAULT_RULES:
        tiling = vt.vllm_tiling(table, version, gpu, E, inter, mode, tokens)
        chosen.setdefault(dataclasses.replace(tiling, source=""), []).append(f"vllm-{version}-{tiling.source}")
    ref = fm.reference(fm.dequantized_acts(xq, sa, mode), wr, ids)
    times = {}
    best = best_moe_tiling(xq, wq, sa, sb, ids, mode, what)
    if best is not None:
        record_moe(E, top_k, n, kk, tokens, xq, wq, sa, sb, ids, mode, best[1], best[0], ref, label, csv,
                   src="best-of-13")
        times["best-of-13"] = best[0]
    for tiling, sources in chosen.items():
        t = time_moe(xq, wq, sa, sb, ids, mode, tiling.cfg(), what)
        if t is not None:
            src = "+".join(sources)
            record_moe(E, top_k, n, kk, tokens, xq, wq, sa, sb, ids, mode, tiling.cfg(), t, ref, label, csv, src=src)
            times[src] = t
    return times


def run_fused_moe(args, out, budget):
    from validation.kernels import vllm_tilings as vt

    csv = CsvOut(os.path.join(out, "fused_moe.csv"),
                 ["mode", "experts", "top_k", "tokens", "active_experts", "n", "k", "time_s", "flops", "bytes",
                  "rel_error", "layer", "params"])
    shapes = only_layers(args, FUSED_MOE, lambda s: s[4])[:1 if args.quick else None]
    table = vt.load_table() if args.tilings == "vllm" else None
    measure_fused_moe(shapes, [1, 64] if args.quick else GROUPED_TOKENS, csv, budget, table)
    if table is not None:
        log(vt.summary(os.path.join(out, "fused_moe.csv")))


def measure_fused_moe(shapes, token_counts, csv, budget, table):
    """Every shape x mode x token count: the best of MOE_CONFIGS, or with a vLLM tiling table
    (kernels/vllm_tilings.py) that beside vLLM's own choice."""
    from validation.kernels import fused_moe as fm

    gen = torch.Generator(device="cuda").manual_seed(0)
    gpu = torch.cuda.get_device_name(0)
    for (E, k, n, kk, label) in shapes:
        w = torch.randn(E, n, kk, device="cuda", dtype=torch.bfloat16) / kk ** 0.5
        for mode in fm.MODES:
            if not budget.ok(5):
                log("fused_moe: budget spent")
                return
            wq, sb = fm.quantize_weights(w, mode)
            wr = fm.dequantized_weights(wq, sb, mode)  # the reference's weights, once per shape
            for tokens in token_counts:
                if not budget.ok(3):
                    break
                if table is not None:
                    r = guarded(f"fused_moe {label} {mode} T{tokens} vllm tilings", fused_moe_vllm_point, E, k, n,
                                kk, tokens, wq, sb, wr, mode, label, csv, gen, table, gpu)
                    base = (r or {}).get("best-of-13")
                    log(f"fused_moe {label} {mode} T{tokens}: " + "  ".join(
                        f"{src} {t*1e6:.1f} us" + (f" x{t/base:.3f}" if base and src != "best-of-13" else "")
                        for src, t in (r or {}).items()))
                    continue
                r = guarded(f"fused_moe {label} {mode} T{tokens}", fused_moe_point, E, k, n, kk, tokens, wq, sb,
                            wr, mode, label, csv, gen)
                if r is not None and tokens in (1, 16, 1024):
                    log(f"fused_moe {label} {mode} T{tokens}: {r[0]*1e6:.1f} us {r[1]/r[0]/1e12:.2f} TB/s "
                        f"err {r[2]:.1e}")
            del wq, sb, wr
        del w
        torch.cuda.empty_cache()


def run_elementwise(args, out, budget):
    from validation import elementwise  # the engine's own kernels (kernels/engine_ops.py)

    elementwise.run(args, out, budget)


def main():
    ap = part_args(120)
    ap.add_argument("--part", default="gemm",
                    choices=["gemm", "w4a16", "marlin", "grouped", "fused_moe", "elementwise", "fp32_router"])
    ap.add_argument("--layers", default="", help="gemm, fused_moe, marlin: comma-separated layer labels, only these")
    ap.add_argument("--ops", default="", help="elementwise: comma-separated ops, only these (e.g. fp8_group_quant)")
    ap.add_argument("--tilings", default="best", choices=["best", "vllm"],
                    help="fused_moe: the fastest of MOE_CONFIGS (best), or that beside vLLM's own choice (vllm: "
                         "kernels/vllm_tilings.py; rows marked src=, which kvsim calibrate does not fit)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    b = Budget(a.budget_s)
    torch.manual_seed(0)
    {"gemm": run_gemm, "w4a16": run_w4a16, "marlin": run_marlin, "grouped": run_grouped, "fused_moe": run_fused_moe,
     "elementwise": run_elementwise, "fp32_router": run_fp32_router}[a.part](a, a.out, b)


if __name__ == "__main__":
    main()
