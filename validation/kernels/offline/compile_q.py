"""Offline sm_90 compile (no GPU needed) of the quantized decode kernels with this machine's Triton and
its bundled ptxas/cuobjdump: registers, stack (spills), shared memory, TTGIR layout conversions and
the main loop's SASS instruction mix. Integer and pointer arguments get tt.divisibility=16 as the JIT
gives them at run time (without it the loads are neither vectorized nor pipelined: a misleading
compile). Used for NOTES-quant.md:  python validation/kernels/offline/summary.py"""
import os, sys, re, subprocess, tempfile, json
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from validation.kernels import quant_decode as qd

NODIV = ["slh", "qk_scale"]
BIN = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")

def compile_kernel(fn, sig, consts, num_warps, num_stages):
    sig = dict(sig)
    for k in consts:
        sig[k] = "constexpr"
    nodiv = set(NODIV)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
             if t != "constexpr" and not t.startswith("fp") and n not in nodiv}
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))

def stats(k, tag, dump=None):
    cubin = k.asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin); p = f.name
    res = subprocess.run([f"{BIN}/cuobjdump", "-res-usage", p], capture_output=True, text=True).stdout
    sass = subprocess.run([f"{BIN}/cuobjdump", "-sass", p], capture_output=True, text=True).stdout
    regm = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    ptx = k.asm["ptx"]
    ttgir = k.asm["ttgir"]
    ins = [l for l in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", l)]
    ops = {}
    for l in ins:
        m = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", l)
        if m:
            op = m.group(1).split(".")[0]
            ops[op] = ops.get(op, 0) + 1
    top = sorted(ops.items(), key=lambda x: -x[1])[:25]
    print(f"{tag}: {regm.group(0) if regm else res.strip()} shared(meta)={k.metadata.shared} n_sass={len(ins)}")
    print("   ld.local", ptx.count("ld.local"), "st.local", ptx.count("st.local"),
          "convert_layout", ttgir.count("convert_layout"), "local_alloc", ttgir.count("local_alloc"),
          "wgmma", ttgir.count("warp_group_dot"), "mma", ttgir.count("tt.dot") + ttgir.count("ttg.dot"))
    print("   ", top)
    if dump:
        os.makedirs(dump, exist_ok=True)
        for ext, txt in (("ttgir", ttgir), ("ptx", ptx), ("sass", sass), ("ttir", k.asm["ttir"]), ("llir", k.asm["llir"])):
            open(f"{dump}/{tag}.{ext}", "w").write(txt)
    return ops

QSIG = {}
names = qd._qdecode_kernel.arg_names
for n in names:
    QSIG[n] = "i32"
for n in ("Q", "KS", "KZ", "VS", "VZ"):
    QSIG[n] = "*fp16"
for n in ("KW", "VW"):
    QSIG[n] = "*i16"
QSIG["OP"] = "*fp32"; QSIG["LP"] = "*fp32"; QSIG["qk_scale"] = "fp32"

def qdecode(kbits, vbits, per_token, BN, nw, ns, asm=True, gk=64, gv=64, dump=None, fn=None, extra=None):
    consts = dict(GROUP=4, G_PAD=16, D=128, BN=BN, KBITS=kbits, VBITS=vbits, K_PER_TOKEN=per_token,
                  GK=gk, GV=gv, ASM=asm)
    if extra: consts.update(extra)
    fn = fn or qd._qdecode_kernel
    sig = {n: QSIG.get(n, "i32") for n in fn.arg_names if n not in consts}
    k = compile_kernel(fn, sig, consts, nw, ns)
    return stats(k, f"{fn.__name__}_k{kbits}v{vbits}{'tok' if per_token else 'ch'}_BN{BN}_w{nw}_s{ns}", dump)

if __name__ == "__main__":
    qdecode(2, 2, False, 128, 4, 3, gk=32, gv=32, dump="/tmp/qc/dump")

def loop_body(sass_text):
    """Instructions inside the largest backward-branch range (the main loop)."""
    lines = [l for l in sass_text.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", l)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]{4})\*/", l).group(1), 16) for l in lines]
    best = None
    for i, l in enumerate(lines):
        m = re.search(r"BRA\s+(0x[0-9a-f]+)", l)
        if m:
            tgt = int(m.group(1), 16)
            if tgt < addr[i]:
                j = addr.index(tgt) if tgt in addr else None
                if j is not None and (best is None or i - j > best[1] - best[0]):
                    best = (j, i)
    return lines[best[0]:best[1] + 1] if best else []

def loop_stats(tag, dump="/tmp/qc/dump"):
    body = loop_body(open(f"{dump}/{tag}.sass").read())
    ops = {}
    for l in body:
        m = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", l)
        if m:
            ops[m.group(1)] = ops.get(m.group(1), 0) + 1
    print(f"  loop {tag}: {len(body)} instr;", sorted(ops.items(), key=lambda x: -x[1])[:40])
    return body
