"""Chat with the SFT model: the pretrained base from output/ plus the LoRA adapter from SFT/sft_output/ (or the
merged model in SFT/sft_output/merged/ with --merged), through the tokenizer's chat template.

Reads:  output/ and SFT/sft_output/ (or SFT/sft_output/merged/). Writes nothing.

    python SFT/inference.py                          # a few default prompts (English, Chinese, arithmetic)
    python SFT/inference.py --prompt "What is AI?"   # one prompt
    python SFT/inference.py --interactive            # multi-turn chat, streamed; empty line or Ctrl-D quits
    python SFT/inference.py --merged                 # use the merged model instead of base + adapter

Replies stream as they are generated and stop at <|im_end|>; each is followed by its tokens/s. An adapter trained on
another base than --model-dir (e.g. output/ was retrained since) is refused with the command that retrains it.
"""
import argparse
import logging
import time
import warnings
from pathlib import Path

from llm_train.arithmetic import arithmetic_tasks
from llm_train.cli import nonnegative_float, positive_float, positive_int
from llm_train.errors import UserError, run_main
from llm_train.lineage import check_lineage
from llm_train.paths import OUTPUT_DIR, SFT_OUTPUT_DIR
from llm_train.runtime import compute_dtype
from llm_train.tokenizer import EOT, IM_END, load_chat_tokenizer

warnings.filterwarnings("ignore", r".*`(is_)?gradient_checkpointing(_enable)?` is deprecated", FutureWarning)  # peft
# bitsandbytes on AVX512-BF16 CPUs: an optional faster kernel package (`kernels`) is not installed; nothing is wrong.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda r: "kernels-community" not in r.getMessage())

DEFAULT_PROMPTS = [
    "What is AI?",
    "你好吗?",
    arithmetic_tasks(1, "heldout", seed=7)[0]["prompt"],
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=OUTPUT_DIR, help="the pretrained base model")
    p.add_argument("--adapter-dir", type=Path, default=SFT_OUTPUT_DIR, help="the LoRA adapter + tokenizer")
    p.add_argument("--merged", action="store_true", help="load ADAPTER_DIR/merged instead of base + adapter")
    p.add_argument("--prompt", action="append", help="a user message (repeatable); default: a few built-in ones")
    p.add_argument("--system", help="an optional system message")
    p.add_argument("--interactive", action="store_true", help="chat turn by turn, keeping the conversation")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=positive_float, default=0.9)
    args = p.parse_args(argv)
    if args.top_p > 1:
        p.error(f"argument --top-p: must be at most 1, got {args.top_p}")
    return args


def load_chat_model(args):
    # The checks come before the slow imports, so a wrong directory fails at once.
    if args.merged:
        path = args.adapter_dir / "merged"
        if not (path / "config.json").is_file():
            raise UserError(f"no merged model in {path}: run python SFT/qlora_fine_tune_trl.py --merge")
    else:
        if not (args.model_dir / "config.json").is_file():
            raise UserError(f"no base model in {args.model_dir}: run the pretraining stage first")
        if not (args.adapter_dir / "adapter_config.json").is_file():
            raise UserError(f"no adapter in {args.adapter_dir}: run python SFT/qlora_fine_tune_trl.py first")
        check_lineage(args.adapter_dir, f"python SFT/qlora_fine_tune_trl.py --model-dir {args.model_dir} "
                                               f"--output-dir {args.adapter_dir}", base=args.model_dir)
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = compute_dtype(allow_fp16=True)
    if args.merged:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        tokenizer = load_chat_tokenizer(path)
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(str(args.model_dir), dtype=dtype)
        model = PeftModel.from_pretrained(base, str(args.adapter_dir))
        tokenizer = load_chat_tokenizer(args.adapter_dir)
    return model.to(device).eval(), tokenizer


def reply(model, tokenizer, messages, args):
    """Stream one assistant reply to stdout; returns (text, tokens generated, seconds)."""
    import torch
    from transformers import TextStreamer

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    # the model sees at most n_positions tokens: keep the conversation's end and leave room for the reply
    context = model.config.n_positions
    max_new_tokens = min(args.max_new_tokens, context // 2)
    ids = {k: v[:, -(context - max_new_tokens):].to(model.device) for k, v in ids.items()}
    stops = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(EOT)]
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.temperature > 0 else \
        dict(do_sample=False)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    t0 = time.time()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id, streamer=streamer, **sampling)
    seconds = time.time() - t0
    new = out[0, ids["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), len(new), seconds


def chat(model, tokenizer, messages, args):
    print("assistant: ", end="", flush=True)
    text, n, seconds = reply(model, tokenizer, messages, args)
    print(f"[{n} tokens, {n / max(seconds, 1e-9):.1f} tokens/s]", flush=True)
    return text


def main(argv=None):
    args = parse_args(argv)
    model, tokenizer = load_chat_model(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.interactive:
        messages = list(system)
        while True:
            try:
                line = input("\nuser: ").strip()
            except EOFError:
                break
            if not line:
                break
            messages.append({"role": "user", "content": line})
            messages.append({"role": "assistant", "content": chat(model, tokenizer, messages, args)})
        return
    for prompt in args.prompt or DEFAULT_PROMPTS:
        print(f"\nuser: {prompt}")
        chat(model, tokenizer, system + [{"role": "user", "content": prompt}], args)


if __name__ == "__main__":
    run_main(main)
