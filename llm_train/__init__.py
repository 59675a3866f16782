"""llm_train's shared library: what more than one script needs, one small module per concern.

Basics
    paths             where each stage reads and writes by default
    errors            UserError and run_main: one clear line and exit status 2 instead of a traceback
    atomic            atomic file and directory writes
    cli               argparse number types, presets, the settings that decide an output
    runtime           device, compute dtype (bf16/fp32, LLM_TRAIN_DTYPE), autocast, ending a multi-process run
Stage outputs
    stage             Stage: the protocol of every training stage (no-op rerun, refuse, writable, resume, output)
    lineage           lineage.json: what each output was built from
    stage_files       reading what the stages wrote (report card, web UI)
    webui_views       the web UI's Training tab figures; server paths shown repo-relative
Data
    tokenizer         special tokens, the chat template, loading a trained tokenizer
    corpus            the embedded corpus and local text files
    sources           named Hugging Face datasets and their cleaners
    chunks            writing and reading the pretraining chunks
    arithmetic        the verifiable arithmetic task family
    conversations     SFT's conversation files
Pretraining
    gpt               the GPT model and its Hugging Face export
    pretrain_data     manifest checks, train/val rows, the rows of each step
    pretrain_schedule global batch -> micro batches, steps and the learning-rate schedule
    pretrain_checkpoint  checkpoints: save, resume (RNG included), prune
    distributed       ranks and devices of torchrun / DeepSpeed launches
    throughput        peak FLOP/s (MFU) and peak memory
    train_log         train.log, TensorBoard scalars
Post-training and generation
    trainer_runs      Trainer runs (SFT, reward model, GRPO): resume only their own checkpoints, logs, history
    rl                the SFT policy, reward model scores and rewards
    grpo              TRL's GRPOTrainer as RLHF/grpo_trl.py runs it
    engine            the one generation engine: sampling settings, stop tokens, context window, streaming
    sampling          log-probabilities of sampled completions

Installed in editable mode by `make setup` (requirements.txt's `-e .`), so every script imports it from anywhere.
"""
import os

# OpenMP threads sleep instead of spinning while they wait: spinning made training steps ~3x slower whenever another
# process shared the cores. Set before torch is imported (every stage imports llm_train first).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
