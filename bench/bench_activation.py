"""Benchmark the exported model's MLP activation: "gelu_pytorch_tanh" (one fused kernel, what PreTrain/model.py
trains with and exports) vs GPT-2's "gelu_new" (the same tanh formula in ~8 separate ops, what it exported before),
in the Hugging Face GPT-2 that SFT, the reward model, GRPO and the evaluation run.

Reads:  nothing (a randomly initialised GPT-2 of the cpu preset's shape: 4 layers, 192 wide, 8,192 tokens).
Writes: bench/results/bench_activation.json

    .venv/bin/python bench/bench_activation.py              # ~1 min
    .venv/bin/python bench/bench_activation.py --rounds 7 --batch 32

Two measurements under the compute dtype's autocast, the two activations alternating for --rounds rounds, medians
compared: a training step (forward + backward of --batch rows of 128 tokens, as SFT and the reward model run) and
sampling (128 prompts, 40 new tokens with the KV cache, as GRPO's groups and the evaluations). Both models hold the
same weights; their logits agree to ~1e-5 in fp32 (checked here).
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

RESULTS = REPO / "bench" / "results" / "bench_activation.json"
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--batch", type=positive_int, default=16, help="rows of the training step (cpu SFT: 16)")
    args = parser.parse_args()

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    dtype = dtype_name()
    torch.manual_seed(0)
    models = {}
    for act in ACTIVATIONS:
        config = GPT2Config(vocab_size=8192, n_positions=128, n_embd=192, n_layer=4, n_head=4, activation_function=act,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                            pad_token_id=1)
        models[act] = GPT2LMHeadModel(config)
    models["gelu_new"].load_state_dict(models["gelu_pytorch_tanh"].state_dict())
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(2, 8192, (args.batch, 128), generator=gen)
    prompts = torch.randint(2, 8192, (128, 40), generator=gen)
    with torch.no_grad():
        fp32_diff = (models["gelu_new"](rows[:2]).logits - models["gelu_pytorch_tanh"](rows[:2]).logits).abs().max()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")

    def train_step(model):
        t0 = time.perf_counter()
        with autocast:
            loss = model(rows, labels=rows).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def sampling(model):
        t0 = time.perf_counter()
        with torch.no_grad(), autocast:
            model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=40, min_new_tokens=40,
                           do_sample=True, top_k=0, pad_token_id=1)
        return time.perf_counter() - t0

    for model in models.values():  # warm-up
        train_step(model), sampling(model)
    times = {what: {act: [] for act in ACTIVATIONS} for what in ("train_step", "sampling")}
    for r in range(args.rounds):
        for act, model in models.items():
            times["train_step"][act].append(train_step(model))
            times["sampling"][act].append(sampling(model))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{what} {act} {v[act][-1]:.3f} s" for what, v in times.items() for act in ACTIVATIONS))
    medians = {what: {act: statistics.median(v[act]) for act in ACTIVATIONS} for what, v in times.items()}
    speedups = {what: m["gelu_new"] / m["gelu_pytorch_tanh"] for what, m in medians.items()}
    result = {"dtype": dtype, "batch": args.batch, "rounds": args.rounds, "seconds": times, "median_seconds": medians,
              "speedup_of_gelu_pytorch_tanh": speedups, "max_logit_diff_fp32": fp32_diff.item(),
              "torch_threads": torch.get_num_threads()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS, result)
    for what, m in medians.items():
        print(f"{what} ({dtype}): gelu_pytorch_tanh {m['gelu_pytorch_tanh']:.3f} s, gelu_new {m['gelu_new']:.3f} s "
              f"median -> {speedups[what]:.2f}x")
    print(f"logits of the two apart by at most {fp32_diff.item():.1e} (fp32); wrote {RESULTS}")


if __name__ == "__main__":
    run_main(main)
