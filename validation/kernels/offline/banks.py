"""Shared-memory wavefronts of the local_alloc stores inside a kernel's loop (TTGIR from compile_q.py):
distributed layout (#linear / #blocked) -> lane, register -> (row, col) -> swizzled shared offset ->
banks, 8 lanes per phase of a 16-byte store. ratio = wavefronts / conflict-free wavefronts."""
import itertools

def lin_apply(bases, idx):
    out = [0] * len(bases[0]) if bases else None
    for i, b in enumerate(bases):
        if idx >> i & 1:
            out = [o ^ x for o, x in zip(out, b)]
    return out

def coord(layout, r, l, w):
    reg, lane, warp = layout
    c = [0, 0]
    for bases, idx in ((reg, r), (lane, l), (warp, w)):
        v = lin_apply(bases, idx) if bases else [0, 0]
        c = [a ^ b for a, b in zip(c, v)]
    return c

def swz_offset(row, col, shape, vec, per, maxp, order):
    R, C = shape
    if order == (1, 0):
        ph = (row // per) % maxp
        return row * C + (((col // vec) ^ ph) * vec) + col % vec
    ph = (col // per) % maxp
    return col * R + (((row // vec) ^ ph) * vec) + row % vec

def analyze(layout, shape, sh, elem=2, vec_elems=8, nwarps=4):
    reg, lane, warp = layout
    nreg = 1 << len(reg)
    # group registers into vectors of vec_elems consecutive shared addresses
    offs = {}
    for w in range(nwarps):
        for l in range(32):
            for r in range(nreg):
                rc = coord(layout, r, l, w)
                offs[(w, l, r)] = swz_offset(rc[0], rc[1], shape, *sh)
    # vectors: registers of lane 0 warp 0 sorted by offset, chunk by contiguity
    regs = sorted(range(nreg), key=lambda r: offs[(0, 0, r)])
    vecs, cur = [], [regs[0]]
    for r in regs[1:]:
        if offs[(0, 0, r)] == offs[(0, 0, cur[-1])] + 1 and len(cur) < vec_elems and offs[(0,0,cur[0])] % vec_elems == 0:
            cur.append(r)
        else:
            vecs.append(cur); cur = [r]
    vecs.append(cur)
    width = len(vecs[0]) * elem
    group = min(32, max(1, 128 // width))
    total = 0
    for w in range(nwarps):
        for v in vecs:
            for g0 in range(0, 32, group):
                banks = {}
                for l in range(g0, g0 + group):
                    a = offs[(w, l, v[0])] * elem
                    for word in range(a // 4, (a + width + 3) // 4):
                        banks.setdefault(word % 32, set()).add(word)
                total += max(len(s) for s in banks.values())
    ideal = nwarps * len(vecs) * max(1, 32 * width // 128)
    return dict(insts_per_warp=len(vecs), bytes_per_thread=width, wavefronts=total, ideal=ideal, ratio=total / ideal)

if __name__ == "__main__":
    L = ([[0, 2], [0, 4], [0, 8], [0, 1], [0, 16], [0, 32], [16, 0]],
         [[0, 64], [32, 0], [64, 0], [1, 0], [2, 0]], [[4, 0], [8, 0]])
    print("K tile -> #shared (vec16,ph4)", analyze(L, (128, 128), (16, 1, 4, (1, 0))))
    print("V tile -> #shared3 (vec8,ph8)", analyze(L, (128, 128), (8, 1, 8, (1, 0))))

import re, ast
def parse_layouts(ttgir):
    lay = {}
    for m in re.finditer(r"^#(\w+) = #ttg\.(\w+)<\{(.*)\}>", ttgir, re.M):
        name, kind, body = m.groups()
        d = {}
        i = 0
        while i < len(body):
            mm = re.match(r"\s*(\w+) = ", body[i:])
            if not mm:
                break
            k = mm.group(1); i += mm.end()
            if body[i] == "[":
                depth, j = 0, i
                while True:
                    depth += body[j] == "["; depth -= body[j] == "]"; j += 1
                    if depth == 0: break
                v = body[i:j]
            else:
                j = i
                while j < len(body) and body[j] != ",": j += 1
                v = body[i:j]
            try:
                d[k] = ast.literal_eval(v)
            except Exception:
                d[k] = v
            i = j + 1
        lay[name] = (kind, d)
    return lay

def blocked_to_linear(d, shape):
    spt, tpw, wpc, order = d["sizePerThread"], d["threadsPerWarp"], d["warpsPerCTA"], d["order"]
    nd = len(shape)
    reg, lane, warp = [], [], []
    def unit(dim, k):
        v = [0] * nd; v[dim] = k; return v
    # registers: sizePerThread along order, then repeats
    for dim in order:
        k = 1
        while k < spt[dim]:
            reg.append(unit(dim, k)); k *= 2
    for dim in order:
        k = 1
        while k < tpw[dim]:
            lane.append(unit(dim, spt[dim] * k) if spt[dim] * k < shape[dim] else [0]*nd); k *= 2
    for dim in order:
        k = 1
        while k < wpc[dim]:
            warp.append(unit(dim, spt[dim] * tpw[dim] * k) if spt[dim]*tpw[dim]*k < shape[dim] else [0]*nd); k *= 2
    for dim in order:
        k = spt[dim] * tpw[dim] * wpc[dim]
        while k < shape[dim]:
            reg.append(unit(dim, k)); k *= 2
    return reg, lane, warp

def scan(path, nwarps=4):
    t = open(path).read()
    lay = parse_layouts(t)
    inloop = t[t.find("scf.for"):]
    for m in re.finditer(r"ttg\.local_alloc %\S+ : \(tensor<(\d+)x(\d+)xf16, #(\w+)>\) -> !ttg\.memdesc<\d+x\d+xf16, #(\w+)", inloop):
        R, C, src, dst = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        kind, d = lay[src]
        if kind == "linear":
            L = (d["register"], d["lane"], d["warp"])
        elif kind == "blocked":
            L = blocked_to_linear(d, (R, C))
        else:
            print("  skip", kind, src); continue
        sk, sd = lay[dst]
        if sk != "swizzled_shared":
            print("  skip shared", sk); continue
        r = analyze(L, (R, C), (sd["vec"], sd["perPhase"], sd["maxPhase"], tuple(sd["order"])), nwarps=nwarps)
        print(f"  {R}x{C} #{src} -> #{dst} {sd}: {r}")

if __name__ == "__main__":
    import glob, sys
    for p in sorted(glob.glob(sys.argv[1] if len(sys.argv) > 1 else "/tmp/qc/dump/*.ttgir")):
        print(p.split("/")[-1])
        scan(p)
