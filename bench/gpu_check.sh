#!/usr/bin/env bash
# GPU check of the full-size path in one call, inside 8 minutes on one H100/H200 (BUDGET_S for the stages):
#  - `make all SCALE=gpu` in a copy of this checkout ($WORK/repo), stage by stage, with short budgets given as
#    command-line variables (TOKENIZER_FLAGS ... REPORT_FLAGS; a 50k tokenizer, chunks at context 1024, gpt2-100m for
#    MAKE_STEPS steps, QLoRA SFT, reward model, GRPO, lm-eval (EVAL_LIMIT documents per task), the report);
#  - MFU: gpt2-100m at ACCUM micro batches per step (default 8, as a real run has) under DeepSpeed ZeRO-2 on ALL GPUs
#    ($STEPS steps) and under torchrun ($DDP_STEPS, plain or DDP), tokens/s and their ratio, against the shared plain
#    reference step (REFERENCE, default ../shared/bench/reference_gpt2_step.py; skipped if missing);
#  - kill and resume: RESUME_STEPS steps uninterrupted vs SIGKILLed at RESUME_KILL (--debug-kill-step) and rerun:
#    the max abs difference of the exported weights and of the losses (0 = bit-exact);
#  - gpt2-100m at the preset's micro batch (16 x 1024) capped at CAP_GB (16) GiB of GPU memory: pass/fail, peak;
#  - fp16 autocast + GradScaler, FP16_STEPS steps: the loss finite and falling;
#  - greedy inference of the merged SFT model, batch 1, GEN_TOKENS (200) new tokens: tokens/s.
# Each stage's wall time and peak GPU memory (nvidia-smi) go into the summary.
#
# Reads:  the embedded corpus and data; wheels/ (git-ignored) when DeepSpeed, TRL, bitsandbytes or datasets are
#         missing or transformers is not requirements.txt's.
# Writes: $WORK (default /tmp/gpu_check; the packages from wheels/ go to $WORK/site, on PYTHONPATH, never into the
#         machine's python) and the summary gpu_check.md + gpu_check.json + logs.tar.gz to $OUT if set
#         (the device tool copies $OUT back), else to bench/results/. The summary is written even when a stage fails
#         or runs out of time (BUDGET_S, default 470 s for all stages together).
#
#   bash bench/gpu_check.sh                      # from anywhere
#   STEPS=100 ACCUM=1 BATCH=8 bash bench/gpu_check.sh
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
# processes, default 1; the 16 GiB cap is skipped) with the sizes you give: VOCAB, CHUNK_TOKENS, STEPS, BATCH, ACCUM,
# DDP_STEPS, REFERENCE_STEPS, MAKE_STEPS, RESUME_STEPS/CKPT/KILL, FP16_STEPS, SFT_STEPS, RM_STEPS, GRPO_PROMPTS,
# EVAL_LIMIT, GEN_TOKENS and extra flags split at spaces: TOKENIZER_EXTRA, PRETRAIN_EXTRA (every pretraining run),
# RESUME_EXTRA, FP16_EXTRA (default --no-compile), SFT_EXTRA, RM_EXTRA, GRPO_EXTRA. ~3 minutes on 2 cores:
#   CPU_CHECK=1 PY=.venv/bin/python OUT=/tmp/gpu_check_out VOCAB=2000 CHUNK_TOKENS=2e5 STEPS=4 DDP_STEPS=4 BATCH=2 \
#   ACCUM=2 REFERENCE_STEPS=1 MAKE_STEPS=2 RESUME_STEPS=6 RESUME_CKPT=2 RESUME_KILL=3 FP16_STEPS=6 GEN_TOKENS=20 \
#   EVAL_LIMIT=2 PRETRAIN_EXTRA="--n-layer 2 --n-embd 64 --n-head 2" SFT_STEPS=2 RM_STEPS=1 RM_EXTRA="--batch-size 2" \
#   SFT_EXTRA="--batch-size 1 --eval-tasks 2 --eval-chats 1 --max-new-tokens 8" GRPO_PROMPTS=2 \
#   GRPO_EXTRA="--num-generations 2 --batch-size 4 --max-completion-length 8 --eval-arithmetic 2 --eval-conversation 1"\
#   bash bench/gpu_check.sh
# WHEELS (default wheels/) and INSTALL=1 (install wheels/ even if the packages import) test the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WORK=${WORK:-/tmp/gpu_check}
WHEELS=${WHEELS:-wheels}
VOCAB=${VOCAB:-50000}
CHUNK_TOKENS=${CHUNK_TOKENS:-2e6}
STEPS=${STEPS:-50}
BATCH=${BATCH:-16}
ACCUM=${ACCUM:-8}
SFT_STEPS=${SFT_STEPS:-10}
RM_STEPS=${RM_STEPS:-5}
GRPO_PROMPTS=${GRPO_PROMPTS:-8}  # the gpu preset: 8 completions each, 64 a step
REFERENCE=${REFERENCE:-../shared/bench/reference_gpt2_step.py}
REFERENCE_STEPS=${REFERENCE_STEPS:-30}
DDP_STEPS=${DDP_STEPS:-50}
MAKE_STEPS=${MAKE_STEPS:-10}
RESUME_STEPS=${RESUME_STEPS:-20}
RESUME_CKPT=${RESUME_CKPT:-5}
RESUME_KILL=${RESUME_KILL:-12}
CAP_GB=${CAP_GB:-16}
CAP_STEPS=${CAP_STEPS:-5}
FP16_STEPS=${FP16_STEPS:-20}
GEN_TOKENS=${GEN_TOKENS:-200}
EVAL_LIMIT=${EVAL_LIMIT:-8}
BUDGET_S=${BUDGET_S:-470}
read -r -a TOKENIZER_EXTRA <<< "${TOKENIZER_EXTRA:-}"
read -r -a PRETRAIN_EXTRA <<< "${PRETRAIN_EXTRA:-}"
read -r -a SFT_EXTRA <<< "${SFT_EXTRA:-}"
read -r -a RM_EXTRA <<< "${RM_EXTRA:-}"
read -r -a GRPO_EXTRA <<< "${GRPO_EXTRA:-}"
read -r -a RESUME_EXTRA <<< "${RESUME_EXTRA:-}"
read -r -a FP16_EXTRA <<< "${FP16_EXTRA:---no-compile}"  # its own compile would cost ~40 s
RESULTS=${OUT:-bench/results}
# No network on a GPU box: never wait for the hub.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
rm -rf "$WORK/logs" "$WORK/repo" "$WORK/output" "$WORK/output_ddp" "$WORK/resume_full" "$WORK/resume_killed" \
  "$WORK/cap16" "$WORK/fp16" "$WORK/ckpt" "$WORK/runs"
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

