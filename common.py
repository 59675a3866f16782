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

# OpenMP threads sleep instead of spinning while they wait: spinning made training steps ~3x slower whenever another
# process shared the cores. Set before torch is imported (every stage imports common first).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a save that was killed: never resumed from
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
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
# Compute dtype: decided here only. LLM_TRAIN_DTYPE=bf16|fp32 forces it for every stage (the tests run the
# precision-sensitive cases under both); auto = bf16 on CUDA (fp16 on pre-Ampere GPUs where allowed) and on CPUs
# with bf16 matmul units (AMX / AVX512-BF16), else fp32: on an AVX2-only CPU a bf16 matmul is ~100x slower.
DTYPE_ENV = "LLM_TRAIN_DTYPE"
DTYPES = ("auto", "bf16", "fp32")


def cpu_has_fast_bf16():
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def dtype_name(requested=None, allow_fp16=False):
    """'bf16' or 'fp32' (or 'fp16' with allow_fp16, on GPUs without bf16) for a --dtype value; None or 'auto'
    defers to $LLM_TRAIN_DTYPE, then to the hardware."""
    if requested in (None, "auto"):
        requested = os.environ.get(DTYPE_ENV) or "auto"
    if requested not in DTYPES:
        raise UserError(f"dtype {requested!r} (from --dtype or ${DTYPE_ENV}) must be one of {', '.join(DTYPES)}")
    if requested != "auto":
        return requested
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() or not allow_fp16 else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def compute_dtype(requested=None, allow_fp16=False):
    """The torch dtype of dtype_name()."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name(requested, allow_fp16)]


# ---------------------------------------------------------------------------------------------------------------
# Lineage: every stage output holds lineage.json = {stage, settings, tokenizer_fingerprint, parents: {role: {path,
# fingerprint}}}. A stage that loads outputs of earlier stages checks that they still are the ones it was built
# from; a stage asked to replace an output that later stages were built from refuses without --force.
LINEAGE = "lineage.json"


def output_fingerprint(path):
    """sha256 of what an output *is*: a model dir's weights (*.safetensors), a chunks dir's manifest, or a
    tokenizer dir's tokenizer fingerprint."""
    path = Path(path)
    weights = sorted(path.glob("*.safetensors"))
    if weights:
        h = hashlib.sha256()
        for f in weights:
            with open(f, "rb") as fh:
                h.update(hashlib.file_digest(fh, "sha256").digest())
        return h.hexdigest()
    if (path / "manifest.json").is_file():
        return hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    if (path / "tokenizer.json").is_file():
        return tokenizer_fingerprint(path)
    return None


