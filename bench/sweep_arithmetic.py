"""The arithmetic frontier: held-out exact match against pretraining minutes, for the CPU recipe of `make all`.

Reads:  tokenizer/ (the make all tokenizer; run `make tokenizer/tokenizer.json` first).
Writes: --work-dir (default /tmp/llm_train_sweep): a chunk set and, per budget, a pretrained base (and with --sft its
        SFT adapter); bench/results/sweep_arithmetic.md: one row per budget, appended as each finishes.

For each --steps budget: pretraining with the `cpu` preset and make all's chunk recipe (context 256, default:1
midtrain:4) for that many steps (the cosine schedule spans the run, so every budget is a run of its own), then the
base's greedy exact match on 400 held-out problems in the trained wordings and 400 in held-out wordings (SFT's
evaluation set), and with --sft the same after the cpu SFT preset. Minutes are this machine's, with nothing else
running; a budget takes about its pretraining minutes plus ~2 (SFT) and ~1 (evaluation).

    python bench/sweep_arithmetic.py --steps 750 1500 3000 --sft
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from llm_train.arithmetic import evaluation_tasks, exact_match_scores, extract_answer
from llm_train.paths import REPO, TOKENIZER_DIR

RESULTS = REPO / "bench" / "results" / "sweep_arithmetic.md"
ROWS_PER_STEP, CONTEXT = 8, 256  # the cpu preset's batch


def run(*cmd):
    start = time.time()
    subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO, check=True)
    return time.time() - start


def base_scores(model_dir, n):
    import torch
    from transformers import AutoModelForCausalLM

    from llm_train.engine import Engine, prompt_token_ids
    from llm_train.runtime import dtype_name
    from llm_train.tokenizer import load_chat_tokenizer

    tok = load_chat_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tasks = evaluation_tasks(n, seed=0)  # SFT's evaluation set (--seed 0)
    engine = Engine(model, tok, dtype_name(allow_fp16=True))
    replies = engine.generate_batch(prompt_token_ids(tok, [[{"role": "user", "content": t["prompt"]}] for t in tasks]),
                                    64, batch_size=64)
    return exact_match_scores(tasks, [extract_answer(engine.decode(r)) for r in replies])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[750, 1500, 3000], help="pretraining budgets")
    ap.add_argument("--sft", action="store_true", help="also run the cpu SFT preset on each base")
    ap.add_argument("--problems", type=int, default=400, help="held-out problems per split")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/llm_train_sweep"))
    args = ap.parse_args()
    work = args.work_dir
    chunks = work / "chunks"
    tokens = max(args.steps) * ROWS_PER_STEP * CONTEXT * 1.25  # one pass, with room for the val split and the rest
    if not (chunks / "manifest.json").is_file():
        run("PreTrain/preprocess_dataset_for_pretrain_map.py", "--tokenizer-dir", TOKENIZER_DIR, "--output-dir",
            chunks, "--context-length", CONTEXT, "--sources", "default:1", "midtrain:4", "--max-tokens", tokens)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if not RESULTS.exists():
        RESULTS.write_text("| pretraining steps | minutes | base: trained wordings | base: held-out wordings | "
                           "SFT: trained wordings | SFT: held-out wordings | SFT worst cell |\n|---|---|---|---|---|---|---|\n")
    for steps in args.steps:
        out = work / f"base_{steps}"
        seconds = run("PreTrain/model.py", "--force", "--preset", "cpu", "--compile", "--max-steps", steps,
                      "--chunks-dir", chunks, "--output-dir", out, "--checkpoint-dir", work / f"ckpt_{steps}",
                      "--log-file", work / f"pretrain_{steps}.log", "--tensorboard-dir", work / f"tb_{steps}")
        base = base_scores(out, args.problems)
        row = [steps, f"{seconds / 60:.1f}", f"{base['heldout']['exact_match']:.1%}",
               f"{base['heldout_wordings']['exact_match']:.1%}"]
        if args.sft:
            run("SFT/qlora_fine_tune_trl.py", "--force", "--preset", "cpu", "--model-dir", out, "--output-dir",
                work / f"sft_{steps}", "--run-dir", work / f"sft_run_{steps}", "--eval-tasks", args.problems)
            sft = json.loads((work / f"sft_run_{steps}" / "eval.json").read_text())["sft"]
            cells = sft["arithmetic"]["both"]["by_cell"]
            worst = min(cells, key=cells.get)
            row += [f"{sft['exact_match']:.1%}", f"{sft['exact_match_heldout_wordings']:.1%}",
                    f"{worst} {cells[worst]:.0%}"]
        else:
            row += ["", "", ""]
        with RESULTS.open("a") as f:
            f.write("| " + " | ".join(map(str, row)) + " |\n")
        print(" | ".join(map(str, row)), flush=True)


if __name__ == "__main__":
    main()
