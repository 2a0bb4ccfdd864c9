"""Batched decoding of a random Falcon-7B, its real configuration, in bf16 on one GPU.

Run from the repository root::

    python bench/bench_falcon_gpu.py          # CUDA: Falcon-7B's architecture, random weights
    python bench/bench_falcon_gpu.py --tiny   # the same script on the CPU at a toy size (a check)

The model is built from ``FalconConfig`` (hidden 4544, 32 layers, 71 heads, multi-query,
parallel attention, vocabulary 65024, 2048 tokens of context) with random weights: nothing is
downloaded, and the speed of a decode step does not depend on the weights' values. The
tokenizer is a WordLevel one with one word per id (``w0`` ... ``w65023``), so every id the
model draws decodes.

It measures, in this process, with the blueprint's
:class:`~flask_sse_run.llm.BatchScheduler` (streams read by threads, no HTTP):

* bare ``model.generate()`` of one stream (the reference of one stream);
* 1, 2, 4, 8 and 16 simultaneous streams of ``--tokens`` greedy tokens: the aggregate
  tokens/s, the time to each stream's first token (p50, p99), each stream's tokens/s;
* the bandwidth limit: a decode step reads every weight once, so one stream cannot exceed
  ``bandwidth / weight bytes`` tokens/s and ``n`` streams ``n`` times that (the KV cache's
  reads, small with multi-query attention, are left out). ``--bandwidth-gbs`` gives the
  GPU's memory bandwidth; known GPUs are looked up by name.

The output ends with a JSON report; paste its figures into the README's Falcon section.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the server sets it

from bench.common import in_threads, percentile  # noqa: E402

PROMPT = " ".join(f"w{i}" for i in range(100, 116))  # 16 tokens

#: Memory bandwidth in GB/s of GPUs by a part of their name (the SXM versions where both exist).
BANDWIDTH_GBS = {
    "H200": 4800,
    "H100 NVL": 3900,
    "H100 PCIe": 2000,
    "H100": 3350,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100": 1555,
    "L40S": 864,
    "A10G": 600,
    "L4": 300,
}

FALCON_7B = {
    "vocab_size": 65024,
    "hidden_size": 4544,
    "num_hidden_layers": 32,
    "num_attention_heads": 71,
    "multi_query": True,
    "parallel_attn": True,
    "new_decoder_architecture": False,
    "alibi": False,
    "bias": False,
    "max_position_embeddings": 2048,
}
TINY = {**FALCON_7B, "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def numbered_tokenizer(vocab: int) -> Any:
    """A WordLevel tokenizer with one word per id: ``w0`` (also the EOS) to ``w{vocab-1}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(vocab)}, unk_token="w1"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="w0", unk_token="w1")


def build(config_values: dict[str, Any], device: str, dtype: Any) -> Any:
    """A ``FalconForCausalLM`` with random weights, made on ``device`` in ``dtype``."""
    import torch
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(**config_values, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FalconForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def bare_generate(model: Any, ids: list[int], tokens: int) -> dict[str, float]:
    import torch

    input_ids = torch.tensor([ids], device=model.device)

    def seconds(n: int) -> float:
        sync()
        began = time.perf_counter()
        model.generate(
            input_ids=input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )
        sync()
        return time.perf_counter() - began

    seconds(4)  # warm-up
    return {"tokens_per_s": tokens / seconds(tokens), "ttft_ms": seconds(1) * 1000}


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def streams(scheduler: Any, ids: list[int], tokens: int, count: int) -> list[dict[str, float]]:
    from flask_sse_run.llm import GenerationParams

    params = GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0)
    barrier = threading.Barrier(count)
    results: list[dict[str, float]] = [{} for _ in range(count)]

    def one(i: int) -> None:
        barrier.wait()
        started = time.perf_counter()
        first = None
        items = 0
        for item in scheduler.admit(ids, params, started=started):
            items += 1
            if first is None:
                first = time.perf_counter()
            if "finish_reason" in item:
                assert item["generated_tokens"] == tokens, item
        ended = time.perf_counter()
        ttft = (first or ended) - started
        results[i] = {"started": started, "ttft": ttft, "ended": ended, "tokens": tokens}

    in_threads(count, one)
    return results


def bandwidth_gbs(name: str) -> float | None:
    for part, value in BANDWIDTH_GBS.items():
        if part in name:
            return float(value)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="a toy size on the CPU: checks the script")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--streams", default="1,2,4,8,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="the GPU's memory bandwidth")
    args = parser.parse_args()

    import torch

    from flask_sse_run import thread_executor
    from flask_sse_run.llm import BatchScheduler

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise SystemExit("no CUDA device: run with --tiny to check the script on the CPU")
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    values = TINY if args.tiny else FALCON_7B
    size = "tiny" if args.tiny else "7B"
    print(f"building a random Falcon ({size}) in {dtype} on {name} ...", file=sys.stderr)
    began = time.perf_counter()
    model = build(values, device, dtype)
    sync()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"built in {time.perf_counter() - began:.1f} s: {weights / 1e9:.2f} GB of weights", file=sys.stderr)
    tokenizer = numbered_tokenizer(values["vocab_size"])
    ids = tokenizer.encode(PROMPT)
    bandwidth = args.bandwidth_gbs or (bandwidth_gbs(name) if cuda else None)
    bound = None if bandwidth is None else bandwidth * 1e9 / weights  # tokens/s of one stream

    with torch.inference_mode():
        bare = bare_generate(model, ids, args.tokens)
    print(f"bare generate(): {bare['tokens_per_s']:.1f} tokens/s", file=sys.stderr)

    executor = thread_executor(1)
    scheduler = BatchScheduler(model, tokenizer, executor=executor, max_batch=64, max_queue=64)
    streams(scheduler, ids, 4, 2)  # warm-up
    rows = []
    for count in [int(c) for c in args.streams.split(",")]:
        aggregates, ttfts, per_stream = [], [], []
        for _ in range(args.repeats):
            results = streams(scheduler, ids, args.tokens, count)
            span = max(r["ended"] for r in results) - min(r["started"] for r in results)
            aggregates.append(sum(r["tokens"] for r in results) / span)
            ttfts += [r["ttft"] * 1000 for r in results]
            per_stream += [r["tokens"] / (r["ended"] - r["started"]) for r in results]
        aggregate = max(aggregates)
        row = {
            "streams": count,
            "aggregate_tokens_per_s": round(aggregate, 1),
            "ttft_p50_ms": round(statistics.median(ttfts), 1),
            "ttft_p99_ms": round(percentile(ttfts, 99), 1),
            "per_stream_tokens_per_s": round(statistics.median(per_stream), 1),
            "of_bandwidth_limit": None if bound is None else round(aggregate / (bound * count), 3),
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    executor.shutdown()
    columns = list(rows[0])
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[column]) for column in columns))
    report = {
        "device": name,
        "dtype": str(dtype).removeprefix("torch."),
        "model": "tiny" if args.tiny else "Falcon-7B configuration, random weights",
        "weight_bytes": weights,
        "bandwidth_gbs": bandwidth,
        "bandwidth_limit_one_stream_tokens_per_s": None if bound is None else round(bound, 1),
        "tokens": args.tokens,
        "bare_generate_tokens_per_s": round(bare["tokens_per_s"], 1),
        "bare_generate_ttft_ms": round(bare["ttft_ms"], 1),
        "sweep": rows,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
