"""Benchmark sampling: the Engine's draw (llm_train/engine.py InverseCdfDraw: one uniform number per row against the
cumulative probabilities, under greedy decoding) vs generate()'s own do_sample=True (torch.multinomial, whose
exponential draw over the whole vocabulary is slow on CPU), in the Hugging Face GPT-2 that the evaluations, GRPO's
held-out measures, the inference scripts and the web UI sample from.

Reads:  nothing (a randomly initialised GPT-2 of the cpu preset's shape: 4 layers, 192 wide, 8,192 tokens).
Writes: bench/results/bench_sampling.json

    .venv/bin/python bench/bench_sampling.py              # ~1 min
    .venv/bin/python bench/bench_sampling.py --rounds 7 --batch 256

--batch prompts of 40 tokens, 40 new tokens each with the KV cache, temperature 0.7, under the compute dtype's
autocast; the two alternate for --rounds rounds and their medians are compared. Both draw from the same
distribution: tests/test_engine.py checks the frequencies.
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
    parser.add_argument("--batch", type=positive_int, default=128, help="prompts per generate() call (GRPO eval: 64)")
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
    ways = {
        "engine_draw": lambda: engine.generate(prompts, 40, sampling),
        "generate_multinomial": lambda: _multinomial(engine, prompts, sampling.temperature),
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
    result = {"dtype": dtype, "batch": args.batch, "new_tokens": 40, "rounds": args.rounds, "seconds": times,
              "median_seconds": medians, "speedup_of_engine_draw": speedup,
              "torch_threads": torch.get_num_threads()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS, result)
    print(f"sampling {args.batch} x 40 tokens ({dtype}): engine draw {medians['engine_draw']:.3f} s, generate()'s "
          f"multinomial {medians['generate_multinomial']:.3f} s median -> {speedup:.2f}x; wrote {RESULTS}")


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
