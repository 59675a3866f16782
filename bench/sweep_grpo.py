"""The GRPO frontier on this machine: held-out exact match of the policy against GRPO training minutes.

Reads:  make all's SFT policy, base and reward model (SFT/sft_output/, output/, RLHF/reward_model/; run
        `make RLHF/reward_eval.json` first).
Writes: --work-dir (default /tmp/llm_train_sweep_grpo): the GRPO run (its grpo_output/, eval.json, train.log);
        bench/results/sweep_grpo.md: one row per evaluation point of the run, appended when it ends.

One run of RLHF/grpo_trl.py with the cpu preset's settings (extra flags after `--` are passed on), --steps optimizer
steps of fresh prompts instead of the preset's 12, and the held-out curve every --every steps: greedy exact match and
the exact match of 4 answers per problem sampled at the training temperature, on --problems held-out problems (half in
the trained wordings, half in held-out wordings). The sampled error rate's relative fall from step 0 is the measure
make all reports as GRPO's effect (there on 1,000 problems, with a paired-bootstrap interval). Minutes are training
minutes at the run's median seconds per step (the curve's evaluations left out), with nothing else running.

    python bench/sweep_grpo.py --steps 96 --every 12
    python bench/sweep_grpo.py --steps 96 --every 12 -- --lr 1e-3 --rm-weight 0 --chat-fraction 0
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from llm_train.paths import REPO

RESULTS = REPO / "bench" / "results" / "sweep_grpo.md"
PROMPTS_PER_STEP = 16  # the cpu preset: 128 completions per step in groups of 8


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=96, help="optimizer steps of the run")
    ap.add_argument("--every", type=int, default=12, help="steps between points of the held-out curve")
    ap.add_argument("--problems", type=int, default=400, help="held-out problems of the curve (both splits)")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/llm_train_sweep_grpo"))
    ap.add_argument("grpo_flags", nargs="*", help="after --: more flags for RLHF/grpo_trl.py")
    args = ap.parse_args()
    cmd = [sys.executable, "RLHF/grpo_trl.py", "--force", "--preset", "cpu",
           "--reward-model", REPO / "RLHF" / "reward_model",
           "--out-dir", args.work_dir, "--checkpoint-dir", args.work_dir / "checkpoints",
           "--num-prompts", args.steps * PROMPTS_PER_STEP, "--eval-every", args.every,
           "--eval-arithmetic", args.problems, *args.grpo_flags]
    subprocess.run(list(map(str, cmd)), cwd=REPO, check=True)

    history = [json.loads(line) for line in (args.work_dir / "grpo_output" / "history.jsonl").open()]
    steps = {h["step"]: h["time"] for h in history if "loss" in h}
    # step s's line is written after the curve's evaluation at step s: those gaps are left out
    gaps = [steps[s] - steps[s - 1] for s in steps if s - 1 in steps and s % args.every]
    per_step = statistics.median(gaps)
    curve = [h for h in history if "heldout/sampled_exact_answer" in h]
    error0 = 1 - curve[0]["heldout/sampled_exact_answer"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if not RESULTS.exists():
        RESULTS.write_text("| run | step | sampled answers | training minutes | greedy | sampled | sampled error "
                           "rate: fall from step 0 |\n|---|---|---|---|---|---|---|\n")
    label = " ".join(["cpu preset", *args.grpo_flags])
    rows = [(h["step"], h["step"], h["heldout/exact_answer"], h["heldout/sampled_exact_answer"],
             f"{1 - (1 - h['heldout/sampled_exact_answer']) / error0:+.1%}") for h in curve]
    # the end of the run: eval.json, on the same problems, with the paired-bootstrap interval
    result, last = json.loads((args.work_dir / "eval.json").read_text()), max(steps)
    cut = result["sampled_error_reduction"]
    rows.append((f"{last} (end)", last, result["grpo"]["exact_answer_accuracy"],
                 result["grpo"]["sampled_exact_answer_accuracy"],
                 f"{cut['relative']:+.1%} (95% CI {cut['ci95'][0]:+.1%} .. {cut['ci95'][1]:+.1%})"))
    with RESULTS.open("a") as f:
        for name, step, greedy, sampled, fall in rows:
            row = [label, name, step * PROMPTS_PER_STEP * 8, f"{step * per_step / 60:.1f}", f"{greedy:.1%}",
                   f"{sampled:.1%}", fall]
            f.write("| " + " | ".join(map(str, row)) + " |\n")
            print(" | ".join(map(str, row)), flush=True)


if __name__ == "__main__":
    main()
