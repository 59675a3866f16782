"""The reward model's frontier: held-out pairwise accuracy, and on wrong numbers, against training minutes.

Reads:  an SFT policy and its base (--sft-dir, --base-dir; make all's by default) and the embedded preference pairs
        (RLHF/data/).
Writes: --work-dir (default /tmp/llm_train_rm_sweep): 1,200 more wrong-number pairs and, per budget, a reward model;
        bench/results/sweep_reward_model.md: one row per budget, appended as each finishes.

For each --epochs budget, RLHF/reward_model.py with the cpu preset (arguments after -- are passed on to it, e.g.
`-- --data my_pairs.jsonl.gz`), then its pairwise accuracy on the embedded held-out pairs (all, and the 40 "wrong
number" ones) and on 400 more wrong-number pairs of each slip, on held-out problems in both held-out splits: a
dropped carry or borrow, a wrong column sum, and a final sentence that contradicts right columns. The 40 embedded ones
move by +-0.09 between draws of the rejected answers; 400 by about +-0.05 (95%). Minutes are this machine's, with
nothing else running.

    python bench/sweep_reward_model.py --epochs 1 2 3
    python bench/sweep_reward_model.py --epochs 1 -- --likelihood-weight 0     # the classifier alone
"""
import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

from llm_train.arithmetic import evaluation_tasks
from llm_train.paths import OUTPUT_DIR, PREFERENCE_FILES, REPO, SFT_OUTPUT_DIR

sys.path.insert(0, str(REPO / "RLHF" / "data"))
from build_preference_data import row, write_jsonl_gz, wrong_worked_answer  # noqa: E402

RESULTS = REPO / "bench" / "results" / "sweep_reward_model.md"
SLIPS = ("carry", "column", "final")


def wrong_number_pairs(path, problems_per_split):
    """Per held-out problem (another draw than the embedded held-out pairs'), one pair of each slip, its kind the
    slip's name."""
    rng = random.Random(1234)
    rows = []
    for task in evaluation_tasks(problems_per_split, seed=1000):
        prompt = [{"role": "user", "content": task["prompt"]}]
        for slip in SLIPS:
            rows.append(row(prompt, task["response"], wrong_worked_answer(rng, task, slip), slip, "arithmetic",
                            task["lang"], task["answer"]))
    write_jsonl_gz(path, rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, nargs="+", default=[1, 2, 3], help="training budgets")
    ap.add_argument("--sft-dir", type=Path, default=SFT_OUTPUT_DIR)
    ap.add_argument("--base-dir", type=Path, default=OUTPUT_DIR)
    ap.add_argument("--problems", type=int, default=200, help="held-out problems per held-out split (x 3 slips)")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/llm_train_rm_sweep"))
    ap.add_argument("reward_model_args", nargs="*", help="after --: more flags for RLHF/reward_model.py")
    args = ap.parse_args()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    extra = work / "wrong_numbers.jsonl.gz"
    wrong_number_pairs(extra, args.problems)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if not RESULTS.exists():
        RESULTS.write_text("| epochs | flags | steps | training minutes | held-out accuracy | wrong number (40) | "
                           "dropped carry (400) | wrong column (400) | contradicting final (400) |\n"
                           "|---|---|---|---|---|---|---|---|---|\n")
    for epochs in args.epochs:
        out = work / f"epochs_{epochs:g}"
        subprocess.run([sys.executable, "RLHF/reward_model.py", "--force", "--preset", "cpu", "--epochs", str(epochs),
                        "--sft-dir", str(args.sft_dir), "--base-dir", str(args.base_dir), "--out-dir", str(out),
                        "--data", str(PREFERENCE_FILES["train"]), "--eval-data", str(PREFERENCE_FILES["heldout"]),
                        str(extra), *args.reward_model_args], cwd=REPO, check=True)
        report = json.loads((out / "reward_eval.json").read_text())
        accuracy, pairs = report["heldout"]["accuracy_by_kind"], report["heldout"]["pairs_by_kind"]
        embedded = [k for k in accuracy if k not in SLIPS]  # the embedded held-out pairs' own accuracy
        overall = sum(accuracy[k] * pairs[k] for k in embedded) / sum(pairs[k] for k in embedded)
        cells = [f"{epochs:g}", " ".join(args.reward_model_args) or "-", report["steps"],
                 f"{report['train_seconds'] / 60:.1f}", f"{overall:.3f}", f"{accuracy['wrong_number']:.2f}",
                 *(f"{accuracy[s]:.2f}" for s in SLIPS)]
        with RESULTS.open("a") as f:
            f.write("| " + " | ".join(map(str, cells)) + " |\n")
        print(" | ".join(map(str, cells)), flush=True)


if __name__ == "__main__":
    main()
