"""Adding tokens: growop's in-place resize against transformers' resize_token_embeddings.

    python benchmarks/bench_vocab.py                            # V = 32000 and 128000, d = 4096
    python benchmarks/bench_vocab.py --quick                    # V = 8000, d = 512: ~20 s
    python benchmarks/bench_vocab.py --vocab 32000 --dim 1024   # another case

A default run takes about 10 minutes on 2 cores of an AMD EPYC VM and holds about 6 GB at
its peak (transformers' mean resizing at V = 128000 takes a minute or more a call); run
``--quick`` first. Needs
``pip install "growop[hf]"``.

For each vocabulary size V (one after the other; each case's models are freed before the
next), a tied Llama with no transformer layers (just the embedding, the final norm and
the tied head: the resize touches nothing else) gets ``--add`` new tokens, in float32 on
the CPU:

- ``hf_mean``: ``model.resize_token_embeddings(V + k)`` of transformers (default
  ``mean_resizing=True``: new rows sampled around the old rows' mean and covariance);
- ``hf_plain``: the same with ``mean_resizing=False``;
- ``growop_mean`` / ``growop_plain``: the model made growable once
  (``growop.transformers.make_growable``, default capacity: 25% headroom), then the same
  call, in place.

Bytes are measured, not assumed: every allocation torch makes during one call, summed,
and the peak of allocations minus frees (growop.measure.measure_allocations, torch's CPU
memory profiler), on a first call that is not timed. Then each provider is timed
``--repeats`` times (median, p20, p80; a growop sample is the fastest of 5 calls). HF's
model is put back to V tokens between calls (its old weight restored); growop's keeps
growing within its capacity. The HF and growop phases run one after the other (the HF call
takes seconds, growop's milliseconds), so ``x faster`` is the ratio of the medians, between
the least and most favourable pairing of their p20 and p80 (the ``range`` column); it is
flagged ``?`` or withheld (``noisy``) when that range is wide (see growop.measure). Rows go
to benchmarks/out/bench_vocab.csv (ignored by git) unless ``--csv`` names another file.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable

import torch

from growop.measure import (
    Timing,
    apply_harness_options,
    benchmark_parser,
    csv_row,
    format_ratio,
    measure_allocations,
    ratio,
    stamp,
    time_call,
    write_csv,
)

BENCH = "bench_vocab"
REPEATS = 3
# growop's resize takes milliseconds, which a busy machine's interruptions would swamp: each
# of its samples is the fastest of a few calls (HF's take seconds: one call each).
GROWOP_BEST_OF = 5
QUICK = {"vocab": [8000], "dim": 512, "repeats": 5}


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise SystemExit('bench_vocab.py needs transformers: pip install "growop[hf]"') from None
    transformers.logging.set_verbosity_error()
    return transformers


def build(vocab: int, dim: int):
    from transformers import LlamaConfig, LlamaForCausalLM

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


def measure(call: Callable[[], object], after: Callable[[], None], repeats: int, best_of: int = 1) -> dict:
    """``call``'s allocations on a first, untimed call, then ``repeats`` samples, each the
    fastest of ``best_of`` calls; ``after`` runs after each call, untimed."""
    used = measure_allocations(call)
    after()
    samples = []
    for _ in range(repeats):
        best = float("inf")
        for _ in range(best_of):
            best = min(best, time_call(call)[1])
            after()
        samples.append(best)
    return {"timing": Timing(tuple(samples)), "allocated": used.allocated, "peak": used.peak}


def bench_hf(vocab: int, dim: int, add: int, repeats: int) -> dict[str, dict]:
    model = build(vocab, dim)
    embedding = model.get_input_embeddings()
    original = embedding.weight.data

    def restore() -> None:
        assert model.lm_head.weight is embedding.weight and embedding.weight.shape[0] == vocab + add
        embedding.weight.data = original
        embedding.num_embeddings = vocab
        model.lm_head.out_features = vocab
        model.config.vocab_size = model.vocab_size = vocab
        gc.collect()

    out = {}
    for name, mean in (("hf_mean", True), ("hf_plain", False)):
        out[name] = measure(lambda: model.resize_token_embeddings(vocab + add, mean_resizing=mean), restore, repeats)
    del model, embedding, original
    gc.collect()
    return out


def bench_growop(vocab: int, dim: int, add: int, repeats: int) -> dict[str, dict]:
    from growop.transformers import make_growable

    model = make_growable(build(vocab, dim))
    embedding = model.get_input_embeddings()
    param, pointer = embedding.weight, embedding.weight.data_ptr()
    out = {}
    for name, mean in (("growop_mean", True), ("growop_plain", False)):
        out[name] = measure(
            lambda: model.resize_token_embeddings(embedding.num_embeddings + add, mean_resizing=mean),
            lambda: None,
            repeats,
            best_of=GROWOP_BEST_OF,
        )
    assert embedding.weight is param and embedding.weight.data_ptr() == pointer  # in place
    assert model.lm_head.weight is param and model.config.vocab_size == embedding.num_embeddings
    del model, embedding, param
    gc.collect()
    return out


def mib(n: int) -> str:
    return f"{n / 2**20:.3f}"


def parse_args(argv) -> argparse.Namespace:
    parser = benchmark_parser(__file__, __doc__, repeats=REPEATS,
                              quick=f"V = {QUICK['vocab'][0]}, d = {QUICK['dim']}, {QUICK['repeats']} repeats (~20 s)")
    parser.add_argument("--vocab", type=int, nargs="+", default=None, help="V (default: 32000 128000)")
    parser.add_argument("--dim", type=int, default=None, help="d (default 4096)")
    parser.add_argument("--add", type=int, default=8, help="tokens added per call (default 8)")
    args = parser.parse_args(argv)
    args.vocab = args.vocab or (QUICK["vocab"] if args.quick else [32000, 128000])
    args.dim = args.dim or (QUICK["dim"] if args.quick else 4096)
    args.repeats = args.repeats or (QUICK["repeats"] if args.quick else REPEATS)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    transformers = require_transformers()
    csv_path = apply_harness_options(args)
    torch.manual_seed(0)
    run_stamp = stamp("cpu")
    print(f"# {run_stamp}; transformers {transformers.__version__}")
    header = (f"{'V':>7} {'provider':13} {'median ms':>11} {'p20':>10} {'p80':>10} {'alloc MiB':>11} "
              f"{'peak MiB':>10} {'x faster':>9} {'range':>15}")
    print(header)
    rows = []
    for vocab in args.vocab:
        matrix = vocab * args.dim * 4
        results = bench_hf(vocab, args.dim, args.add, args.repeats)
        results.update(bench_growop(vocab, args.dim, args.add, args.repeats))
        case = f"V={vocab} d={args.dim} +{args.add} tokens, transformers {transformers.__version__}"
        for name, r in results.items():
            timing = r["timing"]
            line = (f"{vocab:>7} {name:13} {timing.median_ms:>11.3f} {timing.p20_ms:>10.3f} "
                    f"{timing.p80_ms:>10.3f} {mib(r['allocated']):>11} {mib(r['peak']):>10}")
            rows += [csv_row(BENCH, case, name, "resize_time", "ms", timing),
                     csv_row(BENCH, case, name, "allocated", "bytes", r["allocated"]),
                     csv_row(BENCH, case, name, "peak", "bytes", r["peak"])]
            if name.startswith("growop"):
                baseline = results["hf_mean" if name.endswith("mean") else "hf_plain"]["timing"]
                speedup = ratio(baseline, timing, paired=False)
                line += f" {format_ratio(speedup, 9, digits=0)} {f'{speedup.p20:.0f}..{speedup.p80:.0f}':>15}"
                rows.append(csv_row(BENCH, case, name, "speedup_vs_hf", "x", speedup))
            print(line)
        print(f"{'':>7} (one {vocab} x {args.dim} float32 matrix = {mib(matrix)} MiB)")
    write_csv(csv_path, rows, run_stamp)
    print(f"\nrows appended to {csv_path}")


if __name__ == "__main__":
    main()
