#!/usr/bin/env bash
# GPU check of the full-size path in one call, inside 8 minutes on one H100/H200: a 50k tokenizer and chunks at
# context 1024 (a small --max-tokens), gpt2-100m pretraining under DeepSpeed ZeRO-2 on ALL GPUs for $STEPS steps
# (tokens/s, MFU against the GPU's dense bf16 peak, peak memory), the same for $DDP_STEPS steps under torchrun
# (plain or DDP, no DeepSpeed), the shared plain reference step at the same sizes (REFERENCE, default
# ../shared/bench/reference_gpt2_step.py; skipped if missing) for our tokens/s per GPU over its, then QLoRA
# SFT, the reward model and GRPO for a few steps each on CUDA (--preset gpu). Each stage's wall time and peak GPU
# memory go into a summary.
#
# Reads:  the embedded corpus and data; wheels/ (git-ignored) when DeepSpeed, TRL, bitsandbytes or datasets are
#         missing or transformers is not requirements.txt's.
# Writes: $WORK (default /tmp/gpu_check; the packages from wheels/ go to $WORK/site, on PYTHONPATH, never into the
#         machine's python) and the summary gpu_check.md + gpu_check.json + logs.tar.gz to $OUT if set
#         (the device tool copies $OUT back), else to bench/results/. The summary is written even when a stage fails
#         or runs out of time (BUDGET_S, default 470 s for all stages together).
#
#   bash bench/gpu_check.sh                      # from anywhere; ~5-7 minutes on one H200
#   STEPS=100 BATCH=8 bash bench/gpu_check.sh
#   ACCUM=8 STEPS=40 DDP_STEPS=40 bash bench/gpu_check.sh    # 8 micro batches per optimizer step, as a real run has
#
# Needs: a CUDA machine whose python (PY, default python3) has torch, transformers, accelerate, peft, tokenizers,
# pyarrow, numpy, pandas. What such a machine lacks comes from wheels/, filled beforehand on any machine with
# internet by these commands (for the GPU machine's python: 3.12 on this project's H200; change --python-version
# and --abi to match yours), ~27 MB:
#
#   pip download --no-deps -d wheels --python-version 3.12 --implementation cp --abi cp312 \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 deepspeed==0.19.8 trl==1.16.0 bitsandbytes==0.50.2 datasets==5.2.0 \
#     peft==0.21.2 transformers==5.23.0 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 dill==0.4.1 multiprocess==0.70.19
#   zip -d wheels/bitsandbytes-*.whl 'bitsandbytes/*cuda11*' 'bitsandbytes/*cuda12*' 'bitsandbytes/*rocm*' \
#     'bitsandbytes/*xpu*'    # optional: the CUDA 11/12, ROCm and XPU libraries are 36 of its 43 MB; CUDA 13 stays
#
# (our pins from requirements.txt, plus what deepspeed and datasets need beyond such a machine's packages; peft and
# transformers are pinned so the code runs as tested: with the H200 image's transformers 5.17, SFTConfig has no
# activation_checkpointing. bitsandbytes is its x86_64 CUDA wheel; deepspeed comes as its source archive, built there
# without network: no ops are compiled, ds_config.json uses torch's fused AdamW.)
#
# Testing this script without a GPU: CPU_CHECK=1 runs the same stages on CPU (DeepSpeed's CPU accelerator, RANKS
# processes, default 1) with the sizes you give: VOCAB, CHUNK_TOKENS, STEPS, BATCH, DDP_STEPS, REFERENCE_STEPS,
# SFT_STEPS, RM_STEPS, GRPO_PROMPTS
# and extra flags split at spaces: TOKENIZER_EXTRA, PRETRAIN_EXTRA (e.g. --no-compile), SFT_EXTRA, RM_EXTRA,
# GRPO_EXTRA. WHEELS (default wheels/) and INSTALL=1 (install wheels/ even if the packages import) test the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WORK=${WORK:-/tmp/gpu_check}
WHEELS=${WHEELS:-wheels}
VOCAB=${VOCAB:-50000}
CHUNK_TOKENS=${CHUNK_TOKENS:-2e6}
STEPS=${STEPS:-300}
BATCH=${BATCH:-16}
ACCUM=${ACCUM:-1}
SFT_STEPS=${SFT_STEPS:-20}
RM_STEPS=${RM_STEPS:-10}
GRPO_PROMPTS=${GRPO_PROMPTS:-16}
REFERENCE=${REFERENCE:-../shared/bench/reference_gpt2_step.py}
REFERENCE_STEPS=${REFERENCE_STEPS:-30}
DDP_STEPS=${DDP_STEPS:-150}
BUDGET_S=${BUDGET_S:-470}
read -r -a TOKENIZER_EXTRA <<< "${TOKENIZER_EXTRA:-}"
read -r -a PRETRAIN_EXTRA <<< "${PRETRAIN_EXTRA:-}"
read -r -a SFT_EXTRA <<< "${SFT_EXTRA:-}"
read -r -a RM_EXTRA <<< "${RM_EXTRA:-}"
read -r -a GRPO_EXTRA <<< "${GRPO_EXTRA:-}"
RESULTS=${OUT:-bench/results}
# No network on a GPU box: never wait for the hub.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
rm -rf "$WORK/logs" "$WORK/tokenizer" "$WORK/chunks" "$WORK/output" "$WORK/output_ddp" "$WORK/sft" "$WORK/rlhf" \
  "$WORK/ckpt" "$WORK/runs"
