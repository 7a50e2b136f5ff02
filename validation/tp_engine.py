"""Tensor-parallel reference engine (issue 7): one process per GPU, NCCL through torch.distributed.

Megatron split (engine_model.EngineConfig.shard): QKV and gate/up column-parallel, O and down
row-parallel with one all-reduce each (two per layer), KV heads split across ranks (replicated when
there are fewer than ranks), MoE expert intermediates split, vocab-parallel LM head whose logits
are all-gathered. The decode step, all-reduces included, is captured in one CUDA graph per rank.

NVLink multicast stays OFF (NVLS can take a shared host's GPUs out of service): every process gets
NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 before NCCL loads,
and nothing here uses symmetric memory or multimem.

  python3 validation/tp_engine.py --task allreduce|engine|gpus --tp N --out DIR --budget-s S [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time

NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NVLS_OFF)  # before torch (and NCCL) load; inherited by every spawned worker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from validation.common import CsvOut, log  # noqa: E402
from validation.engine import DEC_COLS, PRE_COLS, decode_row, fit_layers, prefill_row, quantiles, time_graph  # noqa: E402

AR_COLS = ["tp", "bytes", "time_s", "time_p10_s", "time_p90_s", "algbw_Bps", "busbw_Bps", "mode", "dtype", "check"]
# Models whose heads split over 2/4/8 ranks (falcon-7b's 71 heads do not).
TP_MODELS = ["llama-3-8b", "llama-2-7b", "qwen2.5-7b", "qwen1.5-moe-a2.7b", "deepseek-v2-lite", "mixtral-8x7b",
             "gemma-2b", "phi-3-mini"]
QUICK_TP_MODELS = ["llama-3-8b", "deepseek-v2-lite"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Clock:
    """Rank 0's wall-clock budget, agreed on by all ranks (a collective per question)."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.time(), seconds

    def ok(self, need: float) -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self.seconds - (time.time() - self.t0) > need else 0], device="cuda")
        dist.broadcast(flag, 0)
        return bool(flag.item())


