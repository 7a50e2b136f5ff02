import compile_q as c, re
from validation.kernels import quant_decode as qd
rows = [("tile", qd._qdecode_kernel, 2, True, 128, 4, 64), ("tile", qd._qdecode_kernel, 2, False, 128, 4, 32),
        ("tile", qd._qdecode_kernel, 4, True, 128, 4, 64), ("tile", qd._qdecode_kernel, 8, True, 64, 4, 64),
        ("rd", qd._qdecode_rd_kernel, 2, True, 64, 1, 64), ("rd", qd._qdecode_rd_kernel, 4, True, 64, 1, 64),
        ("rd", qd._qdecode_rd_kernel, 8, True, 64, 1, 64), ("rd", qd._qdecode_rd_kernel, 2, False, 32, 1, 32),
        ("rd", qd._qdecode_rd_kernel, 4, False, 32, 1, 32), ("rd", qd._qdecode_rd_kernel, 2, True, 32, 1, 64)]
import io, contextlib
for kern, fn, kb, pt, bn, nw, g in rows:
    tag = f"{fn.__name__}_k{kb}v{kb}{'tok' if pt else 'ch'}_BN{bn}_w{nw}_s3"
    with contextlib.redirect_stdout(io.StringIO()):
        c.qdecode(kb, kb, pt, bn, nw, 3, gk=g, gv=g, dump="/tmp/qc/sum", fn=fn)
        body = c.loop_stats(tag, "/tmp/qc/sum")
    res = open(f"/tmp/qc/sum/{tag}.sass").read()
    import subprocess
    k = lambda op: sum(1 for l in body if re.search(r"\s" + op + r"[\s.]", l))
    print(f"{kern:4s} k{kb} {'tok' if pt else 'ch '} BN{bn:3d} w{nw}: loop {len(body):5d} instr = {len(body)*nw/bn:5.1f} warp-instr/token-row;"
          f" HMMA/token-row {k('HMMA')*nw/bn:.2f}; STS {k('STS')} LDS {k('LDS')} LDSM {k('LDSM')} BAR {k('BAR')} LDL/STL {k('LDL')+k('STL')} LDG {k('LDG')} LDGSTS {k('LDGSTS')}")
