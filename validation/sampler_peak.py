"""The memory peak of vLLM 0.10.2-0.16's PyTorch-native top-k/top-p sampler, which the KV-cache budget
of those versions loses to (kvsim/data/vllm_memory.yaml, sampler_bytes_per_logit 36: derived from the
source and checked on one public log of 256 rows).

vLLM's worker profiles memory with a dummy sampler run over min(max_num_seqs, max_num_batched_tokens)
rows of the vocabulary (``_dummy_sampler_run``: top-k = vocabulary - 1, top-p 0.99, neither greedy nor
all-random), so 1,024 rows on an H100. This part runs the same sequence of tensor operations on random
logits, written from the algorithm of vllm/v1/sample/sampler.py and ops/topk_topp_sampler.py (0.11.0):
the model-dtype logits cast to fp32, temperature divided in place, the rows sorted ascending (values and
int64 indices), the top-k threshold gathered and masked, softmax and an in-place cumulative sum for the
top-p mask, the sorted values scattered back, softmax to probabilities, and an exponential draw divided
in for the sample. It records the allocator's peak above the model-dtype logits, per logit: what kvsim
charges as sampler_bytes_per_logit (without the model-dtype logits, which it adds apart). No vLLM code
is copied.

With ``--sampler flashinfer`` it runs FlashInfer's sampler instead, as vLLM's V1 sampler calls it wherever
FlashInfer is installed in 0.10.2-0.11 and with VLLM_USE_FLASHINFER_SAMPLER=1 from 0.12
(ops/topk_topp_sampler.py ``flashinfer_sample``: the fp32 logits, temperature divided in place, then
``flashinfer.sampling.top_k_top_p_sampling_from_logits(logits, k, p, deterministic=True)``): kvsim charges
12 B per logit for it (kvsim/memory.py FLASHINFER_SAMPLER_BYTES_PER_LOGIT, derived from flashinfer's
sampling.py). FlashInfer is not on the lent machines: carry its wheel and pure-Python dependencies
(flashinfer-python, apache-tvm-ffi, ninja, einops, tabulate, click, tqdm, nvidia-ml-py, requests) and
install them with --no-deps before the call; its sampling kernels compile on the device (nvcc).

Rows go to sampler_peak.csv: sampler (native or flashinfer plus its version), rows, vocab, peak_bytes
(above the bf16 logits), per_logit, sort_only (the same for torch.sort alone: values and indices; native
only), torch version in meta.
"""
from __future__ import annotations

import os

from validation.common import Budget, CsvOut, log, part_args

# (rows, vocabulary): the dummy run's rows on a 24 GB card (256) and on an 80 GB H100 (1,024) at the
# vocabularies of Llama-3 (128,256), Qwen3 (151,936) and gpt-oss (201,088) (their config.json vocab_size)
POINTS = [(rows, vocab) for rows in (256, 1024) for vocab in (128256, 151936, 201088)]


def sample_native(logits_dtype, top_k, top_p):
    """The native sampler's path on the dummy run's metadata; returns the sampled token ids."""
    import torch

    logits = logits_dtype.to(torch.float32)
    logits.div_(torch.full((logits.shape[0], 1), 1.0, device=logits.device))  # temperature 1, in place
    values, order = logits.sort(dim=-1, descending=False)
    threshold = values.gather(1, (values.shape[1] - top_k).unsqueeze(1))
    values.masked_fill_(values < threshold, float("-inf"))
    cum = values.softmax(dim=-1)
    torch.cumsum(cum, dim=-1, out=cum)
    below = cum <= 1 - top_p.unsqueeze(1)
    below[:, -1] = False
    values.masked_fill_(below, float("-inf"))
    del cum, below
    logits = values.scatter(dim=-1, index=order, src=values)
    del values, order
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    q = torch.empty_like(probs).exponential_()
    return probs.div_(q).argmax(dim=-1)


def sample_flashinfer(logits_dtype, top_k, top_p):
    """FlashInfer's path on the same metadata: vLLM's cast and in-place temperature, then FlashInfer."""
    import flashinfer.sampling
    import torch

    logits = logits_dtype.to(torch.float32)
    logits.div_(torch.full((logits.shape[0], 1), 1.0, device=logits.device))
    return flashinfer.sampling.top_k_top_p_sampling_from_logits(logits, top_k, top_p, deterministic=True)


def peak_above(fn) -> int:
    """Bytes the allocator's peak rises above what is allocated when ``fn`` starts."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main():
    import torch

    ap = part_args(60)
    ap.add_argument("--sampler", choices=("native", "flashinfer"), default="native")
    a = ap.parse_args()
    budget = Budget(a.budget_s)
    native = a.sampler == "native"
    if native:
        sample, name = sample_native, "native"
    else:
        import flashinfer

        sample, name = sample_flashinfer, f"flashinfer {flashinfer.__version__}"
    csv = CsvOut(os.path.join(a.out, "sampler_peak.csv"), ["sampler", "rows", "vocab", "peak_bytes", "per_logit",
                                                           "sort_peak_bytes", "sort_per_logit"])
    for rows, vocab in POINTS[:2] if a.quick else POINTS:
        if not budget.ok(5):
            break
        logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
        # FlashInfer takes int32 top-k (its kernels' IdType); vLLM's native path int64
        k = torch.full((rows,), vocab - 1, device="cuda", dtype=torch.long if native else torch.int32)
        p = torch.full((rows,), 0.99, device="cuda", dtype=torch.float32)
        ids = sample(logits, k, p)  # warm-up: compiles FlashInfer's kernels; cub's and the allocator's first call
        assert ids.shape == (rows,) and int(ids.min()) >= 0 and int(ids.max()) < vocab, "sampled ids out of range"
        torch.cuda.empty_cache()
        peak = peak_above(lambda: sample(logits, k, p))
        sort_peak = None
        if native:
            fp32 = logits.float()
            torch.cuda.empty_cache()
            sort_peak = peak_above(lambda: fp32.sort(dim=-1))
            del fp32
        n = rows * vocab
        csv.row(sampler=name, rows=rows, vocab=vocab, peak_bytes=peak, per_logit=peak / n,
                sort_peak_bytes=sort_peak, sort_per_logit=None if sort_peak is None else sort_peak / n)
        log(f"{name} sampler rows {rows} vocab {vocab}: peak {peak / 2**30:.3f} GiB = {peak / n:.2f} B per logit"
            + ("" if sort_peak is None else f" (torch.sort of the fp32 logits alone: {sort_peak / n:.2f})"))
        del logits
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