def read_lineage(path):
    try:
        return json.loads((Path(path) / LINEAGE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def write_lineage(out_dir, stage, settings, tokenizer_dir=None, **parents):
    """Record in out_dir (usually the temporary dir about to be renamed into place) what it was built from."""
    lineage = {"stage": stage, "settings": settings,
               "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer_dir or out_dir) if (
                   Path(tokenizer_dir or out_dir) / "tokenizer.json").is_file() else None,
               "parents": {role: {"path": str(Path(p).resolve()), "fingerprint": output_fingerprint(p)}
                           for role, p in parents.items() if p is not None}}
    atomic_write_json(Path(out_dir) / LINEAGE, lineage)
    return lineage


def check_lineage(child_dir, rerun, **parents):
    """UserError if child_dir was built from another version of one of the given parent dirs (e.g. an adapter
    trained on an older base): names both directories and the command `rerun` that rebuilds the child.
    Outputs without lineage.json (made elsewhere) are not checked."""
    lineage = read_lineage(child_dir)
    if lineage is None:
        return
    for role, parent in parents.items():
        recorded = lineage.get("parents", {}).get(role)
        if parent is None or recorded is None:
            continue
        if recorded["fingerprint"] != output_fingerprint(parent):
            raise UserError(f"{child_dir} was built from a different {role} than the one now in {parent} (it was "
                            f"replaced after {child_dir} was made): they do not belong together. Rebuild it with "
                            f"`{rerun}`, or point to the matching {role} directory")


def stale_if_replaced(path):
    """The known stage outputs that were built from the output in `path` as it is now (they would silently go
    stale if it were replaced)."""
    path = Path(path).resolve()
    current = output_fingerprint(path)
    if current is None:
        return []
    stale = []
    for other in (CHUNKS_DIR, OUTPUT_DIR, SFT_OUTPUT_DIR, SFT_OUTPUT_DIR / "merged", REWARD_MODEL_DIR,
                  GRPO_OUTPUT_DIR):
        lineage = read_lineage(other)
        if lineage and any(Path(r["path"]) == path and r["fingerprint"] == current
                           for r in lineage.get("parents", {}).values()):
            stale.append(str(other.relative_to(REPO)) if other.is_relative_to(REPO) else str(other))
    return stale


def refuse_to_replace(path, force, what):
    """Before replacing an existing output: UserError unless --force when later stages were built from it."""
    stale = stale_if_replaced(path)
    if stale and not force:
        raise UserError(f"{path} already holds a {what} that {', '.join(stale)} were built from: replacing it would "
                        f"leave them stale. Pass --force to replace it (then rerun the later stages), or write to "
                        f"another --output-dir; nothing was changed")


def already_done(out_dir, stage, settings, **parents):
    """True (and says so) when out_dir holds this stage's finished output made with exactly these settings from the
    parent outputs (dirs) as they are now; a parent replaced since then means the output must be rebuilt."""
    lineage = read_lineage(out_dir)
    if not lineage or lineage.get("stage") != stage or lineage.get("settings") != settings:
        return False
    recorded = lineage.get("parents", {})
    if any(p is not None and role in recorded and recorded[role]["fingerprint"] != output_fingerprint(p)
           for role, p in parents.items()):
        return False
    print(f"{stage}: {out_dir} is already finished with these settings; nothing to do "
          f"(delete it or pass --force to redo it)", flush=True)
    return True


def settings_of(args, *names):
    """The settings that decide an output, as JSON-safe values (compared by already_done)."""
    return {n: (str(v) if isinstance(v, Path) else v) for n, v in ((n, getattr(args, n)) for n in names)}


def latest_trainer_checkpoint(checkpoint_dir):
    """The newest checkpoint-N of a transformers Trainer run that is complete: trainer_state.json is written last,
    so a checkpoint cut short by a kill lacks it and is skipped. None if there is none."""
    done = [d for d in Path(checkpoint_dir).glob("checkpoint-*")
            if d.name.split("-")[-1].isdigit() and (d / "trainer_state.json").is_file()]
    return str(max(done, key=lambda d: int(d.name.split("-")[-1]))) if done else None


# ---------------------------------------------------------------------------------------------------------------
# Command-line number checks, for argparse `type=`: a bad value is one clear usage error at parse time.
def positive_int(text):
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def nonnegative_int(text):
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text):
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def nonnegative_float(text):
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be 0 or a positive number, got {text}")
    return value


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


# ---------------------------------------------------------------------------------------------------------------
# Chat models: loading the SFT policy, rendering chats, generating, scoring (RLHF's reward model, GRPO and its
# plain-PyTorch twin). torch and transformers are imported inside, so importing common stays cheap.
def find_policy(sft_dir, base_dir):
    """Where the SFT policy is: ('full', dir) for a full model dir (SFT's merged/ or any HF causal LM),
    ('adapter', sft_dir) for a LoRA adapter on base_dir, or a UserError saying what to run first."""
    sft_dir, base_dir = Path(sft_dir), Path(base_dir)
    if (sft_dir / "merged" / "config.json").is_file():
        return "full", sft_dir / "merged"
    if (sft_dir / "adapter_config.json").is_file():
        if not (base_dir / "config.json").is_file():
            raise UserError(f"{sft_dir} holds a LoRA adapter but its base model {base_dir} is missing: "
                                   "pretrain first or pass --base-dir")
        return "adapter", sft_dir
    if (sft_dir / "config.json").is_file():
        return "full", sft_dir
    raise UserError(f"no SFT model in {sft_dir}: run `python SFT/qlora_fine_tune_trl.py` first "
                           "(or pass --sft-dir DIR with a Hugging Face causal LM)")


def load_policy(sft_dir, base_dir, dtype=None):
    """(model, tokenizer) of the SFT policy: merged dir if present, else base + adapter merged in memory."""
    import torch

    dtype = dtype or torch.float32
    from transformers import AutoModelForCausalLM

    kind, path = find_policy(sft_dir, base_dir)
    if kind == "full":
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
        model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    tok = load_chat_tokenizer(path if (Path(path) / "tokenizer.json").is_file() else base_dir)
    # Generation stops at the end of the assistant turn (and, as a fallback, at the end of a document).
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(EOT)]
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def render_chat(tokenizer, prompt, completion=None):
    """Chat-template text of prompt messages (+ the assistant's completion, or the generation prompt if None)."""
    messages = list(prompt) + ([] if completion is None else [{"role": "assistant", "content": completion}])
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=completion is None)


