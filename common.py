"""Code that more than one stage needs, kept in one place: repo paths, special tokens and the chat template,
the tokenizer fingerprint, user-facing errors, atomic writes, the embedded corpus reader and the verifiable
arithmetic task family that SFT and RLHF share.

Stage scripts import it after putting the repo root on sys.path, so they run from any directory:

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import common
"""
import contextlib
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent
DATA_DIR = REPO / "data" / "default_corpus"
TOKENIZER_DIR = REPO / "tokenizer"
CHUNKS_DIR = REPO / "pretrain_data_chunks"
OUTPUT_DIR = REPO / "output"
SFT_OUTPUT_DIR = REPO / "SFT" / "sft_output"
REWARD_MODEL_DIR = REPO / "RLHF" / "reward_model"
GRPO_OUTPUT_DIR = REPO / "RLHF" / "grpo_output"

# ---------------------------------------------------------------------------------------------------------------
# Special tokens and the chat template: one definition, used by the tokenizer stage, SFT and RLHF.
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


# ---------------------------------------------------------------------------------------------------------------
# Errors the user can fix: one line naming the file and the fix, exit code 2, no traceback.
class UserError(Exception):
    pass


def run_main(main):
    """Call main(); turn a UserError into one clear line on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------------------------
# Atomic writes: a reader (or a resumed run) never sees a half-written file or directory.
def atomic_write_bytes(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; outputs are meant to be shared
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary sibling directory; on success it replaces `path` in one rename (old one removed after).

    A README.md in the old directory (the committed ones in tokenizer/, output/, ...) is carried over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700
    try:
        yield tmp
        if (path / "README.md").is_file() and not (tmp / "README.md").exists():
            shutil.copy2(path / "README.md", tmp / "README.md")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_writable_dir(path):
    """Create `path` if needed and prove we can write there, before any long work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test"):
            pass
    except OSError as e:
        raise UserError(f"cannot write to output directory {path} ({e.strerror}): choose another with the output flag "
                        "or fix its permissions") from None


# ---------------------------------------------------------------------------------------------------------------
# The embedded default corpus: gzip JSON Lines, one {"text", "source", "lang"} document per line.
def default_corpus_files(split="train"):
    """Training files (split='train') or held-out files (split='heldout') of the embedded corpus."""
    files = sorted(DATA_DIR.glob("*.jsonl.gz"))
    held = [f for f in files if f.name.startswith("heldout_")]
    return held if split == "heldout" else [f for f in files if f not in held]


TXT_DOC_CHARS = 65536  # .txt files are cut at the first blank line after this many characters


def read_text_file(path):
    """Yield the documents of one local file; a binary or non-UTF-8 file is a UserError naming the file."""
    path = Path(path)
    name = path.name
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if "text" not in table.column_names:
                raise UserError(f"{path}: parquet file has no 'text' column (columns: {table.column_names})")
            yield from (t for t in table.column("text").to_pylist() if t)
        elif name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                for row, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise UserError(f"{path}, line {row}: expected a JSON object with a \"text\" field") from None
                    if text:
                        yield text
        else:
            data = path.read_bytes()
            if b"\x00" in data[:8192]:
                raise UserError(f"{path} looks binary (NUL bytes): give text, .jsonl or .parquet files")
            text = data.decode("utf-8")
            start = 0
            while start < len(text):  # one document per ~64 KB, so a single big file still gets a val share
                cut = text.find("\n\n", start + TXT_DOC_CHARS)
                end = len(text) if cut < 0 else cut + 2
                if text[start:end].strip():
                    yield text[start:end]
                start = end
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        what = f"not valid UTF-8 (byte {e.start})" if isinstance(e, UnicodeDecodeError) else f"unreadable ({e})"
        raise UserError(f"{path} is {what}: convert it to UTF-8 text / fix the file, or remove it") from None


def read_jsonl_gz(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


# ---------------------------------------------------------------------------------------------------------------
# Verifiable tasks: arithmetic word problems in English and Chinese with one exact integer answer.
# SFT trains on them, RLHF rewards exact answers on them. A problem's split is decided by a hash of its text,
# so the held-out split can never overlap training, whatever seed or count generated it.
EN_ITEMS = ["apples", "books", "pencils", "coins", "stamps", "marbles", "cookies", "flowers"]
ZH_ITEMS = ["苹果", "本书", "支铅笔", "枚硬币", "张邮票", "颗弹珠", "块饼干", "朵花"]
EN_NAMES = ["Tom", "Anna", "Li Wei", "Maria", "Sam", "Priya", "Omar", "Kate"]
ZH_NAMES = ["小明", "小红", "李华", "王芳", "张伟", "小刚", "刘洋", "陈静"]


def _arith_problem(rng, lang):
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(["add", "sub", "mul"])
    if op == "sub" and b > a:
        a, b = b, a
    if op == "mul":
        b = rng.randint(2, 12)
    answer = {"add": a + b, "sub": a - b, "mul": a * b}[op]
    i = rng.randrange(len(EN_ITEMS))
    name = rng.choice(EN_NAMES if lang == "en" else ZH_NAMES)
    if lang == "en":
        item = EN_ITEMS[i]
        text = {
            "add": f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
            "sub": f"{name} has {a} {item} and gives away {b}. How many {item} are left?",
            "mul": f"{name} buys {b} boxes with {a} {item} in each box. How many {item} is that in total?",
        }[op]
    else:
        item = ZH_ITEMS[i]
        text = {
            "add": f"{name}有{a}{item}，又得到了{b}{item}。{name}现在一共有多少{item}？",
            "sub": f"{name}有{a}{item}，送给别人{b}{item}。还剩多少{item}？",
            "mul": f"{name}买了{b}盒，每盒有{a}{item}。一共有多少{item}？",
        }[op]
    return text, answer


def arithmetic_split(prompt):
    """'heldout' for about 10% of problems, chosen by a hash of the text; 'train' otherwise."""
    return "heldout" if hashlib.sha1(prompt.encode()).digest()[0] < 26 else "train"


def arithmetic_tasks(n, split, seed=0):
    """n distinct problems of one split: dicts with prompt, answer (int), lang and the reference response."""
    rng = random.Random(seed)
    seen, tasks = set(), []
    while len(tasks) < n:
        lang = rng.choice(["en", "zh"])
        prompt, answer = _arith_problem(rng, lang)
        if prompt in seen or arithmetic_split(prompt) != split:
            continue
        seen.add(prompt)
        response = f"The answer is {answer}." if lang == "en" else f"答案是{answer}。"
        tasks.append({"prompt": prompt, "answer": answer, "lang": lang, "response": response})
    return tasks


_ANSWER_RE = re.compile(r"(?:answer is|答案是)\s*(-?\d+)")


def extract_answer(text):
    """The integer after 'The answer is' / '答案是' in a model's response, or None."""
    m = _ANSWER_RE.search(text)
    return int(m.group(1)) if m else None