mkdir -p "$WORK/logs" "$RESULTS"

if [ "${CPU_CHECK:-0}" = 1 ]; then
  NGPU=${RANKS:-1}
  export DS_ACCELERATOR=cpu
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$WORK/logs/gpus.txt"
  NGPU=$(nvidia-smi -L | grep -c '^GPU')
fi

# The packages a bare GPU machine lacks, from wheels/ into $WORK/site (first on PYTHONPATH, so the pinned versions win).
SITE="$WORK/site"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"  # $PWD: this checkout's llm_train/
TRANSFORMERS_PIN=$(sed -n 's/^transformers==\([^ ]*\).*/\1/p' requirements.txt)
if [ "${INSTALL:-0}" = 1 ] || ! "$PY" -c "import deepspeed, trl, bitsandbytes, datasets, transformers
assert transformers.__version__ == '$TRANSFORMERS_PIN'" 2>/dev/null; then
  if ! compgen -G "$WHEELS/*" > /dev/null; then
    echo "deepspeed, trl, bitsandbytes or datasets is missing, or transformers is not $TRANSFORMERS_PIN, and $WHEELS/" \
         "is empty: fill it with the pip download" \
         "command in the header of $0" >&2
    exit 2
  fi
  echo "== installing $(find "$WHEELS" -maxdepth 1 -type f | wc -l) packages from $WHEELS/ into $SITE"
  rm -rf "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*
