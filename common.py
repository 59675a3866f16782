"""Code that more than one stage needs, kept in one place: repo paths, special tokens and the chat template,
the tokenizer fingerprint, user-facing errors, atomic writes, the embedded corpus reader, the named Hugging Face text
sources with their cleaners (tokenizer and chunks stages), the reader of the pretraining chunks, resuming a Trainer
run only from its own checkpoints (SFT, reward model, GRPO) and the verifiable arithmetic task family that SFT and
RLHF share.

Stage scripts import it after putting the repo root on sys.path, so they run from any directory:

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import common
"""
import codecs
import contextlib
import glob
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
from html.parser import HTMLParser
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

SFT_CHAT_FILE = REPO / "SFT" / "data" / "chatterbot_sft.jsonl.gz"  # embedded conversations (SFT, midtraining)


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
    """Call main(); turn a UserError into one clear line on stderr and exit status 2.

    A rank other than 0 of a multi-process launch ends with os._exit(0) once main() has returned: it has nothing
    left to write, and skipping the interpreter's finalization skips the teardown of gloo's C++ threads, which can
    abort the process ("terminate called without an active exception", the 2-process GRPO and SFT tests, about
    one run in twenty, also after the process group was destroyed)."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("RANK", "0")) > 0:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


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
# from; a stage asked to replace an output that later stages were built from refuses without --force. A parent
# inside the repo is recorded relative to it, so a copied or moved checkout still finds its own parents.
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
    """The lineage.json of the output dir `path` (None if it has none), parent paths made absolute."""
    try:
        lineage = json.loads((Path(path) / LINEAGE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    for recorded in lineage.get("parents", {}).values():
        recorded["path"] = str(REPO / recorded["path"])  # a relative path is the repo's; an absolute one stays
    return lineage


def recorded_parents(out_dir):
    """The parent dirs out_dir's lineage names that still exist, by role (for check_lineage): a parent replaced
    since makes out_dir stale, one deleted since cannot be checked."""
    parents = (read_lineage(out_dir) or {}).get("parents", {})
    return {role: r["path"] for role, r in parents.items() if Path(r["path"]).exists()}


def _lineage_path(path):
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def write_lineage(out_dir, stage, settings, tokenizer_dir=None, **parents):
    """Record in out_dir (usually the temporary dir about to be renamed into place) what it was built from."""
    lineage = {"stage": stage, "settings": settings,
               "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer_dir or out_dir) if (
                   Path(tokenizer_dir or out_dir) / "tokenizer.json").is_file() else None,
               "parents": {role: {"path": _lineage_path(p), "fingerprint": output_fingerprint(p)}
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
            raise UserError(f"{child_dir} was built from a different {role} than the one in {parent} (replaced "
                            f"since, or another directory): they do not belong together. Rebuild it with `{rerun}`, "
                            f"or point to the matching {role} directory")


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


def check_output_dir(out_dir, stage, what):
    """Before a stage replaces out_dir: it must be missing, empty (but for README.md and hidden work files), or a
    previous output of this stage (its lineage.json says so); anything else is left alone with one UserError."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} exists and is not a directory: choose another output directory")
    names = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith(".") and p.name != "README.md") \
        if out_dir.is_dir() else []
    if names and (read_lineage(out_dir) or {}).get("stage") != stage:
        raise UserError(f"{out_dir} holds files that are not a previous {what} output ({', '.join(names[:5])}): "
                        "move them away or choose another output directory; nothing was written")


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


