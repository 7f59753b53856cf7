"""Vocabulary growth mid-training: growop in place against Hugging Face's resize.

Run ``python -m growop.demo --task vocab`` (``--help`` for the options). A tiny Llama
built from a config (nothing downloaded) learns local text (``data/vocab_corpus.txt`` here)
with a byte-level BPE tokenizer trained here with ``tokenizers``. Midway, twelve words of a
new topic become tokens (``tokenizer.add_tokens``) and training goes on over text that uses
them. Three ways to add the tokens start from the same weights and see the same batches:

- ``growop``: the model made growable (:func:`growop.transformers.make_growable`) before
  training, one AdamW for the whole run, ``model.resize_token_embeddings(n, optimizer=opt)``
  in place (new rows: the mean of the old ones, their own Adam step counts);
- ``hf_new_optimizer``: transformers' ``resize_token_embeddings(n)`` (mean resizing), then a
  new AdamW: all of Adam's state is lost;
- ``hf_old_optimizer``: the same resize, keeping the optimizer: its next ``step()`` fails
  (state sized for the old vocabulary); the error is reported, not raised.

For each: the time and bytes allocated by the grow (:func:`growop.measure.measure_allocations`,
torch's CPU memory profiler), and the loss on held-out text that uses the new tokens over the steps after the grow. Writes
``results.json`` and ``vocab_loss.png`` to ``--out``. Needs ``pip install "growop[hf,demo]"``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from growop.demo.common import (
    add_common_options,
    describe_run,
    new_figure,
    one_thread,
    require,
    save_figure,
    write_results,
)
from growop.measure import format_bytes, measure_allocations

METHODS = ("growop", "hf_new_optimizer", "hf_old_optimizer")
NEW_WORDS = (
    "exoplanet", "spectrograph", "magnetosphere", "heliosphere", "protostar", "chromosphere",
    "photometry", "supernova", "interferometer", "nebula", "quasar", "telescope",
)  # fmt: skip
CORPUS = Path(__file__).with_name("data") / "vocab_corpus.txt"
BPE_VOCAB = 300
SEQUENCE = 48
BATCH_SIZE = 16
LEARNING_RATE = 3e-3
STEPS_BEFORE, STEPS_AFTER, EVAL_EVERY = 150, 150, 10
QUICK_STEPS_BEFORE, QUICK_STEPS_AFTER, QUICK_EVAL_EVERY = 6, 6, 3
EVAL_FRACTION = 0.2  # of the new topic's lines, held out
DEFAULT_OUT = "growop-demo-vocab"
EXTRAS = "demo,hf"


# ---------------------------------------------------------------------------- data


def read_corpus() -> tuple[list[str], list[str], list[str]]:
    """(base lines, new-topic training lines, new-topic held-out lines)."""
    sections: dict[str, list[str]] = {}
    name = None
    for line in CORPUS.read_text().splitlines():
        if line.startswith("# "):
            name = line[2:].strip()
            sections[name] = []
        elif line.strip() and name is not None:
            sections[name].append(line.strip())
    new = sections["new"]
    held_out = max(1, int(len(new) * EVAL_FRACTION))
    return sections["base"], new[:-held_out], new[-held_out:]


def train_tokenizer(lines: list[str]):
    """A byte-level BPE tokenizer trained offline on ``lines``, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def token_stream(tokenizer, lines: list[str]) -> torch.Tensor:
    """Every line's ids followed by ``<eos>``, as one long tensor."""
    ids: list[int] = []
    for encoded in tokenizer(lines).input_ids:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def sample_batch(streams: Sequence[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """``BATCH_SIZE`` windows of ``SEQUENCE`` tokens, split evenly over ``streams``."""
    rows = []
    for i in range(BATCH_SIZE):
        stream = streams[i % len(streams)]
        start = int(torch.randint(len(stream) - SEQUENCE, (), generator=generator))
        rows.append(stream[start : start + SEQUENCE])
    return torch.stack(rows)


def windows(stream: torch.Tensor) -> torch.Tensor:
    """``stream`` cut into consecutive ``SEQUENCE``-token rows (for evaluation)."""
    count = len(stream) // SEQUENCE
    return stream[: count * SEQUENCE].view(count, SEQUENCE)


def build_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQUENCE,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


# ---------------------------------------------------------------------------- training


@torch.no_grad()
def mean_loss(model, rows: torch.Tensor) -> float:
    model.eval()
    loss = model(input_ids=rows, labels=rows).loss.item()
    model.train()
    return loss


# ---------------------------------------------------------------------------- one method


def run_method(
    method: str,
    initial_model,
    tokenizer,
    data: dict[str, Any],
    steps_before: int,
    steps_after: int,
    eval_every: int,
    seed: int,
) -> dict[str, Any]:
    from growop.transformers import make_growable

    tokenizer = copy.deepcopy(tokenizer)
    model = copy.deepcopy(initial_model)
    if method == "growop":
        make_growable(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(seed)
    result: dict[str, Any] = {"error": None, "eval_steps": [], "new_text_loss": [], "base_text_loss": []}

    def step(streams) -> None:
        x = sample_batch(streams, generator)
        opt.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()

    for _ in range(steps_before):
        step([data["base_before"]])

    tokenizer.add_tokens(list(NEW_WORDS))
    vocab = len(tokenizer)

    def grow() -> None:
        nonlocal opt
        if method == "growop":
            model.resize_token_embeddings(vocab, optimizer=opt)
        else:
            model.resize_token_embeddings(vocab)
            if method == "hf_new_optimizer":
                opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)

    seconds, allocated, peak = measure_allocations(grow)
    result.update(grow_seconds=seconds, grow_bytes_allocated=allocated, grow_peak_bytes=peak)
    result["vocab_after"] = model.config.vocab_size

    base = token_stream(tokenizer, data["base_lines"])
    new = token_stream(tokenizer, data["new_train"])
    eval_new = windows(token_stream(tokenizer, data["new_eval"]))
    eval_base = windows(base)[:8]

    def evaluate(at: int) -> None:
        result["eval_steps"].append(at)
        result["new_text_loss"].append(mean_loss(model, eval_new))
        result["base_text_loss"].append(mean_loss(model, eval_base))

    evaluate(0)
    for t in range(1, steps_after + 1):
        try:
            step([base, new])
        except RuntimeError as error:  # the HF resize that keeps its optimizer
            result["error"] = f"{type(error).__name__} at optimizer.step() after the grow: {error}"
            break
        if t % eval_every == 0 or t == steps_after:
            evaluate(t)
    result["final_new_text_loss"] = result["new_text_loss"][-1] if result["error"] is None else None
    return result


# ---------------------------------------------------------------------------- report


def format_table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"{'method':18} {'grow time':>11} {'allocated':>11} {'peak':>11} "
        f"{'new-text loss: at grow':>23} {'final':>7}",
        "-" * 87,
    ]
    for method, r in results.items():
        final = "failed" if r["error"] else f"{r['final_new_text_loss']:.3f}"
        lines.append(
            f"{method:18} {1e3 * r['grow_seconds']:>8.3f} ms {format_bytes(r['grow_bytes_allocated']):>11} "
            f"{format_bytes(r['grow_peak_bytes']):>11} {r['new_text_loss'][0]:>23.3f} {final:>7}"
        )
    for method, r in results.items():
        if r["error"]:
            lines.append(f"\n{method}: {r['error']}")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], path: Path, note: str) -> None:
    styles = {
        "growop": dict(marker="o", linestyle="-", color="tab:blue"),
        "hf_new_optimizer": dict(marker="^", linestyle="-.", color="tab:green"),
        "hf_old_optimizer": dict(marker="s", linestyle="--", color="tab:red"),
    }
    fig, ax = new_figure(EXTRAS)
    for method, r in results.items():
        label = method if r["error"] is None else f"{method} (optimizer.step() failed)"
        ax.plot(r["eval_steps"], r["new_text_loss"], label=label, linewidth=2, **styles.get(method, {}))
    ax.set_xlabel("training steps after adding the tokens")
    ax.set_ylabel("loss on held-out text using the new tokens")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"Adding {len(NEW_WORDS)} tokens to a tiny Llama mid-training\n{note}", fontsize=10)
    ax.legend()
    save_figure(fig, path)