def agree(flag: bool) -> bool:
    """True only when every rank says True (memory checks must agree or NCCL would hang)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def slowest(x: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([x], device="cuda", dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


# ----------------------------------------------------------------------------- all-reduce sweep
def allreduce_task(args, rank, world):
    import torch
    import torch.distributed as dist

    csv = CsvOut(os.path.join(args.out, "allreduce.csv"), AR_COLS) if rank == 0 else None
    clock = Clock(args.budget_s)
    sizes = [2**k for k in range(10, 29, 2 if args.quick else 1)]  # 1 KiB .. 256 MiB
    for n in sizes:
        if not clock.ok(3):
            break
        x = torch.full((n // 2,), float(rank + 1), device="cuda", dtype=torch.bfloat16)
        dist.all_reduce(x)
        check = int(bool((x == world * (world + 1) / 2).all()))  # small integers are exact in bf16
        for mode in ("eager", "graph"):
            reps = 10
            if mode == "eager":
                ts = []
                for _ in range(20):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    dist.barrier()
                    a.record()
                    for _ in range(reps):
                        dist.all_reduce(x)
                    b.record()
                    b.synchronize()
                    ts.append(a.elapsed_time(b) / 1e3 / reps)
                t, p10, p90 = quantiles(ts)
            else:
                dist.barrier()
                t, p10, p90 = (v / reps for v in time_graph(lambda: [dist.all_reduce(x) for _ in range(reps)], slowest))
            t, p10, p90 = slowest(t), slowest(p10), slowest(p90)
            if csv:
                alg = n / t
                csv.row(tp=world, bytes=n, time_s=t, time_p10_s=p10, time_p90_s=p90, algbw_Bps=alg,
                        busbw_Bps=alg * 2 * (world - 1) / world, mode=mode, dtype="bf16", check=check)
                log(f"allreduce tp{world} {n} B {mode}: {t*1e6:.1f} us bus {alg*2*(world-1)/world/1e9:.1f} GB/s ok={check}")
        del x
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- TP engine
def engine_task(args, rank, world):
    """engine.py's points (its TP grid) on `world` ranks: every rank runs the same points in the
    same order (budget, memory and replay counts agreed by collectives), rank 0 writes the rows
    with the slowest rank's times and its own (per-rank) KV bytes."""
    import torch
    import torch.distributed as dist

    from validation.engine import describe, fits, plan
    from validation.engine_model import Decoder, get_config

    torch.manual_seed(rank)
    out = {"decode": CsvOut(os.path.join(args.out, "engine_decode.csv"), DEC_COLS),
           "prefill": CsvOut(os.path.join(args.out, "engine_prefill.csv"), PRE_COLS)} if rank == 0 else None
    say = log if rank == 0 else (lambda *a: None)
    clock = Clock(args.budget_s)
    models = args.models.split(",") if args.models else (QUICK_TP_MODELS if args.quick else TP_MODELS)

    def allreduce(x):
        dist.all_reduce(x)
        return x

    def allgather(x):
        out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), device=x.device, dtype=x.dtype)
        dist.all_gather_into_tensor(out, x.contiguous())
        return out

    for mi, name in enumerate(models):
        share = (args.budget_s - (time.time() - clock.t0)) / (len(models) - mi)
        mclock = Clock(share)
        full = get_config(name, say)
        if full.q_heads % world or full.hidden % world or (full.kv_heads % world and full.kv_heads > world):
            say(f"== {name}: heads do not split over {world} ranks; skipped")
            continue
        cfg = full.shard(world)
        free, _ = torch.cuda.mem_get_info()
        t = torch.tensor([fit_layers(cfg, free, args.quick)], device="cuda")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        layers = int(t.item())
        say(f"== {name} tp{world}: {layers}/{cfg.layers} layers, rank weights {cfg.weight_params(layers)*2/1e9:.1f} GB")
        model = Decoder(cfg, layers, allreduce=allreduce, allgather=allgather)
        for point in plan(cfg, args.quick, "tp"):
            free, _ = torch.cuda.mem_get_info()
            if not agree(fits(cfg, layers, point, free)):
                continue
            if not mclock.ok(3):
                break
            dist.barrier()
            if point[0] == "prefill":
                row = prefill_row(model, name, point[1], agree=slowest, eager_ok=False)
            else:
                row = decode_row(model, name, *point[1:], agree=slowest, eager_ok=False)
            torch.cuda.empty_cache()
            if out:
                out[point[0]].row(**row)
            say("  " + describe(row))
        del model
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- per-GPU ceilings
def gpus_task(args):
    """Copy bandwidth and bf16 GEMM rate of every GPU (one process, one device at a time)."""
    import json

    import torch

    from validation.ceilings import copy_bw, gemm_rate, warm_up

    out = {}
    for i in range(torch.cuda.device_count()):
        with torch.cuda.device(i):
            warm_up(0.5)
            out[str(i)] = dict(name=torch.cuda.get_device_name(i), copy=copy_bw((0.5,) if args.quick else (2.0,)),
                               gemm_bf16=gemm_rate("bf16", 2048 if args.quick else 8192))
        log(f"gpu {i}: copy {out[str(i)]['copy']['bw_Bps']/1e12:.3f} TB/s "
            f"bf16 {out[str(i)]['gemm_bf16']['rate_flops']/1e12:.0f} TF/s")
    with open(os.path.join(args.out, "ceilings_per_gpu.json"), "w") as f:
        json.dump(out, f, indent=1)


def worker(rank, world, args, port):
    import torch
    import torch.distributed as dist

    os.environ.update(NVLS_OFF)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120), device_id=torch.device("cuda", rank))
    try:
        (allreduce_task if args.task == "allreduce" else engine_task)(args, rank, world)
    finally:
        dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--task", choices=["allreduce", "engine", "gpus"], required=True)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=120)
    ap.add_argument("--models", default="")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.task == "gpus":
        gpus_task(a)
        return
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(a.tp, a, free_port()), nprocs=a.tp, join=True)


if __name__ == "__main__":
    main()