# The summary, also after a failed or timed-out stage: what ran, how long, how much memory, what was measured.
summary() {
  "$PY" bench/gpu_check_summary.py "$WORK" "$RESULTS" "$NGPU" || true
}
trap summary EXIT

# run_stage NAME CMD...: CMD under the time left, its output in logs/NAME.log; "exit wall peak-GPU-MB" in NAME.stage
# (GPU memory from nvidia-smi every 200 ms, the max over GPUs: the whole process, CUDA context and cache included).
# A failed stage ends the check, except with SOFT=1 (a measurement no later stage needs) or when it exits with
# EXPECT (the killed run). skip_stage NAME WHY: a stage not run, with the reason, in the summary.
run_stage() {
  local name=$1 status=0 poller="" t0 left
  shift
  left=$((DEADLINE - $(date +%s)))
  if [ "$left" -le 0 ]; then
    skip_stage "$name" "the ${BUDGET_S} s budget is spent"
    exit 1
  fi
  echo "== $name (at most ${left} s): ${SHOW:-$*}"
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
  if [ "$status" != 0 ] && [ "$status" != "${EXPECT:-0}" ]; then
    tail -n 40 "$WORK/logs/$name.log"
    echo "== $name failed (exit $status$([ "$status" = 124 ] && echo ': out of time')): $WORK/logs/$name.log" >&2
    if [ "$status" = 124 ] || [ "${SOFT:-0}" != 1 ]; then exit 1; fi
    return 0
  fi
  grep -E "tok/s|tokens/s|trained|accuracy|saved|wrote|took" "$WORK/logs/$name.log" | tail -n 3 || true
}
skip_stage() {
  echo "$2" > "$WORK/logs/$1.skipped"
  echo "== $1 skipped: $2"
}

