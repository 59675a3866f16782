# llm_train: `make all` runs the pipeline on the embedded corpus, `make test` runs the test suite.
#   make all                 CPU presets with no GPU, the full-size presets with GPUs (SCALE=gpu)
#   make all SCALE=smoke     the same code paths on tiny sizes (a few minutes)
# A stage whose output is newer than its inputs is skipped, as make does. Outputs of another SCALE are never replaced
# silently: `make all` stops and says how to continue that run or start over (NEW_SCALE=1).
SHELL := bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NGPU := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
SCALE ?= $(if $(filter 0,$(NGPU)),cpu,gpu)

ifeq ($(SCALE),smoke)
TOKENIZER_FLAGS := --vocab-size 1024 --max-chars 1e6
CHUNK_FLAGS := --context-length 128 --sources default:3 midtrain:1 --max-tokens 3e5
PRETRAIN_FLAGS := --preset smoke --context-length 128
SFT_FLAGS := --max-steps 6 --arith-tasks 300 --eval-tasks 8 --eval-chats 4 --max-new-tokens 12
RM_FLAGS := --max-steps 6
GRPO_FLAGS := --num-prompts 8 --epochs 1 --batch-size 8 --max-completion-length 12 --eval-arithmetic 8 --eval-conversation 4
EVAL_FLAGS := --limit 8 --max-new-tokens 12
REPORT_FLAGS := --max-new-tokens 12
else ifeq ($(SCALE),gpu)
TOKENIZER_FLAGS := --vocab-size 50000
CHUNK_FLAGS := --context-length 1024
PRETRAIN_FLAGS := --preset gpt2-100m
SFT_FLAGS :=
RM_FLAGS :=
GRPO_FLAGS :=
EVAL_FLAGS :=
REPORT_FLAGS :=
else
TOKENIZER_FLAGS := --vocab-size 8192
# A quarter of the pretraining tokens are chats in the template (arithmetic with worked answers, chatterbot):
# mid-training, so the base knows <|im_start|>/<|im_end|> and the answer format before SFT.
CHUNK_FLAGS := --context-length 256 --sources default:3 midtrain:1 --max-tokens 6.4e6
PRETRAIN_FLAGS := --preset cpu
SFT_FLAGS :=
RM_FLAGS :=
GRPO_FLAGS := --num-prompts 32 --lr 1e-3 --max-completion-length 64
EVAL_FLAGS :=
REPORT_FLAGS :=
endif
# With several GPUs pretraining runs under DeepSpeed ZeRO-2, one rank per GPU.
PRETRAIN_LAUNCH := $(if $(filter-out 0 1,$(NGPU)),$(VENV)/bin/deepspeed --num_gpus=$(NGPU) PreTrain/model.py --deepspeed PreTrain/ds_config.json,$(PY) PreTrain/model.py)

# Run a stage, print its wall time and record it in report/timings/ for the report card.
define timed
	@mkdir -p report/timings
	@echo "== stage $(1)"
	@start=$$(date +%s%N); $(2) || exit $$?; end=$$(date +%s%N); ms=$$(( (end - start) / 1000000 )); \
	  printf '{"stage": "%s", "seconds": %d.%03d}\n' $(1) $$((ms / 1000)) $$((ms % 1000)) > report/timings/$(1).json; \
	  echo "== stage $(1) took $$((ms / 1000)).$$((ms % 1000 / 100)) s"
endef

.PHONY: setup test bench all clean banner eval chat
FORCE:
setup: $(VENV)/.installed

# Reinstalled only when requirements.txt changes; a second `make setup` does nothing.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# The web UI test drives a real headless Chromium: installed here when missing (CI runs as root on a fresh machine).
test: setup
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver)
	$(PY) -m pytest -q tests

# The web UI load check talks to the trained CPU models, so it runs after `make all`.
bench: setup
	@mkdir -p bench/results
	@for f in $(filter-out bench/bench_webui.py,$(wildcard bench/bench_*.py)); do echo "== $$f"; $(PY) $$f || exit 1; done
	$(MAKE) all
	$(PY) bench/bench_webui.py

