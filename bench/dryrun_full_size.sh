#!/usr/bin/env bash
# Full-size dry run on CPU: every stage of the GPU path at its real size, for a few steps each, with each stage's
# peak memory and step time. Proves the 100M path (50k tokenizer, context 1024, gpt2-100m under DeepSpeed ZeRO-2,
# QLoRA SFT, reward model, GRPO, export and reload) works before anyone pays for a GPU.
#
# Reads:  the embedded corpus (data/default_corpus/), the embedded SFT chats and preference pairs.
# Writes: everything under $WORK (default: a new /tmp/dryrun.XXXXXX, kept for inspection; ~4-5 GB at full size, most
#         of it the ZeRO-2 checkpoint): tokenizer/, chunks/, output/, sft/, rlhf/, ckpt/, logs/<stage>.{log,time};
#         and the table to $RESULTS (default bench/results/dryrun_full_size.md). Never the repo's own stage outputs.
#
#   make dryrun                               # = bash bench/dryrun_full_size.sh; 2 CPU ranks, ~10-20 min on 2 cores
#   PRETRAIN_STEPS=10 SFT_STEPS=5 bash bench/dryrun_full_size.sh
#
# The stages, as `make all SCALE=gpu` runs them but with few steps:
#   tokenizer  PreTrain/train_byte_level_bpe_tokenizer.py --vocab-size 50000
#   chunks     PreTrain/preprocess_dataset_for_pretrain_map.py --context-length 1024 --max-tokens $CHUNK_TOKENS
#   pretrain   deepspeed --num_gpus=2 PreTrain/model.py --deepspeed PreTrain/ds_config.json --preset gpt2-100m
#              --max-steps 3 --batch-size 1 --global-batch-tokens 2048 (2 ranks x 1 row x 1024), DS_ACCELERATOR=cpu;
#              ends with the ZeRO-2 checkpoint and the export to output/
#   sft        SFT/qlora_fine_tune_trl.py --preset gpu --merge --max-steps 3 --batch-size 1 (4-bit base)
#   reward     RLHF/reward_model.py --preset gpu --max-steps 1 --batch-size 2 (held-out accuracy on $RM_EVAL_PAIRS pairs)
#   grpo       RLHF/grpo_trl.py --preset gpu, 2 prompts x 2 completions of 8 tokens = one step
#   reload     AutoModelForCausalLM on output/ and grpo_output/, PeftModel with the SFT adapter; generates a few tokens
#
# Peak RSS is the largest single process of the stage (GNU time's "Maximum resident set size", which covers the
# stage's whole process tree): for pretraining that is the bigger of the 2 ranks; both ranks together take about
# twice that. Step time: pretraining's median step (pretrain_summary.json), GRPO's median TRL step_time, SFT's and the
# reward model's training seconds / steps (so their first, slower step is included).
#
# Every size is an environment variable, so the tests run the same command path tiny (tests/test_dryrun.py):
#   VOCAB CONTEXT CHUNK_TOKENS RANKS PRETRAIN_STEPS GLOBAL_BATCH_TOKENS SFT_STEPS RM_STEPS RM_EVAL_PAIRS GRPO_PROMPTS
#   and extra flags, split at spaces: TOKENIZER_EXTRA PRETRAIN_EXTRA (e.g. "--n-layer 2 --n-embd 64 --n-head 2")
#   SFT_EXTRA RM_EXTRA GRPO_EXTRA. PY is the python (default .venv/bin/python; deepspeed is found beside it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEEPSPEED=${DEEPSPEED:-$(dirname "$PY")/deepspeed}
WORK=${WORK:-$(mktemp -d /tmp/dryrun.XXXXXX)}
RESULTS=${RESULTS:-bench/results/dryrun_full_size.md}
VOCAB=${VOCAB:-50000}
CONTEXT=${CONTEXT:-1024}
CHUNK_TOKENS=${CHUNK_TOKENS:-2e6}
RANKS=${RANKS:-2}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-3}
GLOBAL_BATCH_TOKENS=${GLOBAL_BATCH_TOKENS:-$((RANKS * CONTEXT))}
SFT_STEPS=${SFT_STEPS:-3}
RM_STEPS=${RM_STEPS:-1}
RM_EVAL_PAIRS=${RM_EVAL_PAIRS:-16}
GRPO_PROMPTS=${GRPO_PROMPTS:-2}
read -r -a TOKENIZER_EXTRA <<< "${TOKENIZER_EXTRA:-}"
read -r -a PRETRAIN_EXTRA <<< "${PRETRAIN_EXTRA:-}"
read -r -a SFT_EXTRA <<< "${SFT_EXTRA:-}"
read -r -a RM_EXTRA <<< "${RM_EXTRA:-}"
read -r -a GRPO_EXTRA <<< "${GRPO_EXTRA:-}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's llm_train/