# `make all SCALE=gpu` in a copy of this checkout ($WORK/repo: its tracked and not git-ignored files), the Makefile's
# own recipes with short budgets as command-line variables (they override the Makefile's), one target per stage for
# each stage's wall time and peak memory. Its tokenizer and chunks also feed the measurements in between.
REPO="$WORK/repo"
rm -rf "$REPO"
mkdir -p "$REPO"
if git rev-parse --git-dir > /dev/null 2>&1; then
  git ls-files -co --exclude-standard -z | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
    tar --null -T - -cf - | tar -xf - -C "$REPO"
else  # a copy without .git: all but the environment, the wheels and the outputs
  tar --exclude=./.git --exclude=./.venv --exclude=./wheels --exclude=./checkpoints --exclude=./bench/results \
    --exclude=./output --exclude=./tokenizer --exclude=./pretrain_data_chunks -cf - . | tar -xf - -C "$REPO"
fi
mkdir -p "$REPO/.venv" && touch "$REPO/.venv/.installed"  # no `make setup` there: PY's packages (and $SITE) serve
PYBIN=$(command -v "$PY")
case $PYBIN in /*) ;; *) PYBIN="$PWD/$PYBIN" ;; esac  # make runs in $REPO (no realpath: a venv's link)
PRETRAIN_MAKE="--preset gpt2-100m --batch-size $BATCH --global-batch-tokens $((BATCH * 1024 * NGPU))"
PRETRAIN_MAKE+=" --max-steps $MAKE_STEPS --warmup-steps 5 --log-interval 5 --eval-rows $((BATCH * 4))"
PRETRAIN_MAKE+=" ${PRETRAIN_EXTRA[*]}"
GRPO_MAKE="--preset gpu --num-prompts $GRPO_PROMPTS --epochs 1 --eval-arithmetic 32 --eval-conversation 8"
declare -A FLAGS=([TOKENIZER_FLAGS]="--vocab-size $VOCAB ${TOKENIZER_EXTRA[*]}"
  [CHUNK_FLAGS]="--context-length 1024 --max-tokens $CHUNK_TOKENS" [PRETRAIN_FLAGS]="$PRETRAIN_MAKE"
  [SFT_FLAGS]="--preset gpu --max-steps $SFT_STEPS --arith-tasks 2000 --eval-tasks 16 --eval-chats 4 ${SFT_EXTRA[*]}"
  [RM_FLAGS]="--preset gpu --max-steps $RM_STEPS ${RM_EXTRA[*]}" [GRPO_FLAGS]="$GRPO_MAKE ${GRPO_EXTRA[*]}"
  [EVAL_FLAGS]="--limit $EVAL_LIMIT --max-new-tokens 32" [REPORT_FLAGS]="--max-new-tokens 32")
MAKE_VARS=(SCALE=gpu "PY=$PYBIN")
for k in "${!FLAGS[@]}"; do MAKE_VARS+=("$k=${FLAGS[$k]}"); done
if [ "${CPU_CHECK:-0}" != 1 ] && [ "$NGPU" -gt 1 ]; then  # the Makefile's multi-GPU launchers, without .venv/bin/
  MAKE_VARS+=("PRETRAIN_LAUNCH=$PYBIN -m deepspeed.launcher.runner --num_gpus=$NGPU PreTrain/model.py --deepspeed \
PreTrain/ds_config.json" "POST_LAUNCH=$PYBIN -m accelerate.commands.launch --multi_gpu --num_processes $NGPU \
--num_machines 1 --mixed_precision no --dynamo_backend no")
fi
printf '%s\n' "${MAKE_VARS[@]}" > "$WORK/logs/make_vars.txt"
# Without make (a bare image may lack it; NO_MAKE=1 tests this) the Makefile's recipes for one GPU run by hand in
# $REPO, with the same flags.
if [ "${NO_MAKE:-0}" = 1 ] || ! command -v make > /dev/null; then
  echo "no make (or NO_MAKE=1): the Makefile's recipes ran by hand (one process each, no report/timings)" \
    | tee "$WORK/logs/no_make.txt"
fi
make_stage() {  # make_stage NAME TARGET: one target of the Makefile in $REPO
  local cmd ckpt="--force --checkpoint-dir checkpoints/gpu"
  if [ ! -f "$WORK/logs/no_make.txt" ]; then
    SHOW="make -C $REPO SCALE=gpu (the variables of logs/make_vars.txt) $2" \
      run_stage "make_$1" make -C "$REPO" --no-print-directory "${MAKE_VARS[@]}" "$2"
    return
  fi
  case $2 in
    tokenizer/tokenizer.json) cmd="PreTrain/train_byte_level_bpe_tokenizer.py --force ${FLAGS[TOKENIZER_FLAGS]}" ;;
    pretrain_data_chunks/manifest.json)
      cmd="PreTrain/preprocess_dataset_for_pretrain_map.py --force ${FLAGS[CHUNK_FLAGS]}" ;;
    output/pretrain_summary.json) cmd="PreTrain/model.py $ckpt/pretrain ${FLAGS[PRETRAIN_FLAGS]}" ;;
    SFT/eval.json) cmd="SFT/qlora_fine_tune_trl.py --merge $ckpt/sft ${FLAGS[SFT_FLAGS]}" ;;
    RLHF/reward_eval.json) cmd="RLHF/reward_model.py $ckpt/reward_model ${FLAGS[RM_FLAGS]}" ;;
    RLHF/eval.json) cmd="RLHF/grpo_trl.py $ckpt/grpo ${FLAGS[GRPO_FLAGS]}" ;;
    Eval/results.json) cmd="Eval/evaluate.py ${FLAGS[EVAL_FLAGS]}" ;;
    all) cmd="report/build_report.py ${FLAGS[REPORT_FLAGS]}" ;;
  esac
  # shellcheck disable=SC2086  # the flags split at spaces, as make's recipes split them
  run_stage "make_$1" env -C "$REPO" PYTHONPATH="$REPO:$PYTHONPATH" "$PYBIN" $cmd
}
make_stage tokenizer tokenizer/tokenizer.json
make_stage chunks pretrain_data_chunks/manifest.json
DATA_ARGS=(--tokenizer-dir "$REPO/tokenizer" --chunks-dir "$REPO/pretrain_data_chunks")

# MFU: ACCUM (default 8, as a real run has) micro batches per rank per step: the global batch grows with the GPUs, so
# tokens/s per GPU is comparable. The same flags for the DeepSpeed ZeRO-2 run and the torchrun one.
PRETRAIN_ARGS=(--preset gpt2-100m --batch-size "$BATCH" --global-batch-tokens $((BATCH * 1024 * NGPU * ACCUM))
  --warmup-steps 20 --log-interval 10 --eval-interval 100000 --eval-rows $((BATCH * 4)) --checkpoint-interval 100000
  "${DATA_ARGS[@]}" "${PRETRAIN_EXTRA[@]}")
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
  skip_stage reference "$REFERENCE not found"
fi

# Kill and resume in one process (one GPU): RESUME_STEPS steps uninterrupted, then the same run SIGKILLed by
# --debug-kill-step RESUME_KILL (a checkpoint every RESUME_CKPT steps) and rerun without that flag, so it resumes.
# The summary compares the two exports' weights and the per-step losses.
RESUME_ARGS=(--preset gpt2-100m --batch-size "$BATCH" --global-batch-tokens $((BATCH * 1024))
  --max-steps "$RESUME_STEPS"
  --warmup-steps 5 --log-interval 1 --eval-interval 100000 --eval-rows "$BATCH" --checkpoint-interval "$RESUME_CKPT"
  "${DATA_ARGS[@]}" "${PRETRAIN_EXTRA[@]}" "${RESUME_EXTRA[@]}")
SOFT=1 run_stage resume_full "$PY" PreTrain/model.py "${RESUME_ARGS[@]}" --output-dir "$WORK/resume_full" \
  --checkpoint-dir "$WORK/ckpt/resume_full"
SOFT=1 EXPECT=137 run_stage resume_killed "$PY" PreTrain/model.py "${RESUME_ARGS[@]}" \
  --output-dir "$WORK/resume_killed" --checkpoint-dir "$WORK/ckpt/resume_killed" --debug-kill-step "$RESUME_KILL"
SOFT=1 run_stage resume_rerun "$PY" PreTrain/model.py "${RESUME_ARGS[@]}" --output-dir "$WORK/resume_killed" \
  --checkpoint-dir "$WORK/ckpt/resume_killed"

# At most CAP_GB GiB of GPU memory (torch.cuda.set_per_process_memory_fraction before model.py runs): gpt2-100m at
# the preset's micro batch (16 x 1024), CAP_STEPS steps.
if [ "${CPU_CHECK:-0}" = 1 ]; then
  skip_stage cap16 "skipped (CPU_CHECK): a CUDA memory cap"
else
  SOFT=1 run_stage cap16 "$PY" -c "import runpy, sys, torch
torch.cuda.set_per_process_memory_fraction(min(1.0, $CAP_GB * 2**30 / torch.cuda.get_device_properties(0).total_memory))
sys.argv = ['PreTrain/model.py', *sys.argv[1:]]
runpy.run_path('PreTrain/model.py', run_name='__main__')" --preset gpt2-100m --global-batch-tokens 16384 \
    --max-steps "$CAP_STEPS" --warmup-steps 2 --log-interval 1 --eval-interval 100000 --eval-rows 16 \
    "${DATA_ARGS[@]}" "${PRETRAIN_EXTRA[@]}" --output-dir "$WORK/cap16" --checkpoint-dir "$WORK/ckpt/cap16"
fi

# fp16 autocast with its GradScaler (CPU_CHECK: torch's CPU GradScaler), FP16_STEPS steps.
SOFT=1 run_stage fp16 "$PY" PreTrain/model.py --preset gpt2-100m --dtype fp16 --batch-size "$BATCH" \
  --global-batch-tokens $((BATCH * 1024)) --max-steps "$FP16_STEPS" --warmup-steps 5 --log-interval 1 \
  --eval-interval 100000 --eval-rows "$BATCH" "${DATA_ARGS[@]}" "${PRETRAIN_EXTRA[@]}" --output-dir "$WORK/fp16" \
  --checkpoint-dir "$WORK/ckpt/fp16" "${FP16_EXTRA[@]}"

make_stage pretrain output/pretrain_summary.json
make_stage sft SFT/eval.json

# Inference of the merged SFT model (full size), batch 1, greedy: GEN_TOKENS new tokens (no stop) after a warm-up.
SOFT=1 run_stage inference "$PY" -c "import json, sys, time
import torch
from transformers import AutoModelForCausalLM
from llm_train.engine import Engine
from llm_train.runtime import compute_dtype
from llm_train.tokenizer import load_chat_tokenizer

path, n = sys.argv[1], int(sys.argv[2])
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = compute_dtype(allow_fp16=True)  # as SFT/inference.py loads it
model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
engine = Engine(model, load_chat_tokenizer(path))
ids = engine.tokenizer.apply_chat_template([{'role': 'user', 'content': 'What is AI?'}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)['input_ids']
ids = torch.tensor([engine.fit(list(ids), n)], device=device)
sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
engine.generate(ids, 8, min_new_tokens=8)  # warm-up
sync()
t0 = time.perf_counter()
out = engine.generate(ids, n, min_new_tokens=n)
sync()
dt = time.perf_counter() - t0
print(json.dumps({'device': device, 'dtype': str(dtype), 'prompt_tokens': ids.shape[1], 'new_tokens': out.shape[1],
                  'seconds': round(dt, 3), 'tokens_per_s': round(out.shape[1] / dt, 1),
                  'params_m': round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}))" \
  "$REPO/SFT/sft_output/merged" "$GEN_TOKENS"

make_stage reward RLHF/reward_eval.json
make_stage grpo RLHF/eval.json
make_stage eval Eval/results.json
make_stage all all  # what is left of `make all SCALE=gpu`: the report
echo "== all stages done in $(($(date +%s) - START)) s"