def apply_preset(args, presets, default):
    """Fill each flag left unset (None) from the preset args.preset (or `default`): a flag given on the command line
    wins over its preset's value."""
    args.preset = args.preset or default
    for key, value in presets[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def default_scale():
    """The post-training preset for this machine: the full-size one with a GPU."""
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def latest_trainer_checkpoint(checkpoint_dir):
    """The newest checkpoint-N of a transformers Trainer run that is complete: trainer_state.json is written last,
    so a checkpoint cut short by a kill lacks it and is skipped. None if there is none."""
    done = [d for d in Path(checkpoint_dir).glob("checkpoint-*")
            if d.name.split("-")[-1].isdigit() and (d / "trainer_state.json").is_file()]
    return str(max(done, key=lambda d: int(d.name.split("-")[-1]))) if done else None


# ---------------------------------------------------------------------------------------------------------------
# Trainer runs (SFT, reward model, GRPO): what a rerun resumes, and finishing a run whose last checkpoint is
# already written. The checkpoint dir holds a lineage.json of the run that writes it.
def _difference(run, stage, settings, may_grow, parents):
    """Why checkpoints of the recorded `run` cannot be continued by this one (None if they can)."""
    if run is None or run.get("stage") != stage:
        return "no record of the run that wrote them"
    old = run.get("settings", {})
    for key in sorted(set(old) | set(settings)):
        a, b = old.get(key), settings.get(key)
        if a != b and not (key in may_grow and a is not None and b is not None and b > a):
            if key.endswith("_sha256"):  # a fingerprint of the training data: its values say nothing
                return f"it trained on other data ({key} differs)"
            if key == "dtype":
                return f"compute dtype {a} there, {b} now; {DTYPE_ENV}={a} picks the same"
            return f"{'processes' if key == 'processes' else '--' + key.replace('_', '-')} {a} there, {b} now"
    for role, path in parents.items():
        recorded = run.get("parents", {}).get(role)
        if (recorded and recorded["fingerprint"]) != (path and output_fingerprint(path)):
            was = recorded["path"] if recorded else "none"
            return f"its {role} was {was}, now {path or 'none'} (or it changed since)"
    return None


def checkpoint_to_resume(ckpt_dir, stage, settings, force, may_grow=(), **parents):
    """(checkpoint to resume from or None, whether it is the run's last step) for a Trainer run writing to
    ckpt_dir. The checkpoints must come from a run with the same settings and parents, recorded in
    ckpt_dir/lineage.json; settings in may_grow may only be larger now (more epochs at a constant learning rate
    continue that run exactly). Otherwise: a UserError saying what differs, or with force, a fresh start.
    Call it on every process: they all read the checkpoints before the main one changes anything."""
    from accelerate import PartialState

    ckpt_dir = Path(ckpt_dir)
    latest = latest_trainer_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
    run = read_lineage(ckpt_dir)
    why = latest and _difference(run, stage, settings, may_grow, parents)
    if why and not force:
        raise UserError(f"{ckpt_dir} holds checkpoints of another run ({why}): rerun with that run's flags to "
                        f"finish it, or pass --force to discard them and start over")
    finished = False
    if latest and not why and run["settings"] == settings:
        done = json.loads((Path(latest) / "trainer_state.json").read_text())
        finished = done["global_step"] >= done["max_steps"]
    state = PartialState()  # under a launcher: the process group, so that the processes can wait for each other
    state.wait_for_everyone()
    if state.is_main_process:
        if why:
            print(f"{ckpt_dir} holds checkpoints of another run ({why}): --force, so starting over", flush=True)
            shutil.rmtree(ckpt_dir)
        write_lineage(ckpt_dir, stage, settings, **parents)
    state.wait_for_everyone()
    return (None, False) if why else (latest, finished)


def end_distributed(wait=True):
    """Wait for every rank (unless wait=False: after an error, when the others may never come), then destroy the
    process group, if any (each rank, after its last collective), so no rank leaves with collective work in flight
    while rank 0 goes on alone (see run_main for how the others exit)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def train_or_finish(trainer, resume, finished):
    """trainer.train(), resuming from checkpoint `resume`. A checkpoint at the run's last step is only loaded:
    the Trainer would otherwise train one step past the end before noticing it is done."""
    if finished:
        from transformers import TrainerState

        trainer._load_from_checkpoint(resume)
        trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        return
    trainer.train(resume_from_checkpoint=resume)


# ---------------------------------------------------------------------------------------------------------------
# Command-line number checks, for argparse `type=`: a bad value is one clear usage error at parse time.
def _number(text, convert, ok, need):
    import argparse

    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if convert is int else 'a number'}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
    return value


def positive_int(text):
    return _number(text, int, lambda v: v >= 1, "at least 1")


def nonnegative_int(text):
    return _number(text, int, lambda v: v >= 0, "0 or more")


def positive_float(text):
    import math

    return _number(text, float, lambda v: v > 0 and math.isfinite(v), "a positive number")


def nonnegative_float(text):
    import math

    return _number(text, float, lambda v: v >= 0 and math.isfinite(v), "0 or a positive number")


# ---------------------------------------------------------------------------------------------------------------
# The embedded default corpus: gzip JSON Lines, one {"text", "source", "lang"} document per line.
def default_corpus_files(split="train"):
    """Training files (split='train') or held-out files (split='heldout') of the embedded corpus."""
    files = sorted(DATA_DIR.glob("*.jsonl.gz"))
    held = [f for f in files if f.name.startswith("heldout_")]
    return held if split == "heldout" else [f for f in files if f not in held]


TXT_DOC_CHARS = 65536  # .txt files are cut at the first blank line after this many characters


def read_text_file(path):
    """Yield the documents of one local file; a binary or non-UTF-8 file is a UserError naming the file.
    Streams: memory stays bounded by one document (or one parquet batch), whatever the file's size."""
    path = Path(path)
    name = path.name
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(path)
            if "text" not in parquet.schema_arrow.names:
                raise UserError(f"{path}: parquet file has no 'text' column (columns: {parquet.schema_arrow.names})")
            for batch in parquet.iter_batches(batch_size=1024, columns=["text"]):
                yield from (t for t in batch.column(0).to_pylist() if t)
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
            with open(path, "rb") as f:
                if b"\x00" in f.read(8192):
                    raise UserError(f"{path} looks binary (NUL bytes): give text, .jsonl or .parquet files")
                f.seek(0)
                # one document per ~64 KB (cut at a blank line), so a single big file still gets a val share
                decoder, text, offset = codecs.getincrementaldecoder("utf-8")(), "", 0
                while True:
                    block, pending = f.read(1 << 20), len(decoder.getstate()[0])
                    try:
                        text += decoder.decode(block, final=not block)
                    except UnicodeDecodeError as e:
                        e.start += offset - pending  # the file's byte, not the block's
                        raise
                    offset += len(block)
                    start = 0
                    while True:
                        cut = text.find("\n\n", start + TXT_DOC_CHARS)
                        if cut < 0:
                            break
                        if text[start:cut + 2].strip():
                            yield text[start:cut + 2]
                        start = cut + 2
                    text = text[start:]
                    if not block:
                        break
                if text.strip():
                    yield text
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        what = f"not valid UTF-8 (byte {e.start})" if isinstance(e, UnicodeDecodeError) else f"unreadable ({e})"
        raise UserError(f"{path} is {what}: convert it to UTF-8 text / fix the file, or remove it") from None


def read_jsonl_gz(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


# ---------------------------------------------------------------------------------------------------------------
# Named datasets on the Hugging Face hub, for the tokenizer (stage 1) and the chunks (stage 2): where they live
# (ids, configs, splits and fields as on their dataset cards) and how a row becomes one clean document.
class _HTMLText(HTMLParser):
    """Text of an HTML fragment: entities unescaped, tags dropped, <pre>/<code> contents kept as they are,
    paragraphs and list items on lines of their own."""
    PARAGRAPH = {"p", "pre", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "table", "hr", "div"}
    LINE = {"li", "tr", "br", "dd", "dt"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.in_pre, self.newlines = [], 0, 2

    def _add(self, text):
        if text:
            self.parts.append(text)
            body = text.rstrip("\n")
            self.newlines = len(text) - len(body) + (0 if body else self.newlines)

    def _break(self, n):
        self._add("\n" * max(0, n - self.newlines))

    def handle_starttag(self, tag, attrs):
        self._break(2 if tag in self.PARAGRAPH else 1 if tag in self.LINE else 0)
        if tag == "li":
            self._add("- ")
        self.in_pre += tag == "pre"

    def handle_endtag(self, tag):
        self.in_pre -= tag == "pre" and self.in_pre > 0
        self._break(2 if tag in self.PARAGRAPH else 1 if tag in self.LINE - {"br"} else 0)

    def handle_data(self, data):
        if not self.in_pre:  # outside <pre> a run of whitespace (newlines too) is one space, as browsers show it
            data = re.sub(r"\s+", " ", data)
            if self.newlines:
                data = data.lstrip(" ")
        self._add(data)


def html_to_text(html):
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    return re.sub(r" +\n", "\n", "".join(parser.parts)).strip()


_GUTENBERG_START = re.compile(r"\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG[^*]*\*\*\*[^\n]*\n?", re.I)
_GUTENBERG_END = re.compile(r"^[ \t]*(?:\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG|End of (?:the |this )?Project "
                            r"Gutenberg)", re.I | re.M)


def gutenberg_text(text):
    """A Project Gutenberg book without the licence: the text between the '*** START OF ... ***' line and the
    '*** END OF ...' line (or the 'End of the Project Gutenberg EBook' line before it); unmarked text is kept."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    return (text[:end.start()] if end else text).strip()


def stackexchange_text(row):
    """The question, then its answers, best first (pm_score = round(log2(1 + upvotes)) + 1 if accepted, -1 when
    downvoted: downvoted answers are left out), all as plain text."""
    answers = sorted((a for a in row.get("answers") or [] if a.get("text") and (a.get("pm_score") or 0) >= 0),
                     key=lambda a: (-(a.get("pm_score") or 0), not a.get("selected")))
    return "\n\n".join(t for t in map(html_to_text, [row["question"], *(a["text"] for a in answers)]) if t)


# row_kb: a typical row's size, which turns the shuffle buffer's megabytes into rows.
NAMED_SOURCES = {
    "c4": dict(hub="allenai/c4", config="en", split="train", row_kb=2, text=lambda r: r["text"]),
    "wikipedia": dict(hub="wikimedia/wikipedia", config="20231101.en", split="train", row_kb=4,
                      text=lambda r: r["title"] + "\n\n" + r["text"]),
    "wikipedia-zh": dict(hub="wikimedia/wikipedia", config="20231101.zh", split="train", row_kb=3,
                         text=lambda r: r["title"] + "\n\n" + r["text"]),
    "tiny-codes": dict(hub="nampdn-ai/tiny-codes", config=None, split="train", row_kb=3,
                       text=lambda r: r["prompt"] + "\n\n" + r["response"]),
    "gutenberg": dict(hub="manu/project_gutenberg", config=None, split="en", row_kb=400,
                      text=lambda r: gutenberg_text(r["text"])),
    "gutenberg-zh": dict(hub="manu/project_gutenberg", config=None, split="zh", row_kb=400,
                         text=lambda r: gutenberg_text(r["text"])),
    "stackexchange": dict(hub="HuggingFaceH4/stack-exchange-preferences", config=None, split="train", row_kb=4,
                          text=stackexchange_text),
}
SHUFFLE_BUFFER_MB = 64  # text held in a named stream's shuffle buffer


def parse_data_files(items):
    """--data-files NAME=GLOB ... -> {name: [glob, ...]}."""
    overrides = {}
    for item in items or []:
        name, eq, pattern = item.partition("=")
        if not eq or name not in NAMED_SOURCES:
            raise UserError(f"--data-files {item}: expected NAME=GLOB with NAME one of {', '.join(NAMED_SOURCES)}")
        overrides.setdefault(name, []).append(pattern)
    return overrides


def named_source(name, data_files=None, shuffle_mb=SHUFFLE_BUFFER_MB, seed=0):
    """(rows, where): a named dataset as a streaming datasets.IterableDataset, from the hub or from local
    .json[l][.gz] / .parquet files of the same schema (data_files: globs), and a description for messages.
    shuffle_mb > 0 reads up to 10 of its files at a time in a seeded random file order through a shuffle buffer of
    about that much text, so a token budget draws from the whole dataset and not from its first files; rows.state_dict()
    is where the stream is, for resuming (rows that sat in the buffer are then skipped or repeated)."""
    from datasets import load_dataset

    spec = NAMED_SOURCES[name]
    if data_files:
        files = sorted(f for pattern in data_files for f in glob.glob(os.path.expanduser(pattern)))
        if not files:
            raise UserError(f"--data-files {name}={' '.join(data_files)} matches no file")
        builder = "parquet" if all(f.endswith(".parquet") for f in files) else "json"
        rows = load_dataset(builder, data_files=files, split="train", streaming=True)
        where = f"{name} files {files[0]}{' ...' if len(files) > 1 else ''}"
    else:
        where = f"{spec['hub']} ({spec['config'] or 'default'}, {spec['split']})"
        try:
            rows = load_dataset(spec["hub"], spec["config"], split=spec["split"], streaming=True)
        except Exception as e:  # offline, no network, renamed dataset: one clear line instead of a traceback
            raise UserError(f"cannot stream {where} from the Hugging Face hub ({type(e).__name__}: "
                            f"{str(e)[:200]}): check the network (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE must be "
                            f"unset), or download its files and use --data-files {name}=GLOB") from None
    if shuffle_mb > 0:
        rows = rows.shuffle(seed=seed, buffer_size=max(1, round(shuffle_mb * 1000 / spec["row_kb"])))
    return rows, where


def named_texts(rows, name, where):
    """The clean, non-empty documents of a named source's rows."""
    for i, row in enumerate(rows):
        try:
            text = NAMED_SOURCES[name]["text"](row)
        except (KeyError, TypeError) as e:
            raise UserError(f"{where}, row {i + 1}: missing field {e} for source '{name}' (columns: {sorted(row)}); "
                            "see NAMED_SOURCES in common.py") from None
        if text:
            yield text


# ---------------------------------------------------------------------------------------------------------------
# Pretraining chunks (format 2, PreTrain/preprocess_dataset_for_pretrain_map.py): manifest.json + per split flat
# token files of fixed-length rows (consecutive pieces of one token stream), read by pretraining, eval and bench.
class ChunkRows:
    """The rows of one split, read from its shard files only when indexed: rows[index array or slice] -> (n,
    context + 1) array. Nothing is loaded up front and no file is mapped, so a rank holds only the rows of its
    current batch whatever the chunk set's size (np.memmap would read the same bytes, but every page it touched would
    count in the rank's resident memory until the kernel reclaims it, growing over an epoch to the whole split). If
    the context is smaller than the chunks' rows, each row is cut into windows of context + 1 tokens sharing one
    boundary token: index i is window i // n_rows of row i % n_rows."""

    def __init__(self, paths, shard_rows, row_length, dtype, context_length, vocab_size):
        import numpy as np

        self.paths, self.row_length, self.dtype = paths, row_length, np.dtype(dtype)
        self.context_length, self.vocab_size = context_length, vocab_size
        self.starts = np.cumsum([0, *shard_rows])  # first row of each shard
        self.n_rows = int(self.starts[-1])
        self.windows = (row_length - 1) // context_length
        self.files = {}  # shard -> its file, opened on first use (closed when the reader is garbage collected)

    def __len__(self):
        return self.n_rows * self.windows

    def __getitem__(self, index):
        import numpy as np

        index = np.arange(*index.indices(len(self))) if isinstance(index, slice) else np.asarray(index, np.int64)
        if index.ndim != 1 or (len(index) and not 0 <= index.min() <= index.max() < len(self)):
            raise IndexError(f"row index out of range 0..{len(self) - 1} (or not a 1-d index)")
        window, row = np.divmod(index, self.n_rows)
        shard = np.searchsorted(self.starts, row, side="right") - 1
        width = self.context_length + 1
        out = np.empty((len(index), width), self.dtype)
        for k, (s, r, w) in enumerate(zip(shard.tolist(), row.tolist(), window.tolist())):
            if s not in self.files:
                self.files[s] = open(self.paths[s], "rb", buffering=0)
            offset = ((r - int(self.starts[s])) * self.row_length + w * self.context_length) * self.dtype.itemsize
            out[k] = np.frombuffer(os.pread(self.files[s].fileno(), width * self.dtype.itemsize, offset), self.dtype)
        bad = np.flatnonzero((out >= self.vocab_size).any(1))
        if len(bad):  # a corrupt or foreign shard: say which, before an embedding lookup fails somewhere
            s, r = int(shard[bad[0]]), int(row[bad[0]] - self.starts[shard[bad[0]]])
            raise UserError(f"{self.paths[s]}, row {r}: token id outside the vocabulary (size {self.vocab_size}): "
                            "the chunks do not belong to this tokenizer/model")
        return out

    def __array__(self, dtype=None, copy=None):  # np.asarray(rows): every row, in memory (small sets and tests only)
        return self[:] if dtype is None else self[:].astype(dtype)


def chunk_rows(chunks_dir, manifest, split, context_length, vocab_size):
    """The rows of a split (of the read manifest.json of chunks_dir) as a ChunkRows reader: the shard files are
    checked (present, whole rows, the manifest's row count) but not read."""
    import numpy as np

    row_length, dtype = manifest["row_length"], np.dtype(manifest["dtype"])
    paths, shard_rows = [], []
    for rel in manifest["splits"][split]["shards"]:
        path = Path(chunks_dir) / rel
        if not path.is_file():
            raise UserError(f"{path} (listed in {Path(chunks_dir) / 'manifest.json'}) is missing: re-run preprocessing")
        size = path.stat().st_size
        if size % (row_length * dtype.itemsize):
            raise UserError(f"{path}: {size} bytes is not a whole number of rows of {row_length} {dtype.name} token "
                            "ids (truncated, or not this manifest's shard): re-run preprocessing")
        paths.append(path)
        shard_rows.append(size // (row_length * dtype.itemsize))
    if sum(shard_rows) != manifest["splits"][split]["rows"]:
        raise UserError(f"{chunks_dir}: the {split} shards hold {sum(shard_rows)} rows, the manifest says "
                        f"{manifest['splits'][split]['rows']}: re-run preprocessing")
    return ChunkRows(paths, shard_rows, row_length, dtype, context_length, vocab_size)


# ---------------------------------------------------------------------------------------------------------------
# Verifiable tasks: 2-digit addition and subtraction word problems (carries and borrows) in English and Chinese with
# one exact integer answer. Reference answers work the columns out before the final sentence: a 3M-parameter model
# learns that, and learns next to nothing from the bare number (57% vs 1.5% held-out exact match, measured).
# SFT trains on them, RLHF rewards exact answers on them. A problem's split is decided by a hash of its text,
# so the held-out split can never overlap training, whatever seed or count generated it.
EN_ITEMS = ["apples", "books", "pencils", "coins", "stamps", "marbles", "cookies", "flowers"]
ZH_ITEMS = ["苹果", "本书", "支铅笔", "枚硬币", "张邮票", "颗弹珠", "块饼干", "朵花"]
EN_NAMES = ["Tom", "Anna", "Li Wei", "Maria", "Sam", "Priya", "Omar", "Kate"]
ZH_NAMES = ["小明", "小红", "李华", "王芳", "张伟", "小刚", "刘洋", "陈静"]


def _arith_problem(rng, lang):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    op = rng.choice(["add", "sub"])
    if op == "sub" and b > a:
        a, b = b, a
    answer = a + b if op == "add" else a - b
    i = rng.randrange(len(EN_ITEMS))
    name = rng.choice(EN_NAMES if lang == "en" else ZH_NAMES)
    if lang == "en":
        item = EN_ITEMS[i]
        text = {
            "add": f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
            "sub": f"{name} has {a} {item} and gives away {b}. How many {item} are left?",
        }[op]
    else:
        item = ZH_ITEMS[i]
        text = {
            "add": f"{name}有{a}{item}，又得到了{b}{item}。{name}现在一共有多少{item}？",
            "sub": f"{name}有{a}{item}，送给别人{b}{item}。还剩多少{item}？",
        }[op]
    return text, answer, op, a, b


def worked_answer(a, b, op, lang):
    """Column arithmetic written out, units then tens, ending in the final-answer sentence:
    '47 + 38: 7 + 8 = 15, write 5 carry 1; 4 + 3 + 1 = 8. The answer is 85.'"""
    (a1, a0), (b1, b0) = divmod(a, 10), divmod(b, 10)
    en = lang == "en"
    if op == "add":
        units, carry = a0 + b0, (a0 + b0) // 10
        first = f"{a0} + {b0} = {units}, " + (f"write {units % 10} carry 1" if carry else f"write {units}") if en else \
            f"{a0} + {b0} = {units}，" + (f"写{units % 10}进1" if carry else f"写{units}")
        tens = f"{a1} + {b1} + 1 = {a1 + b1 + 1}" if carry else f"{a1} + {b1} = {a1 + b1}"
        result = a + b
    else:
        borrow = a0 < b0
        if en:
            first = (f"{a0} - {b0} needs a borrow: {a0 + 10} - {b0} = {a0 + 10 - b0}, write {a0 + 10 - b0}" if borrow
                     else f"{a0} - {b0} = {a0 - b0}, write {a0 - b0}")
        else:
            first = (f"{a0} - {b0} 不够减，借1：{a0 + 10} - {b0} = {a0 + 10 - b0}，写{a0 + 10 - b0}" if borrow
                     else f"{a0} - {b0} = {a0 - b0}，写{a0 - b0}")
        tens = f"{a1} - 1 - {b1} = {a1 - 1 - b1}" if borrow else f"{a1} - {b1} = {a1 - b1}"
        result = a - b
    sign = "+" if op == "add" else "-"
    if en:
        return f"{a} {sign} {b}: {first}; {tens}. The answer is {result}."
    return f"{a} {sign} {b}：{first}；{tens}。答案是{result}。"


def arithmetic_split(prompt):
    """'heldout' for about 10% of problems, chosen by a hash of the text; 'train' otherwise."""
    return "heldout" if hashlib.sha1(prompt.encode()).digest()[0] < 26 else "train"


def arithmetic_task_stream(split, seed=0):
    """Distinct problems of one split, endlessly (until the ~1M distinct problems run out): dicts with prompt,
    answer (int), lang, op ('add'/'sub') and the worked reference response."""
    rng = random.Random(seed)
    seen = set()
    while True:
        lang = rng.choice(["en", "zh"])
        prompt, answer, op, a, b = _arith_problem(rng, lang)
        if prompt in seen or arithmetic_split(prompt) != split:
            continue
        seen.add(prompt)
        yield {"prompt": prompt, "answer": answer, "lang": lang, "op": op, "response": worked_answer(a, b, op, lang)}


def arithmetic_tasks(n, split, seed=0):
    """The first n problems of arithmetic_task_stream(split, seed)."""
    import itertools

    return list(itertools.islice(arithmetic_task_stream(split, seed), n))


_ANSWER_RE = re.compile(r"(?:answer is|答案是)\s*(-?\d+)")


def extract_answer(text):
    """The integer after 'The answer is' / '答案是' in a model's response, or None."""
    m = _ANSWER_RE.search(text)
    return int(m.group(1)) if m else None


# a word problem in the task family's wording, any names, items and numbers: (pattern, sign of the second number)
_ARITH_PROMPTS = [(re.compile(r"has (\d+) .+ and gets (\d+) more\. How many .+\?"), 1),
                  (re.compile(r"has (\d+) .+ and gives away (\d+)\. How many .+ left\?"), -1),
                  (re.compile(r"有(\d+).*，又得到了(\d+).*多少.*？"), 1),
                  (re.compile(r"有(\d+).*，送给别人(\d+).*还剩多少.*？"), -1)]


def arithmetic_answer(prompt):
    """The exact answer of an arithmetic word problem (generated or typed), or None for any other prompt."""
    for pattern, sign in _ARITH_PROMPTS:
        m = pattern.search(prompt)
        if m:
            return int(m.group(1)) + sign * int(m.group(2))
    return None