# ---------------------------------------------------------------------------- entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m growop.demo --task vocab",
        description="Adding tokens to a tiny Llama mid-training: growop in place vs transformers' resize.",
    )
    add_common_options(
        parser,
        default_out=DEFAULT_OUT,
        quick=f"{QUICK_STEPS_BEFORE}+{QUICK_STEPS_AFTER} steps instead of {STEPS_BEFORE}+{STEPS_AFTER}",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the vocabulary task; returns what it writes to ``results.json``."""
    args = parse_args(argv)
    require("matplotlib", "matplotlib", EXTRAS)
    require("tokenizers", "tokenizers", EXTRAS)
    transformers = require("transformers", "transformers", EXTRAS)
    transformers.logging.set_verbosity_error()

    steps_before = QUICK_STEPS_BEFORE if args.quick else STEPS_BEFORE
    steps_after = QUICK_STEPS_AFTER if args.quick else STEPS_AFTER
    eval_every = QUICK_EVAL_EVERY if args.quick else EVAL_EVERY

    base_lines, new_train, new_eval = read_corpus()
    tokenizer = train_tokenizer(base_lines)
    data = {
        "base_lines": base_lines,
        "new_train": new_train,
        "new_eval": new_eval,
        "base_before": token_stream(tokenizer, base_lines),
    }
    torch.manual_seed(args.seed)
    initial_model = build_model(len(tokenizer))

    results: dict[str, dict[str, Any]] = {}
    with one_thread():
        for method in METHODS:
            print(f"{method} ...", file=sys.stderr, flush=True)
            results[method] = run_method(
                method, initial_model, tokenizer, data, steps_before, steps_after, eval_every, args.seed
            )

    print()
    print(format_table(results))
    config = {
        "task": "vocab",
        "seed": args.seed,
        "quick": args.quick,
        "steps_before": steps_before,
        "steps_after": steps_after,
        "batch": f"{BATCH_SIZE} x {SEQUENCE} tokens",
        "optimizer": f"AdamW(lr={LEARNING_RATE})",
        "model": "Llama, 2 layers, hidden 64, tied embeddings",
        "vocab_before": len(tokenizer),
        "new_tokens": list(NEW_WORDS),
        "transformers": transformers.__version__,
        **describe_run(torch.device("cpu")),
    }
    output: dict[str, Any] = dict(results)
    output["config"] = config
    write_results(args.out, output)
    note = f"{steps_before} steps before, {steps_after} after; batch {BATCH_SIZE}x{SEQUENCE}; seed {args.seed}"
    plot(results, args.out / "vocab_loss.png", note)
    print(f"\nWrote {args.out / 'results.json'} and {args.out / 'vocab_loss.png'}")
    return output
