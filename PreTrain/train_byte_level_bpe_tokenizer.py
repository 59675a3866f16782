"""Stage 1: train a byte-level BPE tokenizer (Chinese + English + code) and write it to tokenizer/.

Reads:  the embedded corpus data/default_corpus/*.jsonl.gz (default), or local files/dirs (--input: .txt, .jsonl,
        .jsonl.gz, .parquet with a "text" column), or named Hugging Face datasets (--hf-dataset: the same names and
        cleaning as the preprocessing stage's --sources: c4, wikipedia, wikipedia-zh, tiny-codes, gutenberg,
        gutenberg-zh, stackexchange; streamed and shuffled; --data-files NAME=GLOB reads one from local files).
Writes: tokenizer/ so that AutoTokenizer.from_pretrained("./tokenizer") works (tokenizer.json,
        tokenizer_config.json with the chat template), the raw tokenizers file
        tokenizer/byte_level_bpe_tokenizer_v1.json, and tokenizer/report.json (bytes per token on held-out
        English, Chinese and code; training time; the vocabulary size reached and the one asked for).

    cd PreTrain && python train_byte_level_bpe_tokenizer.py                 # embedded corpus, 50k vocab
    python PreTrain/train_byte_level_bpe_tokenizer.py --vocab-size 8192     # what the CPU default run uses
    python PreTrain/train_byte_level_bpe_tokenizer.py --input my_texts/ --vocab-size 50000
    python PreTrain/train_byte_level_bpe_tokenizer.py --hf-dataset c4 wikipedia-zh tiny-codes --max-chars 2e9

Sources are sampled evenly: each embedded corpus file, each --input path and each --hf-dataset is a source, and
the next document always comes from the source that has given the fewest characters so far, until --max-chars in
all (a source that runs out leaves its share to the others). Documents stream into the BPE trainer as it counts
them: memory is the trainer's word counts (bounded by the vocabulary of the text, not its length), never the text.

The trainer stops short of --vocab-size when the text has no more pairs seen --min-frequency times: the run then
says so (a warning naming both sizes; "warnings" in report.json) and keeps the smaller vocabulary.

Rerunning the same command on a finished tokenizer/ does nothing (and says so). Replacing a tokenizer with another
one (other settings or data) needs --force or a new --output-dir: every later stage output built on it (chunks,
models, adapters) would no longer match, and the error lists them.

Design: no normalizer (so decode(encode(x)) == x for any string), a GPT-4-style split regex in which every digit is
its own pre-token (arithmetic stays learnable), runs of CJK characters and code whitespace kept as pre-tokens,
then byte-level mapping so any byte sequence is representable with no unknown token.
"""

import argparse
import json
import time
from pathlib import Path

from llm_train.atomic import atomic_dir, atomic_write_json
from llm_train.cli import positive_float, positive_int, settings_of
from llm_train.corpus import default_corpus_files, local_files, read_jsonl_gz, read_text_file
from llm_train.errors import UserError, run_main
from llm_train.lineage import stale_if_replaced
from llm_train.paths import DATA_DIR, TOKENIZER_DIR
from llm_train.sources import NAMED_SOURCES, named_source, named_texts, parse_data_files
from llm_train.stage import Stage
from llm_train.tokenizer import CHAT_TEMPLATE, EOT, IM_END, IM_START, PAD, SPECIAL_TOKENS, tokenizer_fingerprint

# Letters with an optional leading non-letter (" the", "(foo"), single digits, punctuation runs, newlines, spaces.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
RAW_NAME = "byte_level_bpe_tokenizer_v1.json"


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-size", type=positive_int, default=50_000, help="target vocabulary size (default 50000)")
    ap.add_argument("--input", nargs="+", help="local files or directories (.txt, .jsonl[.gz], .parquet)")
    ap.add_argument("--hf-dataset", nargs="+", metavar="NAME",
                    help="named Hugging Face datasets, streamed: " + " | ".join(NAMED_SOURCES))
    ap.add_argument("--data-files", nargs="+", metavar="NAME=GLOB", help="read a --hf-dataset from local files")
    ap.add_argument("--max-chars", type=positive_float, default=1e9, help="stop reading after this many characters")
    ap.add_argument("--min-frequency", type=positive_int, default=2, help="minimum pair count for a merge")
    ap.add_argument("--output-dir", default=str(TOKENIZER_DIR), help="where to write (default tokenizer/)")
    ap.add_argument("--force", action="store_true", help="replace an existing, different tokenizer in --output-dir")
    args = ap.parse_args()
    args.max_chars = int(args.max_chars)
    if args.vocab_size < 300:
        raise UserError(f"--vocab-size {args.vocab_size} is too small: it must exceed the 256 byte symbols + specials")
    return args


def open_sources(inputs, hf_dataset, data_files):
    """[(name, iterator over its documents)], opened (and checked) before any training: the named datasets, else
    the local inputs, else the embedded corpus's training files."""
    if data_files and not hf_dataset:
        raise UserError("--data-files reads a --hf-dataset source from local files: give --hf-dataset NAME too")
    if hf_dataset:
        unknown = [name for name in hf_dataset if name not in NAMED_SOURCES]
        if unknown:
            raise UserError(f"--hf-dataset {unknown[0]}: unknown name; use {', '.join(NAMED_SOURCES)} (see "
                            "NAMED_SOURCES), or download the files and pass them with --input")
        files = parse_data_files(data_files)
        if set(files) - set(hf_dataset):
            raise UserError(f"--data-files given for {', '.join(sorted(set(files) - set(hf_dataset)))}, which "
                            "is not in --hf-dataset")
        sources = []
        for name in dict.fromkeys(hf_dataset):
            rows, where = named_source(name, files.get(name))
            sources.append((name, named_texts(rows, name, where)))
        return sources
    if inputs:
        return [(p, (t for f in files for t in read_text_file(f)))
                for p, files in [(p, local_files(p)) for p in inputs]]
    files = default_corpus_files("train")
    if not files:
        raise UserError(f"embedded corpus missing in {DATA_DIR}: run python data/build_default_corpus.py")
    return [(f.name.split(".")[0], (doc["text"] for doc in read_jsonl_gz(f))) for f in files]


