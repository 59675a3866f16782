"""llm_train's shared library: what more than one stage needs, one small module per concern.

    paths         where each stage reads and writes by default
    errors        UserError and run_main: one clear line and exit status 2 instead of a traceback
    atomic        atomic file and directory writes
    cli           argparse number types, presets, the settings that decide an output
    runtime       device, compute dtype (bf16/fp32, LLM_TRAIN_DTYPE), autocast, ending a multi-process run
    lineage       lineage.json: what each output was built from; no-op reruns; refusing to strand later stages
    trainer_runs  resuming a Trainer run (SFT, reward model, GRPO) only from its own checkpoints
    tokenizer     special tokens, the chat template, loading a trained tokenizer
    corpus        the embedded corpus and local text files
    sources       named Hugging Face datasets and their cleaners
    chunks        reading the pretraining chunks a batch at a time
    arithmetic    the verifiable arithmetic task family
    rl            the SFT policy, reward model scores and rewards (post-training, chat front ends)
    sampling      sampling completions and scoring their log-probabilities

Installed in editable mode by `make setup` (requirements.txt's `-e .`), so every script imports it from anywhere.
"""
import os

# OpenMP threads sleep instead of spinning while they wait: spinning made training steps ~3x slower whenever another
# process shared the cores. Set before torch is imported (every stage imports llm_train first).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
