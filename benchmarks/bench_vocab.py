"""Adding tokens: growop's in-place resize against transformers' resize_token_embeddings.

    python benchmarks/bench_vocab.py                          # V = 32000 and 128000, d = 4096
    python benchmarks/bench_vocab.py --vocab 32000 --dim 1024 # a smaller case

For each vocabulary size V (one after the other; each case's models are freed before the
next, the largest needs about 6 GiB at its peak), a tied Llama with no transformer layers
(just the embedding, the final norm and the tied head: the resize touches nothing else)
gets ``--add`` new tokens, in float32 on the CPU:

- ``hf_mean``: ``model.resize_token_embeddings(V + k)`` of transformers (default
  ``mean_resizing=True``: new rows sampled around the old rows' mean and covariance);
- ``hf_plain``: the same with ``mean_resizing=False``;
- ``growop_mean`` / ``growop_plain``: the model made growable once
  (``growop.transformers.make_growable``, default capacity: 25% headroom), then the same
  call, in place.

Each is timed ``--repeats`` times (median, p20, p80). HF's model is put back to V tokens
between repeats (its old weight restored); growop's keeps growing within its capacity.
Bytes are measured, not assumed: every allocation torch makes during one call, summed,
and the peak of allocations minus frees, from torch's CPU memory profiler (one extra call
per provider, not timed). The two providers' phases run back to back in one process (the
HF call takes seconds, growop's milliseconds: drift cannot move the ratio). Appends rows to
``benchmarks/bench_vocab.csv`` with the machine, torch and transformers versions and date.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from bench_linear import machine  # noqa: E402  (this folder is on sys.path)
from growop.demo_vocab import measure_allocations  # noqa: E402
from growop.transformers import make_growable  # noqa: E402

transformers.logging.set_verbosity_error()


def build(vocab: int, dim: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=dim,
        num_hidden_layers=0,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    )
    with torch.no_grad():
        return LlamaForCausalLM(config)


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"median_ms": statistics.median(ordered) * 1e3, "p20_ms": pick(0.2) * 1e3, "p80_ms": pick(0.8) * 1e3}


def bench_hf(vocab: int, dim: int, add: int, repeats: int) -> dict[str, dict]:
    model = build(vocab, dim)
    embedding = model.get_input_embeddings()
    original = embedding.weight.data

    def restore() -> None:
        embedding.weight.data = original
        embedding.num_embeddings = vocab
        model.lm_head.out_features = vocab
        model.config.vocab_size = model.vocab_size = vocab
        gc.collect()

    out = {}
    for name, mean in (("hf_mean", True), ("hf_plain", False)):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.resize_token_embeddings(vocab + add, mean_resizing=mean)
            times.append(time.perf_counter() - start)
            assert model.lm_head.weight is embedding.weight and embedding.weight.shape[0] == vocab + add
            restore()
        _, allocated, peak = measure_allocations(lambda: model.resize_token_embeddings(vocab + add, mean_resizing=mean))
        restore()
        out[name] = {**summary(times), "allocated": allocated, "peak": peak}
    del model, embedding, original
    gc.collect()
    return out


def bench_growop(vocab: int, dim: int, add: int, repeats: int) -> dict[str, dict]:
    model = make_growable(build(vocab, dim))
    embedding = model.get_input_embeddings()
    param, pointer = embedding.weight, embedding.weight.data_ptr()
    out = {}
    for name, mean in (("growop_mean", True), ("growop_plain", False)):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.resize_token_embeddings(embedding.num_embeddings + add, mean_resizing=mean)
            times.append(time.perf_counter() - start)
        _, allocated, peak = measure_allocations(
            lambda: model.resize_token_embeddings(embedding.num_embeddings + add, mean_resizing=mean)
        )
        out[name] = {**summary(times), "allocated": allocated, "peak": peak}
    assert embedding.weight is param and embedding.weight.data_ptr() == pointer  # in place
    assert model.lm_head.weight is param and model.config.vocab_size == embedding.num_embeddings
    del model, embedding, param
    gc.collect()
    return out


def mib(n: int) -> str:
    return f"{n / 2**20:.3f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--add", type=int, default=8, help="tokens added per call (default 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--csv", default="benchmarks/bench_vocab.csv")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    stamp = [machine(), torch.__version__, transformers.__version__, datetime.date.today().isoformat()]
    print(f"# {stamp[0]}; torch {stamp[1]}; transformers {stamp[2]}; {stamp[3]}")
    header = f"{'V':>7} {'provider':13} {'median ms':>11} {'p20':>10} {'p80':>10} {'alloc MiB':>11} {'peak MiB':>10} {'x faster':>9}"
    print(header)
    rows = []
    for vocab in args.vocab:
        matrix = vocab * args.dim * 4
        results = bench_hf(vocab, args.dim, args.add, args.repeats)
        results.update(bench_growop(vocab, args.dim, args.add, args.repeats))
        for name, r in results.items():
            baseline = results["hf_mean" if name.endswith("mean") else "hf_plain"]["median_ms"]
            speedup = baseline / r["median_ms"]
            print(
                f"{vocab:>7} {name:13} {r['median_ms']:>11.3f} {r['p20_ms']:>10.3f} {r['p80_ms']:>10.3f} "
                f"{mib(r['allocated']):>11} {mib(r['peak']):>10} {speedup:>9.0f}"
            )
            rows.append([vocab, args.dim, args.add, name, f"{r['median_ms']:.4f}", f"{r['p20_ms']:.4f}",
                         f"{r['p80_ms']:.4f}", r["allocated"], r["peak"], matrix, f"{speedup:.1f}", *stamp])
        print(f"{'':>7} (one {vocab} x {args.dim} float32 matrix = {mib(matrix)} MiB)")
    if args.csv:
        path = Path(args.csv)
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["vocab", "dim", "added", "provider", "median_ms", "p20_ms", "p80_ms",
                                 "allocated_bytes", "peak_bytes", "matrix_bytes", "speedup_vs_hf",
                                 "machine", "torch", "transformers", "date"])
            writer.writerows(rows)
        print(f"\nrows appended to {args.csv}")


if __name__ == "__main__":
    main()
