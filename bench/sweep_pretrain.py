"""The small learning-rate x batch sweep behind the `cpu` pretraining preset: short runs of PreTrain/model.py at a
fixed token budget, one per (lr, global batch), compared by validation loss.

Reads:  pretrain_data_chunks/ + tokenizer/ (run `make all` or the first two stages first; the sweep trains on the
        same chunks as the cpu preset does)
Writes: bench/results/sweep_pretrain.json and .md (the table), run folders in a temporary directory

    .venv/bin/python bench/sweep_pretrain.py                                  # 3 lrs x 3 batches, ~1M tokens each
    .venv/bin/python bench/sweep_pretrain.py --lrs 2e-3 3e-3 --batch-rows 8 16 --tokens 5e5

Every run has the same token budget, warmup and cosine schedule shape, so a smaller batch means more optimizer steps;
the best validation loss at a fixed budget is the setting to keep when the budget is what a CPU run can afford.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llm_train.atomic import atomic_write_json
from llm_train.cli import positive_float, positive_int
from llm_train.errors import UserError, run_main
from llm_train.paths import CHUNKS_DIR, TOKENIZER_DIR
from llm_train.runtime import dtype_name

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "bench" / "results"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="cpu", help="PreTrain/model.py preset the sweep varies")
    p.add_argument("--lrs", type=positive_float, nargs="+", default=[1.5e-3, 3e-3, 6e-3])
    p.add_argument("--batch-rows", type=positive_int, nargs="+", default=[8, 16, 32],
                   help="global batch in rows of the chunks' context length")
    p.add_argument("--tokens", type=positive_float, default=1e6, help="training tokens per run")
    p.add_argument("--chunks-dir", type=Path, default=CHUNKS_DIR)
    p.add_argument("--tokenizer-dir", type=Path, default=TOKENIZER_DIR)
    args = p.parse_args()
    manifest = args.chunks_dir / "manifest.json"
    if not manifest.is_file():
        raise UserError(f"no chunks in {args.chunks_dir}: run `make all` (or the tokenizer and chunk stages) "
                               f"first, or pass --chunks-dir")
    context = json.loads(manifest.read_text())["context_length"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batch_rows:
            for lr in args.lrs:
                run = Path(tmp) / f"b{batch}_lr{lr:g}"
                steps = max(1, round(args.tokens / (batch * context)))
                cmd = [sys.executable, str(REPO / "PreTrain" / "model.py"), "--preset", args.preset,
                       "--context-length", str(context), "--global-batch-tokens", str(batch * context),
                       "--batch-size", str(min(batch, 16)), "--max-steps", str(steps), "--lr", str(lr),
                       "--warmup-steps", str(max(1, steps // 25)), "--eval-interval", str(steps),
                       "--chunks-dir", str(args.chunks_dir), "--tokenizer-dir", str(args.tokenizer_dir),
                       "--checkpoint-dir", str(run / "ckpt"), "--output-dir", str(run / "out"),
                       "--log-file", str(run / "train.log"), "--tensorboard-dir", str(run / "tb"),
                       "--checkpoint-interval", str(steps)]
                t0 = time.time()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"run failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
                summary = json.loads((run / "out" / "pretrain_summary.json").read_text())
                row = {"batch_rows": batch, "batch_tokens": batch * context, "lr": lr, "steps": steps,
                       "tokens": summary["tokens_seen"], "val_loss": round(summary["final_val_loss"], 4),
                       "val_bpb": round(summary["val_bpb"], 4), "tokens_per_s": round(summary["median_tokens_per_s"]),
                       "seconds": round(time.time() - t0, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    best = min(rows, key=lambda r: r["val_loss"])
    lines = [f"Pretraining sweep, preset {args.preset}, {args.tokens:,.0f} tokens per run, context {context}, "
             f"{dtype_name()} ({time.strftime('%Y-%m-%d')})", "",
             "| global batch (rows x tokens) | " + " | ".join(f"lr {lr:g}" for lr in args.lrs) + " |",
             "|---|" + "---|" * len(args.lrs)]
    for batch in args.batch_rows:
        cells = []
        for lr in args.lrs:
            r = next(r for r in rows if r["batch_rows"] == batch and r["lr"] == lr)
            cell = f"{r['val_loss']:.3f} ({r['tokens_per_s']:,} tok/s)"
            cells.append(f"**{cell}**" if r is best else cell)
        lines.append(f"| {batch} x {context} ({r['steps']} steps) | " + " | ".join(cells) + " |")
    lines += ["", f"Validation loss after the budget (lower is better); best: lr {best['lr']:g}, "
              f"batch {best['batch_rows']} rows."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "sweep_pretrain.json", {"preset": args.preset, "context": context, "runs": rows})
    (RESULTS / "sweep_pretrain.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