def iter_corpus(sources, max_chars, stats):
    """The training documents, evenly from the sources (next from the one that has given the fewest characters),
    until max_chars characters in all; counts what it gave in stats[name] = {documents, chars, bytes}."""
    for name, _ in sources:
        stats[name] = {"documents": 0, "chars": 0, "bytes": 0}
    active, total = list(sources), 0
    while active and total < max_chars:
        source = min(active, key=lambda s: stats[s[0]]["chars"])
        text = next(source[1], None)
        if text is None:
            active.remove(source)
            continue
        st = stats[source[0]]
        st["documents"] += 1
        st["chars"] += len(text)
        st["bytes"] += len(text.encode("utf-8"))
        total += len(text)
        yield text


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())  # byte-level alphabet: never an unknown token
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train(texts, vocab_size, min_frequency=2):
    from tokenizers import pre_tokenizers, trainers

    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def write_tokenizer(tok, directory):
    """The HF tokenizer files (AutoTokenizer loads them; chat template included) + the raw tokenizers json."""
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=None, pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END], clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(directory))
    tok.save(str(Path(directory) / RAW_NAME))
    return hf_tok


def save(tok, out_dir):
    """write_tokenizer into out_dir, atomically (no lineage: for tests and benchmarks)."""
    with atomic_dir(out_dir) as tmp:
        return write_tokenizer(tok, tmp)


def bytes_per_token(tok, texts):
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return round(n_bytes / max(n_tokens, 1), 3)


def heldout_report(tok):
    """Bytes per token on the embedded corpus's held-out documents, per language."""
    report = {}
    for f in default_corpus_files("heldout"):
        docs = list(read_jsonl_gz(f))
        lang = docs[0]["lang"] if docs else f.stem
        report[lang] = bytes_per_token(tok, [d["text"] for d in docs])
    return report


def vocab_warnings(reached, asked, min_frequency):
    """The trainer stops early, without a word, when no pair is seen min_frequency times any more: say so."""
    if reached >= asked:
        return []
    return [f"the vocabulary has {reached:,} tokens, not the {asked:,} asked for (--vocab-size): the training text "
            f"has no more pairs seen at least {min_frequency} times (--min-frequency). Give more text, or pass "
            f"--vocab-size {reached} to ask for what it holds; later stages use the {reached:,} tokens it has"]


def check_replacing(out_dir, force):
    """Another tokenizer in out_dir is replaced only with --force: every output built on it would no longer match."""
    if force or not (out_dir / "tokenizer.json").is_file():
        return
    stale = stale_if_replaced(out_dir)
    built = f"; {', '.join(stale)} were built from it and would go stale" if stale else ""
    raise UserError(f"{out_dir} already holds a trained tokenizer (other settings or data){built}. Pass --force "
                    "to replace it (then rerun the later stages), or write to another --output-dir; nothing "
                    "was changed")


def main():
    args = parse_args()
    out_dir = Path(args.output_dir)
    settings = settings_of(args, "vocab_size", "input", "hf_dataset", "max_chars", "min_frequency")
    if args.data_files:  # only when given: tokenizers made before the flag existed stay finished
        settings["data_files"] = args.data_files
    stage = Stage("tokenizer", "tokenizer", out_dir, settings, force=args.force, done_file=out_dir / "tokenizer.json")
    if stage.done():
        return
    check_replacing(out_dir, args.force)
    stage.prepare()

    sources = open_sources(args.input, args.hf_dataset, args.data_files)
    t0 = time.perf_counter()
    stats = {}
    tok = train(iter_corpus(sources, args.max_chars, stats), args.vocab_size, args.min_frequency)
    train_seconds = time.perf_counter() - t0  # reading included: the documents stream into the trainer
    n_bytes = sum(st["bytes"] for st in stats.values())
    if n_bytes == 0:
        raise UserError(f"the input is empty ({', '.join(args.input or args.hf_dataset or ['default corpus'])}): "
                        "give files that contain text")
    print(f"read {sum(st['documents'] for st in stats.values()):,} documents, {n_bytes / 1e6:.1f} MB (" +
          ", ".join(f"{name} {st['chars'] / 1e6:.2f}M chars" for name, st in stats.items()) + ")")
    warnings = vocab_warnings(tok.get_vocab_size(), args.vocab_size, args.min_frequency)
    with stage.output() as tmp:
        write_tokenizer(tok, tmp)
        report = {
            "vocab_size": tok.get_vocab_size(),
            "requested_vocab_size": args.vocab_size,
            "warnings": warnings,
            "train_bytes": n_bytes,
            "train_sources": stats,
            "train_seconds": round(train_seconds, 2),
            "seconds_per_mb": round(train_seconds / max(n_bytes / 1e6, 1e-9), 3),
            "bytes_per_token_heldout": heldout_report(tok),
            "fingerprint": tokenizer_fingerprint(tmp),
        }
        atomic_write_json(tmp / "report.json", report)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    for warning in warnings:
        print(f"warning: {warning}", flush=True)
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    run_main(main)
