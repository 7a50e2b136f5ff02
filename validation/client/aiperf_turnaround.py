"""How long aiperf's own loop keeps a closed-loop client from sending its next request: the time from a
response's last byte leaving the server to the client's next request reaching it.

aiperf (the benchmark client of NVIDIA aiconfigurator's generated benchmarks and of its public
silicon measurements) returns a concurrency slot only after it has parsed the whole response stream
(``Worker._process_credit_drop_internal``: ``_execute_single_credit_internal`` then the credit return,
ai-dynamo/aiperf aiperf/workers/worker.py), and the next request goes out only after the credit has
passed through its timing manager and a worker has fetched the next prompt from its dataset manager.
That time is a think time in kvsim's closed loop (``workload.closed_loop.think_ms``: outside TTFT,
since aiperf stamps a request's start just before it sends it).

This runs aiperf against a stand-in OpenAI chat server (a first chunk after ``--ttft-ms``, then one
chunk every ``--itl-ms``, ``max_tokens`` chunks, vLLM's chunk format) so that only the client's time
is measured, and logs on the server when each request arrived and when its last byte was written.
With ``c`` clients, the k-th request (after the first ``c`` of each phase) is sent when the
(k - c)-th completion freed its slot: turnaround = arrival_k - end_(k-c). It measures the client on
this machine's CPU: a benchmark host with more or faster cores turns around faster, and a client
short of cores (many workers parsing long streams) much slower.

    python3 -m venv /tmp/aipenv && /tmp/aipenv/bin/pip install aiperf==0.4.0 aiohttp "numpy>=2"
    /tmp/aipenv/bin/python validation/client/aiperf_turnaround.py --concurrency 1 --osl 128 \
        --out validation/results/client/aiperf_turnaround.csv

(aiperf 0.4.0 pins numpy 1.26 but its pyarrow import needs numpy 2; it runs with numpy 2. On 2 cores a
run of 1,024-token outputs longer than about 50 s stops with a TimeoutError of aiperf's own services:
``--rounds 10``, or 5 with 8 clients, stays under it.)
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

COLUMNS = ("date_utc", "aiperf", "cpu", "cores", "concurrency", "isl", "osl", "ttft_ms", "itl_ms", "requests",
           "turnaround_median_ms", "turnaround_mean_ms", "turnaround_p10_ms", "turnaround_p90_ms",
           "client_ttft_minus_server_ms", "command")


def serve(port: int, log: Path, ttft_s: float, itl_s: float) -> None:
    """The stand-in server (run in a child process): streams ``max_tokens`` chunks per request."""
    from aiohttp import web

    out = log.open("w")

    async def chat(req: web.Request) -> web.StreamResponse:
        body = await req.json()
        arrived = time.time()
        n = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(req)
        await asyncio.sleep(ttft_s)
        for i in range(n):
            if i:
                await asyncio.sleep(itl_s)
            chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": body.get("model"),
                     "choices": [{"index": 0, "delta": {"content": " word"},
                                  "finish_reason": None if i < n - 1 else "length"}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        out.write(f"{arrived:.6f},{time.time():.6f}\n")
        out.flush()
        return resp

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    web.run_app(app, port=port, access_log=None, print=None)


def tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer trained on aiperf's own prompt corpus (the hub is unreachable here;
    aiperf needs one to cut its synthetic prompts, and tokenizes nothing while requests run)."""
    import aiperf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = Path(aiperf.__file__).parent / "dataset" / "generator" / "assets" / "shakespeare.txt"
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(corpus)], trainers.BpeTrainer(vocab_size=16000, special_tokens=["<unk>", "<|endoftext|>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


def turnarounds_ms(log: Path, concurrency: int) -> list[float]:
    """Arrival of each request minus the completion that freed its slot, skipping the first
    ``concurrency`` sends of the warm-up phase and of the profiling phase (aiperf starts profiling only
    when every warm-up response is back)."""
    arrived, ended = [], []
    for line in log.read_text().splitlines():
        a, e = line.split(",")
        arrived.append(float(a))
        ended.append(float(e))
    arrived.sort()
    ended.sort()
    warm = 2 * concurrency
    return [(arrived[k] - ended[k - concurrency]) * 1e3 for k in range(len(arrived))
            if not (k < concurrency or warm <= k < warm + concurrency)]


def _quantile(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, int(q * len(s)))]


def _client_ttft_ms(artifacts: Path) -> float:
    """aiperf's mean TTFT (its profile export) in ms."""
    data = json.loads(next(artifacts.rglob("profile_export_aiperf.json")).read_text())
    return float(data["time_to_first_token"]["avg"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--isl", type=int, default=1024)
    ap.add_argument("--osl", type=int, default=128)
    ap.add_argument("--ttft-ms", type=float, default=30.0)
    ap.add_argument("--itl-ms", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=20, help="requests per client (aiconfigurator's script: 20)")
    ap.add_argument("--out", type=Path, required=True, help="CSV to append one row to")
    ap.add_argument("--serve", nargs=2, metavar=("PORT", "LOG"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        serve(int(a.serve[0]), Path(a.serve[1]), a.ttft_ms / 1e3, a.itl_ms / 1e3)
        return
    import aiperf  # noqa: F401 - fail here, before starting anything, if it is missing

    aiperf_bin = Path(sys.executable).with_name("aiperf")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with socket.socket() as s:  # a free port
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = work / "server.csv"
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), str(log),
                                   "--ttft-ms", str(a.ttft_ms), "--itl-ms", str(a.itl_ms), "--out", str(a.out)])
        try:
            time.sleep(2.0)
            cmd = [str(aiperf_bin), "profile", "--artifact-dir", str(work / "art"), "-m", "m", "--endpoint-type", "chat",
                   "-u", f"http://127.0.0.1:{port}", "--tokenizer", str(tokenizer(work / "tok")),
                   "--isl", str(a.isl), "--isl-stddev", "0", "--osl", str(a.osl), "--osl-stddev", "0",
                   "--extra-inputs", "ignore_eos:true", "--concurrency", str(a.concurrency),
                   "--num-requests", str(a.concurrency * a.rounds), "--warmup-request-count", str(2 * a.concurrency),
                   "--random-seed", "100", "--ui", "simple", "--streaming"]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)
        finally:
            server.terminate()
            server.wait()
        g = turnarounds_ms(log, a.concurrency)
        row = {"date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
               "aiperf": subprocess.run([str(aiperf_bin), "--version"], capture_output=True, text=True).stdout.strip(),
               "cpu": _cpu_model(), "cores": os.cpu_count(),
               "concurrency": a.concurrency, "isl": a.isl, "osl": a.osl, "ttft_ms": a.ttft_ms, "itl_ms": a.itl_ms,
               "requests": len(g), "turnaround_median_ms": round(_quantile(g, 0.5), 2),
               "turnaround_mean_ms": round(sum(g) / len(g), 2), "turnaround_p10_ms": round(_quantile(g, 0.1), 2),
               "turnaround_p90_ms": round(_quantile(g, 0.9), 2),
               "client_ttft_minus_server_ms": round(_client_ttft_ms(work / "art") - a.ttft_ms, 2),
               "command": " ".join(["python3", "validation/client/aiperf_turnaround.py", *sys.argv[1:]])}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    new = not a.out.exists()
    with a.out.open("a", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        if new:
            w.writeheader()
        w.writerow(row)
    print(", ".join(f"{k}={row[k]}" for k in COLUMNS[4:15]))


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
