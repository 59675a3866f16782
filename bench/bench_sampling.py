"""Benchmark sampling in the Hugging Face GPT-2 that the evaluations, GRPO, the inference scripts and the web UI
sample from, two comparisons:
- the draw: the Engine's (llm_train/engine.py InverseCdfDraw: one uniform number per row against the cumulative
  probabilities, under greedy decoding) vs generate()'s own do_sample=True (torch.multinomial, whose exponential
  draw over the whole vocabulary is slow on CPU); 40 new tokens, no stop token;
- the batch: the Engine's decode_batch (its own KV-cache loop, which drops the rows that have stopped) vs one
  generate() call (which computes every row until the longest reply ends); 64 new tokens at most, with 200 of the
  8,192 tokens as stop tokens, so the rows stop at random steps (a mean of ~35 tokens, ~1 in 5 runs to 64: about
  the spread of the arithmetic evaluations' replies).

Reads:  nothing (a randomly initialised GPT-2 of the cpu preset's shape: 4 layers, 192 wide, 8,192 tokens).
Writes: bench/results/bench_sampling.json

    .venv/bin/python bench/bench_sampling.py              # ~1 min
    .venv/bin/python bench/bench_sampling.py --rounds 7 --batch 256

--batch prompts of 40 tokens, with the KV cache, temperature 0.7, under the compute dtype's autocast; the ways
alternate for --rounds rounds and their medians are compared. Both draws give the same distribution
(tests/test_engine.py checks the frequencies), both batches the same replies when greedy (tests/test_engine.py).
"""
import argparse
import statistics
import time
from pathlib import Path

from llm_train.atomic import atomic_write_json
from llm_train.cli import positive_int
from llm_train.errors import run_main
from llm_train.runtime import dtype_name

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "bench_sampling.json"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--batch", type=positive_int, default=128, help="prompts per batch (the evaluations: 256)")
    args = parser.parse_args()

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from llm_train.engine import Engine, Sampling

    dtype = dtype_name()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=8192, n_positions=128, n_embd=192, n_layer=4, n_head=4,
                        activation_function="gelu_pytorch_tanh", bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model = GPT2LMHeadModel(config).eval()
    engine = Engine(model, None, dtype, stops=[])  # no stop token: every row generates all 40 tokens
    prompts = torch.randint(2, 8192, (args.batch, 40), generator=torch.Generator().manual_seed(0))
    sampling = Sampling(temperature=0.7)
    stop_ids = torch.randperm(8192, generator=torch.Generator().manual_seed(1))[:200].tolist()
    stopping = Engine(model, None, dtype, stops=stop_ids)
    mask = torch.ones_like(prompts)
    ways = {
        "engine_draw": lambda: engine.generate(prompts, 40, sampling),
        "generate_multinomial": lambda: _multinomial(engine, prompts, sampling.temperature),
        "generate_one_call": lambda: stopping.generate(prompts, 64, sampling),
        "engine_decode_batch": lambda: stopping.decode_batch(prompts, mask, 64, sampling),
    }

    def timed(way):
        t0 = time.perf_counter()
        ways[way]()
        return time.perf_counter() - t0

    for way in ways:  # warm-up
        timed(way)
    times = {way: [] for way in ways}
    for r in range(args.rounds):
        for way in ways:
            times[way].append(timed(way))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{w} {v[-1]:.3f} s" for w, v in times.items()), flush=True)
    medians = {way: statistics.median(v) for way, v in times.items()}
    speedup = medians["generate_multinomial"] / medians["engine_draw"]
    batch_speedup = medians["generate_one_call"] / medians["engine_decode_batch"]
    result = {"dtype": dtype, "batch": args.batch, "new_tokens": {"draw": 40, "batch": 64}, "rounds": args.rounds,
              "seconds": times, "median_seconds": medians, "speedup_of_engine_draw": speedup,
              "speedup_of_engine_decode_batch": batch_speedup, "torch_threads": torch.get_num_threads()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS, result)
    print(f"sampling {args.batch} x 40 tokens ({dtype}): engine draw {medians['engine_draw']:.3f} s, generate()'s "
          f"multinomial {medians['generate_multinomial']:.3f} s median -> {speedup:.2f}x")
    print(f"a batch of {args.batch} rows stopping at random steps, 64 tokens at most: engine decode_batch "
          f"{medians['engine_decode_batch']:.3f} s, one generate() call {medians['generate_one_call']:.3f} s median "
          f"-> {batch_speedup:.2f}x; wrote {RESULTS}")


def _multinomial(engine, prompts, temperature):
    """generate()'s own sampling, with the Engine's other settings (no top-k, no top-p)."""
    import torch

    from llm_train.runtime import autocast

    with torch.no_grad(), autocast(engine.device, engine.dtype):
        out = engine.model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=40,
                                    do_sample=True, temperature=temperature, top_k=None, top_p=1.0,
                                    eos_token_id=[], pad_token_id=1)
    return out[:, prompts.shape[1]:]


if __name__ == "__main__":
    run_main(main)
