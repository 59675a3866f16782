"""Chat with the SFT model: the pretrained base from output/ plus the LoRA adapter from SFT/sft_output/ (or the
merged model in SFT/sft_output/merged/ with --merged), through the tokenizer's chat template.

Reads:  output/ and SFT/sft_output/ (or SFT/sft_output/merged/). Writes nothing.

    python SFT/inference.py                          # default prompts: two chats, the arithmetic examples
    python SFT/inference.py --prompt "What is AI?"   # one prompt
    python SFT/inference.py --interactive            # multi-turn chat, streamed; empty line or Ctrl-D quits
    python SFT/inference.py --merged                 # use the merged model instead of base + adapter

Replies stream as they are generated (llm_train.engine) and stop at <|im_end|> or <|endoftext|>; each is followed by
its tokens/s. An adapter trained on another base than --model-dir (e.g. output/ was retrained since) is refused with
the command that retrains it.
"""
import argparse
import logging
import time
import warnings
from pathlib import Path

from llm_train.arithmetic import EXAMPLE_PROMPTS
from llm_train.cli import nonnegative_float, nonnegative_int, positive_float, positive_int
from llm_train.engine import Engine, Sampling, reply_budget
from llm_train.errors import UserError, run_main
from llm_train.lineage import check_lineage
from llm_train.paths import OUTPUT_DIR, SFT_OUTPUT_DIR
from llm_train.runtime import compute_dtype
from llm_train.tokenizer import load_chat_tokenizer

warnings.filterwarnings("ignore", r".*`(is_)?gradient_checkpointing(_enable)?` is deprecated", FutureWarning)  # peft
# bitsandbytes on AVX512-BF16 CPUs: an optional faster kernel package (`kernels`) is not installed; nothing is wrong.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda r: "kernels-community" not in r.getMessage())

DEFAULT_PROMPTS = ["What is AI?", "你好吗?", *EXAMPLE_PROMPTS]


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
    p.add_argument("--top-k", type=nonnegative_int, default=50, help="0 = off")
    p.add_argument("--top-p", type=positive_float, default=0.9, help="1 = off")
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


def reply(engine, messages, args):
    """Stream one assistant reply to stdout; returns (text, tokens generated, seconds)."""
    ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    max_new_tokens = reply_budget(engine.model, args.max_new_tokens)  # the conversation's end keeps the rest
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    t0, printed, n = time.time(), "", 0
    for text, n in engine.stream_text(ids, max_new_tokens, sampling):
        print(text[len(printed):], end="", flush=True)
        printed = text
    print()
    return printed.strip(), n, time.time() - t0


def chat(engine, messages, args):
    print("assistant: ", end="", flush=True)
    text, n, seconds = reply(engine, messages, args)
    print(f"[{n} tokens, {n / max(seconds, 1e-9):.1f} tokens/s]", flush=True)
    return text


def main(argv=None):
    args = parse_args(argv)
    engine = Engine(*load_chat_model(args))  # the weights are in the compute dtype: no autocast
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
            messages.append({"role": "assistant", "content": chat(engine, messages, args)})
        return
    for prompt in args.prompt or DEFAULT_PROMPTS:
        print(f"\nuser: {prompt}")
        chat(engine, system + [{"role": "user", "content": prompt}], args)


if __name__ == "__main__":
    run_main(main)
