# llm_train: `make all` runs the pipeline on the embedded corpus, `make test` runs the test suite.
#   make all                 CPU presets with no GPU, the full-size presets with GPUs (SCALE=gpu)
#   make all SCALE=smoke     the same code paths on tiny sizes (about a minute)
# A stage whose output is newer than its inputs is skipped, as make does. Checkpoints are kept per scale
# (checkpoints/$(SCALE)/): another SCALE retrains the outputs but never touches this scale's checkpoints, and coming
# back to a scale resumes (or just re-exports) from them.
SHELL := bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Scripts import this checkout's llm_train/ even where .venv/ was installed from another checkout (a copy that shares it).
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
LIBRARY := $(wildcard llm_train/*.py)
NGPU := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
SCALE ?= $(if $(filter 0,$(NGPU)),cpu,gpu)

ifeq ($(SCALE),smoke)
TOKENIZER_FLAGS := --vocab-size 1024 --max-chars 1e6
CHUNK_FLAGS := --context-length 256 --sources default:3 midtrain:1 --max-tokens 3e5
PRETRAIN_FLAGS := --preset smoke
SFT_FLAGS := --preset smoke
RM_FLAGS := --preset smoke
GRPO_FLAGS := --preset smoke
EVAL_FLAGS := --limit 8 --max-new-tokens 12
REPORT_FLAGS := --max-new-tokens 12
else ifeq ($(SCALE),gpu)
TOKENIZER_FLAGS := --vocab-size 50000
CHUNK_FLAGS := --context-length 1024
# The embedded corpus is ~4M tokens at this vocabulary: a quarter of GPT-2's batch gives ~115 steps of <= 4 epochs.
PRETRAIN_FLAGS := --preset gpt2-100m --global-batch-tokens 131072
SFT_FLAGS := --preset gpu
RM_FLAGS := --preset gpu
GRPO_FLAGS := --preset gpu
EVAL_FLAGS :=
REPORT_FLAGS :=
else
# 8,192: the LM head is ~half of the cpu model's FLOPs, but 4,096 (13% less pretraining time, chats 4% longer) answered
# 40.5% / 63.5% (base / SFT) of the held-out problems instead of 73% / 89.5% (fp32, AVX2 kernels, one run each).
TOKENIZER_FLAGS := --vocab-size 8192
# Four fifths of the pretraining tokens are chats in the template (arithmetic with worked answers, some chatterbot):
# mid-training, so the base learns the arithmetic in many wordings before SFT (LoRA steps in SFT cost ~4x a
# pretraining step per token on CPU). Chats are packed whole, several to a row of 257 tokens; text fills the rest.
CHUNK_FLAGS := --context-length 256 --sources default:1 midtrain:4 --max-tokens 6e6
# Compiled: fewer seconds per step on CPU too, once the ~30 s compile is paid.
PRETRAIN_FLAGS := --preset cpu --compile
SFT_FLAGS := --preset cpu
RM_FLAGS := --preset cpu
GRPO_FLAGS := --preset cpu
EVAL_FLAGS :=
REPORT_FLAGS :=
endif
# SEED=N: another draw of every training stage (initialization, data order, sampling); the evaluations stay the same.
SEED_FLAG := $(if $(SEED),--seed $(SEED))
# With several GPUs pretraining runs under DeepSpeed ZeRO-2, one rank per GPU.
PRETRAIN_LAUNCH := $(if $(filter-out 0 1,$(NGPU)),$(VENV)/bin/deepspeed --num_gpus=$(NGPU) PreTrain/model.py --deepspeed PreTrain/ds_config.json,$(PY) PreTrain/model.py)
# SFT, the reward model and GRPO: one process per GPU under accelerate (DDP); their presets fix the global batch, so
# 1 or 8 GPUs train the same sequences per optimizer step. With 0 or 1 GPU, one plain process.
POST_LAUNCH := $(if $(filter-out 0 1,$(NGPU)),$(VENV)/bin/accelerate launch --multi_gpu --num_processes $(NGPU) \
  --num_machines 1 --mixed_precision no --dynamo_backend no,$(PY))

# Run a stage, print its wall time and record it in report/timings/ for the report card.
define timed
	@mkdir -p report/timings
	@echo "== stage $(1)"
	@start=$$(date +%s%N); $(2) || exit $$?; end=$$(date +%s%N); ms=$$(( (end - start) / 1000000 )); \
	  printf '{"stage": "%s", "seconds": %d.%03d}\n' $(1) $$((ms / 1000)) $$((ms % 1000)) > report/timings/$(1).json; \
	  echo "== stage $(1) took $$((ms / 1000)).$$((ms % 1000 / 100)) s"
endef

.PHONY: setup test bench dryrun all clean banner eval chat
FORCE:
setup: $(VENV)/.installed

# Reinstalled only when requirements.txt changes; a second `make setup` does nothing.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# The web UI test drives a real headless Chromium: installed here when missing (CI runs as root on a fresh machine).
# Two test processes (pytest-xdist): most tests are subprocess start-up and imports, so on 2 cores the suite takes
# 10 min instead of 18 in one process (measured on the Xeon of the README's results).
test: setup
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver)
	$(PY) -m pytest -q -n 2 tests

# The web UI load check talks to the trained CPU models, so it runs after `make all`.
bench: setup
	@mkdir -p bench/results
	@for f in $(filter-out bench/bench_webui.py,$(wildcard bench/bench_*.py)); do echo "== $$f"; $(PY) $$f || exit 1; done
	$(MAKE) all
	$(PY) bench/bench_webui.py

# The GPU path at full size on this CPU, a few steps per stage (50k tokenizer, gpt2-100m under DeepSpeed ZeRO-2 on 2
# CPU ranks, QLoRA SFT, reward model, GRPO, reload): peak RSS and step time per stage in
# bench/results/dryrun_full_size.md. Works in a temp dir, never on this repo's outputs. Not part of `make test`.
dryrun: setup
	PY=$(PY) bash bench/dryrun_full_size.sh

# The web UI on this repo's stage outputs: http://127.0.0.1:7860 (python WebUI/app.py --help for host, port, dirs).
chat: setup
	$(PY) WebUI/app.py

# The scale of the last run: another SCALE rebuilds every stage's output (its checkpoints are its own, under
# checkpoints/$(SCALE)/). A stage never deletes checkpoints of another run: pretraining stops and names them, the
# post-training stages (--force) start over in their place.
.scale: FORCE
	@old=$$(cat $@ 2>/dev/null); if [ "$$old" != "$(SCALE)" ]; then \
	  if [ -n "$$old" ]; then echo "== SCALE changed from $$old to $(SCALE): rebuilding the outputs; checkpoints/$$old/ is kept"; fi; \
	  echo $(SCALE) > $@; rm -rf report/timings; fi

tokenizer/tokenizer.json: PreTrain/train_byte_level_bpe_tokenizer.py $(LIBRARY) $(wildcard data/default_corpus/*.jsonl.gz) .scale | setup
	$(call timed,tokenizer,$(PY) PreTrain/train_byte_level_bpe_tokenizer.py --force $(TOKENIZER_FLAGS))

pretrain_data_chunks/manifest.json: PreTrain/preprocess_dataset_for_pretrain_map.py tokenizer/tokenizer.json
	$(call timed,chunks,$(PY) PreTrain/preprocess_dataset_for_pretrain_map.py --force $(CHUNK_FLAGS))

output/pretrain_summary.json: PreTrain/model.py pretrain_data_chunks/manifest.json
	$(call timed,pretrain,$(PRETRAIN_LAUNCH) --force --checkpoint-dir checkpoints/$(SCALE)/pretrain $(PRETRAIN_FLAGS) $(SEED_FLAG))

SFT/eval.json: SFT/qlora_fine_tune_trl.py output/pretrain_summary.json
	$(call timed,sft,$(POST_LAUNCH) SFT/qlora_fine_tune_trl.py --force --merge --checkpoint-dir checkpoints/$(SCALE)/sft $(SFT_FLAGS) $(SEED_FLAG))

RLHF/reward_eval.json: RLHF/reward_model.py SFT/eval.json
	$(call timed,reward_model,$(POST_LAUNCH) RLHF/reward_model.py --force --checkpoint-dir checkpoints/$(SCALE)/reward_model $(RM_FLAGS) $(SEED_FLAG))

RLHF/eval.json: RLHF/grpo_trl.py RLHF/reward_eval.json
	$(call timed,grpo,$(POST_LAUNCH) RLHF/grpo_trl.py --force --checkpoint-dir checkpoints/$(SCALE)/grpo $(GRPO_FLAGS) $(SEED_FLAG))

# lm-eval on every model, the same tasks (the offline ones of Eval/tasks/): the report card's comparison table.
Eval/results.json: Eval/evaluate.py $(wildcard Eval/tasks/*.py Eval/tasks/*yaml) RLHF/eval.json
	$(call timed,eval,$(PY) Eval/evaluate.py $(EVAL_FLAGS))

eval: Eval/results.json

report/report.md: report/build_report.py RLHF/eval.json Eval/results.json
	$(call timed,report,$(PY) report/build_report.py $(REPORT_FLAGS))

all: banner report/report.md
	@echo "== done: see report/report.md"

banner:
	@echo "== make all: SCALE=$(SCALE) ($(NGPU) GPUs found by nvidia-smi)"

# Every generated file, the checkpoints of every scale included.
clean:
	find tokenizer pretrain_data_chunks output -mindepth 1 ! -name README.md -exec rm -rf {} +
	find report -mindepth 1 ! -name README.md ! -name build_report.py -exec rm -rf {} +
	rm -rf .scale checkpoints runs train.log SFT/sft_output SFT/checkpoints SFT/runs SFT/train.log SFT/eval.json \
	       RLHF/reward_model RLHF/grpo_output RLHF/checkpoints RLHF/runs RLHF/train.log RLHF/*eval.json \
	       Eval/results.json Eval/samples
