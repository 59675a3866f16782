"""Where each stage reads and writes by default: the repo and its stage output directories."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "data" / "default_corpus"
TOKENIZER_DIR = REPO / "tokenizer"
CHUNKS_DIR = REPO / "pretrain_data_chunks"
OUTPUT_DIR = REPO / "output"
SFT_OUTPUT_DIR = REPO / "SFT" / "sft_output"
REWARD_MODEL_DIR = REPO / "RLHF" / "reward_model"
GRPO_OUTPUT_DIR = REPO / "RLHF" / "grpo_output"
SFT_CHAT_FILE = REPO / "SFT" / "data" / "chatterbot_sft.jsonl.gz"  # embedded conversations (SFT, midtraining)
PREFERENCE_FILES = {"train": REPO / "RLHF" / "data" / "preference_train.jsonl.gz",
                    "heldout": REPO / "RLHF" / "data" / "preference_heldout.jsonl.gz"}


def load_script(relpath):
    """Import a stage script (e.g. 'PreTrain/model.py') as a module without running its main(): for tests and
    benchmarks, which measure the stages' own functions. Stages themselves never import each other."""
    import importlib.util

    path = REPO / relpath
    name = "stage_" + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module
