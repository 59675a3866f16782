"""Continue text prompts with the pretrained base model.

Reads:  output/ (the Hugging Face GPT-2 checkpoint written by PreTrain/model.py: config.json, model.safetensors,
        tokenizer files). Writes nothing.

    python PreTrain/inference.py                                     # English, Chinese and code default prompts
    python PreTrain/inference.py --prompt "Once upon a time" --temperature 0.7 --top-k 40 --max-new-tokens 200
    python PreTrain/inference.py --model-dir SFT/sft_output --prompt "..."   # any GPT-2 dir in the same layout

Sampling uses Hugging Face generate() with the KV cache (use_cache=True), so each new token costs one position of
compute, not a pass over the whole text. --dtype auto: bf16 autocast on CUDA and on CPUs with bf16 matmul units
(AMX / AVX512-BF16); fp32 elsewhere, because on an AVX2-only CPU bf16 matmuls are ~12x slower than fp32 (measured).
Prints each continuation and its tokens/s.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from common import UserError  # noqa: E402

DEFAULT_PROMPTS = [
    "The President said that the nation",
    "床前明月光，",
    "def fibonacci(n):\n    ",
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=common.OUTPUT_DIR)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: English, Chinese and code")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy decoding")
    p.add_argument("--top-k", type=int, default=50, help="0 disables top-k")
    p.add_argument("--top-p", type=float, default=0.95, help="1.0 disables nucleus sampling")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16 autocast or fp32; auto: bf16 on CUDA and on CPUs with AMX/AVX512-BF16")
    args = p.parse_args(argv)

    if not (args.model_dir / "config.json").is_file():
        raise UserError(f"no model in {args.model_dir} (config.json missing): run `python PreTrain/model.py` first "
                        "or pass --model-dir")
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = common.load_tokenizer(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(args.model_dir), use_safetensors=True).to(device).eval()
    if args.seed is not None:
        torch.manual_seed(args.seed)
    sample = args.temperature > 0
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=sample, use_cache=True,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if sample:
        gen_kwargs.update(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p)
    else:
        gen_kwargs.update(temperature=None, top_k=None, top_p=None)
    context = model.config.n_positions
    if args.dtype == "auto":
        flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
        args.dtype = "bf16" if device.type == "cuda" or {"amx_bf16", "avx512_bf16"} & set(flags) else "fp32"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    for prompt in args.prompt or DEFAULT_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids[:, -(context - 1):].to(device)
        gen_kwargs["max_new_tokens"] = min(args.max_new_tokens, context - ids.shape[1])
        start = time.perf_counter()
        with torch.no_grad(), autocast:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **gen_kwargs)
        seconds = time.perf_counter() - start
        new = out.shape[1] - ids.shape[1]
        print("=" * 80)
        print(prompt + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=False))
        print(f"--- {new} new tokens in {seconds:.2f}s, {new / seconds:.1f} tokens/s")


if __name__ == "__main__":
    common.run_main(main)