def reward_model_scores(reward_model, tokenizer, prompts, completions, batch_size=32):
    """Reward-model score of each (prompt messages, completion text): rendered with the chat template exactly as
    RewardTrainer and GRPOTrainer render it (no extra special tokens), right-padded (the score is read at the last
    real token), and cut from the left if longer than the model's context."""
    import torch

    max_len = reward_model.config.max_position_embeddings
    device = next(reward_model.parameters()).device
    scores = []
    for i in range(0, len(prompts), batch_size):
        texts = [render_chat(tokenizer, p, c) for p, c in zip(prompts[i:i + batch_size], completions[i:i + batch_size])]
        ids = [x[-max_len:] for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        width = max(map(len, ids))
        input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
        with torch.no_grad():
            scores += reward_model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().tolist()
    return scores


def exact_answer_reward(completions, answers):
    """1.0 where a completion states the task's exact answer ("The answer is N." / "答案是N。"), else 0.0;
    None for prompts without a verifiable answer (TRL then leaves this reward out for them)."""
    return [None if a is None else float(extract_answer(c) == a) for c, a in zip(completions, answers)]


PREFERENCE_FILES = {"train": REPO / "RLHF" / "data" / "preference_train.jsonl.gz",
                    "heldout": REPO / "RLHF" / "data" / "preference_heldout.jsonl.gz"}


def rlhf_prompts(split, n_arithmetic, n_conversation, seed=0):
    """Prompts for GRPO and its evaluation: arithmetic problems (with their exact answer) and chatterbot
    conversation prompts from the embedded preference data (answer None), of one split ('train'/'heldout')."""
    prompts = [{"prompt": [{"role": "user", "content": t["prompt"]}], "answer": t["answer"]}
               for t in arithmetic_tasks(n_arithmetic, split, seed=seed)]
    seen = set()
    for row in read_jsonl_gz(PREFERENCE_FILES[split]):
        key = json.dumps(row["prompt"], ensure_ascii=False)
        if row["source"] == "chatterbot" and key not in seen and len(seen) < n_conversation:
            seen.add(key)
            prompts.append({"prompt": row["prompt"], "answer": None})
    return prompts


def prompt_token_ids(tokenizer, prompts):
    """Token ids of each prompt exactly as GRPOTrainer makes them: chat template + generation prompt, no BOS."""
    return tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def generate_completions(model, tokenizer, prompts, max_new_tokens, do_sample, temperature=1.0, batch_size=32):
    """(completion token ids, completion texts) for each prompt (list of messages). Stops at <|im_end|>;
    the ids include the stop token, the text leaves special tokens out. (generate() runs without autograd.)"""
    import torch

    device = next(model.parameters()).device
    all_ids, texts = [], []
    for i in range(0, len(prompts), batch_size):
        room = max(model.config.n_positions - max_new_tokens, 1)  # keep the end of a prompt that is too long
        ids = [x[-room:] for x in prompt_token_ids(tokenizer, prompts[i:i + batch_size])]
        width = max(map(len, ids))  # left-pad so every prompt ends where generation starts
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=do_sample, temperature=temperature if do_sample else None, top_k=0 if do_sample else None,
                             top_p=1.0 if do_sample else None, eos_token_id=model.generation_config.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)[:, width:].tolist()
        for seq in out:
            stops = [j for j, t in enumerate(seq) if t in model.generation_config.eos_token_id]
            seq = seq[:stops[0] + 1] if stops else seq
            all_ids.append(seq)
            texts.append(tokenizer.decode(seq, skip_special_tokens=True))
    return all_ids, texts


def completion_logps(model, prompt_ids, completion_ids, temperature=1.0):
    """Per-token log-probabilities of each completion given its prompt, as a (B, T) tensor padded with 0, and
    the (B, T) completion mask. Logits are divided by the sampling temperature, as TRL does."""
    import torch

    device = next(model.parameters()).device
    width_p, width_c = max(map(len, prompt_ids)), max(map(len, completion_ids))
    rows, masks, cmask = [], [], []
    for p, c in zip(prompt_ids, completion_ids):
        rows.append([0] * (width_p - len(p)) + p + c + [0] * (width_c - len(c)))
        masks.append([0] * (width_p - len(p)) + [1] * (len(p) + len(c)) + [0] * (width_c - len(c)))
        cmask.append([1] * len(c) + [0] * (width_c - len(c)))
    input_ids, attention_mask = torch.tensor(rows, device=device), torch.tensor(masks, device=device)
    cmask = torch.tensor(cmask, device=device, dtype=torch.float32)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, width_p - 1:-1].float() / temperature
    logps = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, width_p:, None]).squeeze(-1)
    return logps * cmask, cmask