mkdir -p "$WORK/logs" "$(dirname "$RESULTS")"
echo "== dry run in $WORK: vocab $VOCAB, context $CONTEXT, $RANKS CPU ranks"

# run_stage NAME CMD...: CMD's output goes to logs/NAME.log, "max RSS kB, wall s" of its process tree to logs/NAME.time.
# Without GNU time the same two numbers come from python: RUSAGE_CHILDREN's maxrss is the largest waited-for process.
RSS_WRAPPER='import resource, subprocess, sys, time
t0 = time.time()
rc = subprocess.call(sys.argv[2:])
open(sys.argv[1], "w").write(f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss} {time.time() - t0:.2f}\n")
sys.exit(rc)'
run_stage() {
  local name=$1 status=0
  shift
  echo "== $name: $*"
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -f "%M %e" -o "$WORK/logs/$name.time" "$@" > "$WORK/logs/$name.log" 2>&1 || status=$?
  else
    "$PY" -c "$RSS_WRAPPER" "$WORK/logs/$name.time" "$@" > "$WORK/logs/$name.log" 2>&1 || status=$?
  fi
  if [ "$status" != 0 ]; then
    tail -n 40 "$WORK/logs/$name.log"
    echo "== $name failed (exit $status): the whole log is $WORK/logs/$name.log" >&2
    exit 1
  fi
  echo "   $(tail -n 1 "$WORK/logs/$name.time" | awk '{printf "peak RSS %.0f MB, %.1f s", $1 / 1024, $2}')"
}

run_stage tokenizer "$PY" PreTrain/train_byte_level_bpe_tokenizer.py --vocab-size "$VOCAB" \
  --output-dir "$WORK/tokenizer" "${TOKENIZER_EXTRA[@]}"

run_stage chunks "$PY" PreTrain/preprocess_dataset_for_pretrain_map.py --tokenizer-dir "$WORK/tokenizer" \
  --output-dir "$WORK/chunks" --context-length "$CONTEXT" --max-tokens "$CHUNK_TOKENS"

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
run_stage pretrain env DS_ACCELERATOR=cpu "$DEEPSPEED" --num_gpus="$RANKS" --master_port "$PORT" PreTrain/model.py \
  --deepspeed PreTrain/ds_config.json --preset gpt2-100m --context-length "$CONTEXT" --batch-size 1 \
  --global-batch-tokens "$GLOBAL_BATCH_TOKENS" --max-steps "$PRETRAIN_STEPS" --log-interval 1 \
  --eval-interval "$PRETRAIN_STEPS" --eval-rows 2 --checkpoint-interval "$PRETRAIN_STEPS" \
  --tokenizer-dir "$WORK/tokenizer" --chunks-dir "$WORK/chunks" --output-dir "$WORK/output" \
  --checkpoint-dir "$WORK/ckpt/pretrain" --log-file "$WORK/pretrain_train.log" --tensorboard-dir "$WORK/runs/pretrain" \
  "${PRETRAIN_EXTRA[@]}"

run_stage sft "$PY" SFT/qlora_fine_tune_trl.py --preset gpu --merge --model-dir "$WORK/output" \
  --output-dir "$WORK/sft/sft_output" --run-dir "$WORK/sft" --checkpoint-dir "$WORK/ckpt/sft" \
  --max-steps "$SFT_STEPS" --batch-size 1 --eval-tasks 2 --eval-chats 1 --max-new-tokens 8 \
  "${SFT_EXTRA[@]}"

# The embedded pairs, held-out accuracy on the first RM_EVAL_PAIRS held-out ones (all 348 take minutes at 100M on CPU).
gzip -dc RLHF/data/preference_heldout.jsonl.gz | sed -n "1,${RM_EVAL_PAIRS}p" > "$WORK/heldout_pairs.jsonl"
run_stage reward "$PY" RLHF/reward_model.py --preset gpu --sft-dir "$WORK/sft/sft_output" --base-dir "$WORK/output" \
  --out-dir "$WORK/rlhf" --checkpoint-dir "$WORK/ckpt/reward_model" --max-steps "$RM_STEPS" --batch-size 2 \
  --data RLHF/data/preference_train.jsonl.gz --eval-data "$WORK/heldout_pairs.jsonl" "${RM_EXTRA[@]}"

