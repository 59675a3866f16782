"""Benchmark pretraining's loss on CPU: the plain cross-entropy over all fp32 logits (what the CPU presets train
with) vs llm_train/gpt.py's chunked_cross_entropy (what CUDA trains with: the logits of a chunk of rows at a time).

Reads:  nothing (a randomly initialised GPT of the cpu preset: 4 layers, 192 wide, 128 tokens, 8,192 tokens padded
        to a multiple of 64, a micro batch of 16 rows).
Writes: bench/results/bench_loss.json

    .venv/bin/python bench/bench_loss.py                  # ~1 min
    .venv/bin/python bench/bench_loss.py --rounds 15 --chunk-elements 262144

A training step (forward + backward + zeroed gradients) under the compute dtype's autocast, the two losses
alternating for --rounds rounds of --steps steps each, medians compared. --chunk-elements: logits per chunk (the
default, 2^26, is one chunk at this size: the cost of the custom autograd alone; smaller ones split it).
"""
import argparse
import statistics
import time
from pathlib import Path

from llm_train import gpt
from llm_train.atomic import atomic_write_json
from llm_train.cli import positive_int
from llm_train.errors import run_main
from llm_train.runtime import autocast, dtype_name

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "bench_loss.json"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=positive_int, default=9)
    parser.add_argument("--steps", type=positive_int, default=5, help="training steps per round and loss")
    parser.add_argument("--batch", type=positive_int, default=16, help="rows of a micro batch (cpu preset: 16)")
    parser.add_argument("--vocab", type=positive_int, default=8192)
    parser.add_argument("--chunk-elements", type=positive_int, default=gpt.LOSS_CHUNK_ELEMENTS)
    args = parser.parse_args()

    import torch

    dtype = dtype_name()
    torch.manual_seed(0)
    model = gpt.GPT(args.vocab, 128, 4, 192, 4, gpt.padded_vocab(args.vocab))
    x = torch.randint(0, args.vocab, (args.batch, 129))
    gpt.LOSS_CHUNK_ELEMENTS = args.chunk_elements

    def step(chunked):
        model.chunked_loss = chunked
        with autocast("cpu", dtype):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    assert abs(step(True) - step(False)) < 1e-2  # the same loss (and warm-up of both)
    times = {"full": [], "chunked": []}
    for _ in range(args.rounds):
        for name in times:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(name == "chunked")
            times[name].append((time.perf_counter() - t0) / args.steps)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    result = {"dtype": dtype, "threads": torch.get_num_threads(), "batch": args.batch, "vocab": args.vocab,
              "chunk_elements": args.chunk_elements, "rounds": args.rounds, "steps": args.steps,
              "median_step_s": medians, "chunked_over_full": medians["chunked"] / medians["full"], "times": times}
    print(f"{dtype}, {torch.get_num_threads()} threads, {args.batch} x 128 tokens, vocab {args.vocab}: full "
          f"{medians['full'] * 1e3:.1f} ms, chunked {medians['chunked'] * 1e3:.1f} ms per step "
          f"({result['chunked_over_full'] - 1:+.1%})")
    RESULTS.parent.mkdir(exist_ok=True)
    atomic_write_json(RESULTS, result)


if __name__ == "__main__":
    run_main(main)
