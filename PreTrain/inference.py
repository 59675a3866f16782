"""Continue text prompts with the pretrained base model.

Reads:  output/ (the Hugging Face GPT-2 checkpoint written by PreTrain/model.py: config.json, model.safetensors,
        tokenizer files). Writes nothing.

    python PreTrain/inference.py                                     # English, Chinese and code default prompts
    python PreTrain/inference.py --prompt "Once upon a time" --temperature 0.7 --top-k 40 --max-new-tokens 200
    python PreTrain/inference.py --model-dir SFT/sft_output --prompt "..."   # any GPT-2 dir in the same layout

Sampling uses llm_train.engine (Hugging Face generate() with the KV cache), so each new token costs one position of
compute, not a pass over the whole text. The model sees at most its context (config n_positions) tokens: a longer
prompt keeps its end, and when the context is full the window slides, generation going on from the last half
context of tokens, so --max-new-tokens may exceed the context. --dtype (default: $LLM_TRAIN_DTYPE, else auto): bf16
autocast on CUDA and on CPUs with bf16 matmul units (AMX / AVX512-BF16); fp32 elsewhere, because on an AVX2-only CPU
bf16 matmuls are much slower than fp32. Prints each continuation and its tokens/s.
"""
import argparse
import time
from pathlib import Path

from llm_train.cli import nonnegative_float, nonnegative_int, positive_float, positive_int
from llm_train.engine import GREEDY, Engine, Sampling
from llm_train.errors import UserError, run_main
from llm_train.paths import OUTPUT_DIR
from llm_train.runtime import DTYPE_ENV, DTYPES, dtype_name
from llm_train.tokenizer import load_tokenizer

DEFAULT_PROMPTS = [
    "The President said that the nation",
    "床前明月光，",
    "def fibonacci(n):\n    ",
]


def generate(model, ids, max_new_tokens, eos_token_id, sampling=GREEDY, pad_token_id=None, do_sample=None):
    """(new token ids (1, N), number of window slides): ids (1, T) continued by max_new_tokens tokens, fewer if
    eos comes first; Engine.generate_sliding (past the context, the window slides to its last half). do_sample=False
    is accepted for the callers of the former generate(**generate_kwargs)."""
    engine = Engine(model, None, stops=[eos_token_id])
    engine.pad_token_id = pad_token_id if pad_token_id is not None else engine.pad_token_id
    return engine.generate_sliding(ids, max_new_tokens, GREEDY if do_sample is False else sampling)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=OUTPUT_DIR)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: English, Chinese and code")
    p.add_argument("--max-new-tokens", type=positive_int, default=100)
    p.add_argument("--temperature", type=nonnegative_float, default=0.8, help="0 means greedy decoding")
    p.add_argument("--top-k", type=nonnegative_int, default=50, help="0 disables top-k")
    p.add_argument("--top-p", type=positive_float, default=0.95, help="1.0 disables nucleus sampling")
    p.add_argument("--seed", type=nonnegative_int, default=None)
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help=f"bf16 autocast or fp32 (default: ${DTYPE_ENV}, else auto: bf16 on CUDA and on CPUs "
                        "with AMX/AVX512-BF16)")
    args = p.parse_args(argv)
    if args.top_p > 1:
        p.error(f"argument --top-p: must be at most 1, got {args.top_p}")

    if not (args.model_dir / "config.json").is_file():
        raise UserError(f"no model in {args.model_dir} (config.json missing): run `python PreTrain/model.py` first "
                        "or pass --model-dir")
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(args.model_dir), use_safetensors=True).to(device).eval()
    if model.config.n_positions < 2:
        raise UserError(f"{args.model_dir}: a context of {model.config.n_positions} position leaves no room to "
                        "generate")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    # a plain text ends with its document: <|endoftext|> (the tokenizer's eos) is the only stop
    engine = Engine(model, tokenizer, dtype=dtype_name(args.dtype), stops=[tokenizer.eos_token_id])
    context = model.config.n_positions
    for prompt in args.prompt or DEFAULT_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        start = time.perf_counter()
        new, slides = engine.generate_sliding(ids, args.max_new_tokens, sampling)
        seconds = time.perf_counter() - start
        print("=" * 80)
        print(prompt + tokenizer.decode(new[0], skip_special_tokens=False))
        slid = f"; the {context}-token context was full {slides} times, each time continued from its last " \
               f"{max(1, context // 2)} tokens" if slides else ""
        print(f"--- {new.shape[1]} new tokens in {seconds:.2f}s, {new.shape[1] / seconds:.1f} tokens/s{slid}")


if __name__ == "__main__":
    run_main(main)