run_stage grpo "$PY" RLHF/grpo_trl.py --preset gpu --sft-dir "$WORK/sft/sft_output" --base-dir "$WORK/output" \
  --reward-model "$WORK/rlhf/reward_model" --out-dir "$WORK/rlhf" --checkpoint-dir "$WORK/ckpt/grpo" \
  --num-prompts "$GRPO_PROMPTS" --num-generations 2 --batch-size 4 --epochs 1 --max-completion-length 8 \
  --eval-arithmetic 2 --eval-conversation 1 "${GRPO_EXTRA[@]}"

cat > "$WORK/reload.py" <<'EOF'
# What a user does with the outputs: plain transformers/peft loading, no project code.
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

work = Path(sys.argv[1])
tok = AutoTokenizer.from_pretrained(work / "output")
base = AutoModelForCausalLM.from_pretrained(work / "output")
# The embedding was padded for training (50,000 -> 50,048 rows); the export keeps the tokenizer's rows.
assert base.config.vocab_size == len(tok), (base.config.vocab_size, len(tok))
sft = PeftModel.from_pretrained(base, work / "sft" / "sft_output")
grpo = AutoModelForCausalLM.from_pretrained(work / "rlhf" / "grpo_output")
ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
for name, model in (("base + SFT adapter", sft), ("GRPO", grpo)):
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1], name
    print(f"{name}: {tok.decode(out[0, ids['input_ids'].shape[1]:])!r}")
EOF
run_stage reload "$PY" "$WORK/reload.py" "$WORK"
cat "$WORK/logs/reload.log"

# The table: peak RSS and wall from logs/*.time, step times from each stage's own records.
"$PY" - "$WORK" "$RESULTS" <<'EOF'
import json, os, platform, re, statistics, sys, time
from pathlib import Path

work, results = Path(sys.argv[1]), Path(sys.argv[2])
summary = json.loads((work / "output" / "pretrain_summary.json").read_text())
sft_log = (work / "sft" / "train.log").read_text()
m = re.findall(r"trained to step (\d+) \((\d+)s\)", sft_log)
sft_step = int(m[-1][1]) / int(m[-1][0]) if m else None
rm = json.loads((work / "rlhf" / "reward_eval.json").read_text())
grpo_hist = [json.loads(line) for line in (work / "rlhf" / "grpo_output" / "history.jsonl").read_text().splitlines()]
grpo_times = [h["step_time"] for h in grpo_hist if "step_time" in h]
steps = {"pretrain": summary["global_batch_tokens"] / summary["median_tokens_per_s"],
         "sft": sft_step, "reward": rm["train_seconds"] / max(1, rm["steps"]),
         "grpo": statistics.median(grpo_times) if grpo_times else None}
notes = {"tokenizer": f"vocab {summary['model_config']['vocab_size']:,}",
         "chunks": f"context {summary['model_config']['context_length']}",
         "pretrain": f"{summary['params'] / 1e6:.1f}M params (embedding {summary['model_config']['padded_vocab_size']:,} "
                     f"rows), {summary['mode']} x{summary['world_size']}, {summary['global_batch_tokens']:,} tokens/step, "
                     f"{summary['steps']} steps, {summary['dtype']}, MFU {100 * (summary['mfu'] or 0):.1f}%; the RSS is "
                     f"one rank's",
         "sft": f"QLoRA (4-bit base), {m[-1][0] if m else '?'} steps at batch 1",
         "reward": f"{rm['steps']} step(s), held-out accuracy on {rm['heldout']['pairs']} pairs",
         "grpo": f"{len(grpo_times)} step(s) of 4 completions",
         "reload": "AutoModelForCausalLM + PeftModel, generate 8 tokens"}
rows = []
for stage in ("tokenizer", "chunks", "pretrain", "sft", "reward", "grpo", "reload"):
    rss_kb, wall = (float(x) for x in (work / "logs" / f"{stage}.time").read_text().split()[-2:])
    step = f"{steps[stage]:.2f} s" if steps.get(stage) is not None else "-"
    rows.append(f"| {stage} | {rss_kb / 2**20:.2f} GB | {step} | {wall:.0f} s | {notes[stage]} |")
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
table = "\n".join([
    f"# Full-size dry run on CPU ({time.strftime('%Y-%m-%d %H:%M')})", "",
    f"{os.cpu_count()} cores ({cpu}), torch threads per rank as model.py sets them. Work dir: {work}", "",
    "| stage | peak RSS | step time | wall | notes |", "| --- | --- | --- | --- | --- |", *rows, ""])
results.write_text(table)
print(table)
print(f"written to {results}")
EOF
