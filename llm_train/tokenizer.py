"""Special tokens, the chat template and loading a trained tokenizer (with its fingerprint, which lineage records)."""
import hashlib
import json
from pathlib import Path

from llm_train.errors import UserError
from llm_train.paths import TOKENIZER_DIR

EOT = "<|endoftext|>"  # ends a document in pretraining; also bos/eos of the base model
PAD = "<|pad|>"
IM_START = "<|im_start|>"  # ChatML-style turn markers
IM_END = "<|im_end|>"  # ends a chat turn: the chat models' eos
SPECIAL_TOKENS = [EOT, PAD, IM_START, IM_END]

# {% generation %} marks assistant tokens so TRL's assistant_only_loss can mask everything else.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)



def render_messages(messages, add_generation_prompt=False):
    """CHAT_TEMPLATE's text for a list of {role, content} messages, without loading a tokenizer (the tests check
    that it equals tokenizer.apply_chat_template)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def tokenizer_fingerprint(tokenizer_dir):
    """sha256 of what decides token ids (vocab, merges, pre-tokenizer, added tokens) of tokenizer_dir/tokenizer.json.

    The same tokenizer saved to another directory (output/ gets a copy) has the same fingerprint."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{path} not found: train the tokenizer first (python PreTrain/train_byte_level_bpe_tokenizer.py)")
    spec = json.loads(path.read_text(encoding="utf-8"))
    keyed = {k: spec.get(k) for k in ("model", "pre_tokenizer", "added_tokens")}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def load_tokenizer(tokenizer_dir=TOKENIZER_DIR):
    """AutoTokenizer for a trained tokenizer dir, with one clear error if it is missing."""
    from transformers import AutoTokenizer

    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise UserError(f"no tokenizer in {tokenizer_dir}: run `python PreTrain/train_byte_level_bpe_tokenizer.py` first")
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def load_chat_tokenizer(model_dir):
    """The tokenizer saved with a model (or tokenizer/), checked to be a chat tokenizer of this project, with the
    chat template and a pad token guaranteed. The one loader for SFT, RLHF and the inference scripts."""
    tokenizer = load_tokenizer(model_dir)
    if IM_END not in tokenizer.get_vocab():
        raise UserError(f"the tokenizer in {model_dir} has no {IM_END} token, so it cannot hold a chat: retrain it "
                        "with PreTrain/train_byte_level_bpe_tokenizer.py (or pass the right --tokenizer-dir)")
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD if PAD in tokenizer.get_vocab() else tokenizer.eos_token
    return tokenizer

