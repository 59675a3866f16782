# llm_train: `make all` runs the pipeline on the embedded corpus, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU default: a small vocabulary so the whole pipeline fits in minutes on a laptop.
VOCAB ?= 8192
# CPU default context: matches PreTrain/model.py's cpu preset (smaller presets cut rows into windows).
CONTEXT ?= 256

.PHONY: setup test bench all clean
setup: $(VENV)/.installed

# Reinstalled only when requirements.txt changes; a second `make setup` does nothing.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

test: setup
	$(PY) -m pytest -q tests

bench: setup
	@mkdir -p bench/results
	@for f in bench/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

tokenizer/tokenizer.json: PreTrain/train_byte_level_bpe_tokenizer.py common.py $(wildcard data/default_corpus/*.jsonl.gz) | setup
	$(PY) PreTrain/train_byte_level_bpe_tokenizer.py --vocab-size $(VOCAB)

pretrain_data_chunks/manifest.json: PreTrain/preprocess_dataset_for_pretrain_map.py tokenizer/tokenizer.json | setup
	$(PY) PreTrain/preprocess_dataset_for_pretrain_map.py --context-length $(CONTEXT)

all: pretrain_data_chunks/manifest.json

clean:
	find tokenizer pretrain_data_chunks output report -mindepth 1 ! -name README.md -exec rm -rf {} +
	rm -rf checkpoints runs train.log SFT/sft_output SFT/checkpoints SFT/runs SFT/train.log SFT/eval.json \
	       RLHF/reward_model RLHF/grpo_output RLHF/checkpoints RLHF/runs RLHF/train.log RLHF/*eval.json