# The web UI on this repo's stage outputs: http://127.0.0.1:7860 (python WebUI/app.py --help for host, port, dirs).
chat: setup
	$(PY) WebUI/app.py

# The scale of the last run. A different SCALE (a typo, or a flaky nvidia-smi on a login node) would retrain every
# stage and drop its checkpoints, so it needs NEW_SCALE=1; the stages then drop checkpoints older than their inputs.
.scale: FORCE
	@old=$$(cat $@ 2>/dev/null); if [ -n "$$old" ] && [ "$$old" != "$(SCALE)" ] && [ -z "$(NEW_SCALE)" ]; then \
	  echo "error: the outputs and checkpoints here are from SCALE=$$old; this run is SCALE=$(SCALE) and would replace" \
	       "them. Continue that run with 'make all SCALE=$$old', or start over with 'make all SCALE=$(SCALE) NEW_SCALE=1'" >&2; \
	  exit 2; fi; \
	if [ "$$old" != "$(SCALE)" ]; then echo $(SCALE) > $@; rm -rf report/timings; fi

tokenizer/tokenizer.json: PreTrain/train_byte_level_bpe_tokenizer.py common.py $(wildcard data/default_corpus/*.jsonl.gz) .scale | setup
	$(call timed,tokenizer,$(PY) PreTrain/train_byte_level_bpe_tokenizer.py --force $(TOKENIZER_FLAGS))

pretrain_data_chunks/manifest.json: PreTrain/preprocess_dataset_for_pretrain_map.py tokenizer/tokenizer.json
	$(call timed,chunks,$(PY) PreTrain/preprocess_dataset_for_pretrain_map.py --force $(CHUNK_FLAGS))

# Checkpoints older than a stage's input belong to an earlier run: they are dropped, not resumed from.
output/pretrain_summary.json: PreTrain/model.py pretrain_data_chunks/manifest.json
	@find checkpoints/pretrain -maxdepth 0 ! -newer pretrain_data_chunks/manifest.json -exec rm -rf {} + 2>/dev/null || true
	$(call timed,pretrain,$(PRETRAIN_LAUNCH) --force $(PRETRAIN_FLAGS))

SFT/eval.json: SFT/qlora_fine_tune_trl.py output/pretrain_summary.json
	@find SFT/checkpoints -maxdepth 0 ! -newer output/pretrain_summary.json -exec rm -rf {} + 2>/dev/null || true
	$(call timed,sft,$(PY) SFT/qlora_fine_tune_trl.py --force --merge $(SFT_FLAGS))

RLHF/reward_eval.json: RLHF/reward_model.py RLHF/rlhf_common.py SFT/eval.json
	@find RLHF/checkpoints/reward_model -maxdepth 0 ! -newer SFT/eval.json -exec rm -rf {} + 2>/dev/null || true
	$(call timed,reward_model,$(PY) RLHF/reward_model.py --force $(RM_FLAGS))

RLHF/eval.json: RLHF/grpo_trl.py RLHF/rlhf_common.py RLHF/reward_eval.json
	@find RLHF/checkpoints/grpo -maxdepth 0 ! -newer RLHF/reward_eval.json -exec rm -rf {} + 2>/dev/null || true
	$(call timed,grpo,$(PY) RLHF/grpo_trl.py --force $(GRPO_FLAGS))

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

clean:
	find tokenizer pretrain_data_chunks output -mindepth 1 ! -name README.md -exec rm -rf {} +
	find report -mindepth 1 ! -name README.md ! -name build_report.py -exec rm -rf {} +
	rm -rf .scale checkpoints runs train.log SFT/sft_output SFT/checkpoints SFT/runs SFT/train.log SFT/eval.json \
	       RLHF/reward_model RLHF/grpo_output RLHF/checkpoints RLHF/runs RLHF/train.log RLHF/*eval.json \
	       Eval/results.json Eval/samples