fi
"$PY" - <<'EOF' | tee "$WORK/logs/versions.txt"
import torch, transformers, peft, trl, datasets, deepspeed, bitsandbytes
print(", ".join(f"{m.__name__} {m.__version__}" for m in (torch, transformers, peft, trl, datasets, deepspeed, bitsandbytes)),
      f"| CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF

# The summary, also after a failed or timed-out stage: what ran, how long, how much memory.
summary() {
  "$PY" - "$WORK" "$RESULTS" "$NGPU" <<'EOF' || true
import json, statistics, sys, tarfile
from pathlib import Path

work, results, ngpu = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
def jsonl(path):
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError:
        return []

stages = {}
for f in sorted((work / "logs").glob("*.stage"), key=lambda f: f.stat().st_mtime):  # in the order they ran
    name, rc, wall, gpu_mb = f.read_text().split()
    stages[name] = {"exit": int(rc), "wall_s": float(wall), "gpu_mem_peak_mb": float(gpu_mb) if gpu_mb != "-" else None}
def text(path, default):
    return Path(path).read_text().strip() if Path(path).is_file() else default
out = {"gpus": text(work / "logs" / "gpus.txt", "cpu"), "versions": text(work / "logs" / "versions.txt", "?"),
       "ngpu": ngpu, "stages": stages}
def pretrain_stats(out_dir):
    s = read_json(out_dir / "pretrain_summary.json")
    if not s:
        return None
    hist = [h for h in jsonl(out_dir / "history.jsonl") if "tokens_per_s" in h]
    steady = [h for h in hist if h["step"] > min(50, s["steps"] // 2)] or hist  # after compile and warm-up
    return {"device": s["device"], "params_m": round(s["params"] / 1e6, 1), "steps": s["steps"],
            "global_batch_tokens": s["global_batch_tokens"], "world_size": s["world_size"],
            "tokens_per_s": statistics.median(h["tokens_per_s"] for h in steady) if steady else None,
            "mfu": statistics.median(h["mfu"] for h in steady) if steady and steady[0]["mfu"] else None,
            "peak_mem_mb_rank0": max((h["peak_mem_mb"] for h in hist), default=None),
            "final_train_loss": s["final_train_loss"], "val_loss": s["final_val_loss"],
            "wall_s": s["wall_seconds"], "dtype": s["dtype"]}
for key, out_dir in (("pretrain", "output"), ("pretrain_ddp", "output_ddp")):
    if stats := pretrain_stats(work / out_dir):
        out[key] = stats
reference = [json.loads(line) for line in Path(work / "logs" / "reference.log").read_text().splitlines()
             if line.startswith("{")] if (work / "logs" / "reference.log").is_file() else []
if reference:
    out["reference_tokens_per_s"] = reference[-1]["tokens_per_s"]
    for key in ("pretrain", "pretrain_ddp"):  # per GPU: the reference runs on one
        if out.get(key, {}).get("tokens_per_s"):
            out[key]["over_reference"] = round(out[key]["tokens_per_s"] / out[key]["world_size"]
                                               / reference[-1]["tokens_per_s"], 3)
sft_eval, rm, grpo_eval = read_json(work / "sft" / "eval.json"), read_json(work / "rlhf" / "reward_eval.json"), \
    read_json(work / "rlhf" / "eval.json")
grpo_steps = [h["step_time"] for h in jsonl(work / "rlhf" / "grpo_output" / "history.jsonl") if "step_time" in h]
if sft_eval:
    out["sft"] = sft_eval
if rm:
    out["reward"] = {k: rm[k] for k in ("steps", "train_seconds", "train_loss")} | {"accuracy": rm["heldout"]["accuracy"]}
if grpo_steps:
    out["grpo"] = {"steps": len(grpo_steps), "median_step_time_s": statistics.median(grpo_steps)}
if grpo_eval:
    out.setdefault("grpo", {})["eval"] = {k: grpo_eval.get(k) for k in ("sft", "grpo")}
(results / "gpu_check.json").write_text(json.dumps(out, indent=1, default=str))

lines = [f"# GPU check: {out['gpus']}", "", out["versions"], ""]
for key, how in (("pretrain", "DeepSpeed ZeRO-2"), ("pretrain_ddp", "torchrun (DDP when several GPUs)")):
    p = out.get(key)
    if p:
        mfu = f"{100 * p['mfu']:.1f}%" if p["mfu"] else "n/a"
        ratio = f", {p['over_reference']:.2f}x the reference per GPU" if "over_reference" in p else ""
        lines += [f"gpt2-100m ({p['params_m']}M params) {how} x{p['world_size']} {p['dtype']} on {p['device']}: "
                  f"{p['tokens_per_s']:,.0f} tokens/s{ratio}, MFU {mfu} of the dense bf16 peak, peak memory "
                  f"{p['peak_mem_mb_rank0']:,.0f} MB allocated (rank 0), {p['steps']} steps of "
                  f"{p['global_batch_tokens']:,} tokens, final train loss {p['final_train_loss']:.3f}, val loss "
                  f"{p['val_loss']:.3f}", ""]
if "reference_tokens_per_s" in out:
    lines += [f"the shared reference step (plain eager PyTorch, bf16 autocast, one GPU, the same micro batch): "
              f"{out['reference_tokens_per_s']:,.0f} tokens/s", ""]
lines += ["| stage | exit | wall | peak GPU memory (nvidia-smi, max over GPUs) |", "| --- | --- | --- | --- |"]
for name, st in stages.items():
    mem = f"{st['gpu_mem_peak_mb']:,.0f} MB" if st["gpu_mem_peak_mb"] is not None else "-"
    lines.append(f"| {name} | {st['exit']} | {st['wall_s']:.0f} s | {mem} |")
if "grpo" in out and "median_step_time_s" in out["grpo"]:
    lines += ["", f"GRPO: {out['grpo']['steps']} steps, median step {out['grpo']['median_step_time_s']:.2f} s"]
if rm:
    lines += [f"reward model: {rm['steps']} steps in {rm['train_seconds']} s, held-out accuracy {rm['heldout']['accuracy']:.3f}"]
(results / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
with tarfile.open(results / "logs.tar.gz", "w:gz") as tar:  # every stage's log, for a failure's details
    for f in [*(work / "logs").glob("*"), work / "pretrain_train.log", work / "pretrain_ddp_train.log", work / "sft" / "train.log",
              work / "rlhf" / "train.log", work / "sft" / "eval.json", work / "rlhf" / "eval.json"]:
        if f.is_file():
            tar.add(f, arcname=str(f.relative_to(work)))
print(f"summary in {results}/gpu_check.md, gpu_check.json, logs.tar.gz")
EOF
}
trap summary EXIT

# run_stage NAME CMD...: CMD under the time left, its output in logs/NAME.log; "exit wall peak-GPU-MB" in NAME.stage
# (GPU memory from nvidia-smi every 200 ms, the max over GPUs: the whole process, CUDA context and cache included).
run_stage() {
  local name=$1 status=0 poller="" t0 left
  shift
  left=$((DEADLINE - $(date +%s)))
  if [ "$left" -le 0 ]; then
    echo "== $name skipped: the ${BUDGET_S} s budget is spent" | tee "$WORK/logs/$name.log"
    exit 1
  fi
  echo "== $name (at most ${left} s): $*"
  if [ "${CPU_CHECK:-0}" != 1 ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$WORK/logs/$name.gpumem" 2>/dev/null &
    poller=$!
  fi
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$left" "$@" > "$WORK/logs/$name.log" 2>&1 || status=$?
  if [ -n "$poller" ]; then kill "$poller" 2>/dev/null || true; wait "$poller" 2>/dev/null || true; fi
  local peak="-"
  if [ -s "$WORK/logs/$name.gpumem" ]; then peak=$(sort -n "$WORK/logs/$name.gpumem" | tail -n 1 | tr -d ' '); fi
  echo "$name $status $(awk "BEGIN { print $(date +%s.%N) - $t0 }") $peak" > "$WORK/logs/$name.stage"
  if [ "$status" != 0 ]; then
    tail -n 40 "$WORK/logs/$name.log"
    echo "== $name failed (exit $status$([ "$status" = 124 ] && echo ': out of time')): $WORK/logs/$name.log" >&2
    exit 1
  fi
  grep -E "tok/s|trained|accuracy|saved|wrote" "$WORK/logs/$name.log" | tail -n 3 || true
}

run_stage tokenizer "$PY" PreTrain/train_byte_level_bpe_tokenizer.py --vocab-size "$VOCAB" \
  --output-dir "$WORK/tokenizer" "${TOKENIZER_EXTRA[@]}"

run_stage chunks "$PY" PreTrain/preprocess_dataset_for_pretrain_map.py --tokenizer-dir "$WORK/tokenizer" \
  --output-dir "$WORK/chunks" --context-length 1024 --max-tokens "$CHUNK_TOKENS"

# ACCUM (default 1) micro batches per rank per step: the global batch grows with the GPUs, so tokens/s per GPU is
# comparable. The same flags for the DeepSpeed run and the torchrun one.
PRETRAIN_ARGS=(--preset gpt2-100m --batch-size "$BATCH" --global-batch-tokens $((BATCH * 1024 * NGPU * ACCUM))
  --warmup-steps 20 --log-interval 10 --eval-interval 100000 --eval-rows $((BATCH * 4)) --checkpoint-interval 100000
  --tokenizer-dir "$WORK/tokenizer" --chunks-dir "$WORK/chunks" "${PRETRAIN_EXTRA[@]}")
run_stage pretrain "$PY" -m deepspeed.launcher.runner --num_gpus="$NGPU" PreTrain/model.py \
  --deepspeed PreTrain/ds_config.json --max-steps "$STEPS" "${PRETRAIN_ARGS[@]}" --output-dir "$WORK/output" \
  --checkpoint-dir "$WORK/ckpt/pretrain" --log-file "$WORK/pretrain_train.log" --tensorboard-dir "$WORK/runs/pretrain"

# The same steps without DeepSpeed: torchrun, so DDP when there are several GPUs, one plain process on one GPU.
run_stage pretrain_ddp "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" PreTrain/model.py \
  --max-steps "$DDP_STEPS" "${PRETRAIN_ARGS[@]}" --output-dir "$WORK/output_ddp" \
  --checkpoint-dir "$WORK/ckpt/pretrain_ddp" --log-file "$WORK/pretrain_ddp_train.log" \
  --tensorboard-dir "$WORK/runs/pretrain_ddp"

# The yardstick: the shared plain eager GPT-2 step (torch AdamW, bf16 autocast, no compile, no DeepSpeed) at the
# same sizes (the embedding padded to a multiple of 64 rows, as model.py pads it) and micro batch on one GPU, so the
# summary can give our tokens/s over its tokens/s.
if [ -f "$REFERENCE" ]; then
  run_stage reference "$PY" "$REFERENCE" --layers 12 --dim 768 --heads 12 --ctx 1024 --batch "$BATCH" \
    --vocab $(((VOCAB + 63) / 64 * 64)) --steps "$REFERENCE_STEPS" --warmup 5 --dtype bf16
else
  echo "== reference skipped: $REFERENCE not found"
fi

run_stage sft "$PY" SFT/qlora_fine_tune_trl.py --preset gpu --merge --model-dir "$WORK/output" \
  --output-dir "$WORK/sft/sft_output" --run-dir "$WORK/sft" --checkpoint-dir "$WORK/ckpt/sft" \
  --max-steps "$SFT_STEPS" --arith-tasks 2000 --eval-tasks 16 --eval-chats 4 "${SFT_EXTRA[@]}"

run_stage reward "$PY" RLHF/reward_model.py --preset gpu --sft-dir "$WORK/sft/sft_output" --base-dir "$WORK/output" \
  --out-dir "$WORK/rlhf" --checkpoint-dir "$WORK/ckpt/reward_model" --max-steps "$RM_STEPS" "${RM_EXTRA[@]}"

# gpu preset: 8 completions per prompt, 64 per step, so 16 prompts = 2 steps.
run_stage grpo "$PY" RLHF/grpo_trl.py --preset gpu --sft-dir "$WORK/sft/sft_output" --base-dir "$WORK/output" \
  --reward-model "$WORK/rlhf/reward_model" --out-dir "$WORK/rlhf" --checkpoint-dir "$WORK/ckpt/grpo" \
  --num-prompts "$GRPO_PROMPTS" --epochs 1 --eval-arithmetic 32 --eval-conversation 8 "${GRPO_EXTRA[@]}"
echo "== all stages done in $(($(date +%s) - START)) s"
