"""Stage 2: tokenize text into fixed-length rows of token ids for pretraining, stored as parquet shards.

Reads:  tokenizer/tokenizer.json (--tokenizer-dir) and the text sources given by --sources (default: the embedded
        corpus data/default_corpus/*.jsonl.gz, training files only; the held-out files stay for the tokenizer report).
Writes: pretrain_data_chunks/ (--output-dir):
          manifest.json             written last: its existence means the output is complete
          train/shard_00000.parquet ... one column input_ids, a row per row: exactly context_length + 1 token ids,
                                        fixed_size_list<uint16> (vocabulary <= 65536; else uint32: manifest "dtype")
          val/shard_00000.parquet ...   the same for the validation documents
        Uncompressed, one data page per row group: training reads each batch's rows in place, one read per row,
        never a whole split; datasets.load_dataset("parquet", data_files="pretrain_data_chunks/train/*.parquet"),
        pandas and pyarrow.parquet.read_table read them as they are. (Format 2 chunk sets, flat .bin token files,
        still train.)

    python PreTrain/preprocess_dataset_for_pretrain_map.py --context-length 256 --sources default:1 midtrain:4 --max-tokens 6e6  # CPU
    python PreTrain/preprocess_dataset_for_pretrain_map.py                           # embedded corpus, context 1024
    python PreTrain/preprocess_dataset_for_pretrain_map.py --sources my_texts/ notes.txt --num-proc 8
    python PreTrain/preprocess_dataset_for_pretrain_map.py --sources c4:0.6 wikipedia:0.2 tiny-codes:0.2 --max-tokens 2e9
    python PreTrain/preprocess_dataset_for_pretrain_map.py --sources c4 --max-tokens 1e8 \\
        --data-files c4='~/c4/en/c4-train.0000*-of-01024.json.gz'      # a named source from files you downloaded

Sources (--sources NAME[:WEIGHT] ...):
  default          the embedded corpus; each of its files is a source of its own (weight split by file size)
  a path           a file or directory: .txt (split at blank lines into ~64 KB documents), .jsonl / .jsonl.gz /
                   .json.gz (one JSON object with a "text" field per line), .parquet (a "text" column)
  a named dataset  streamed from the Hugging Face hub (needs --max-tokens); schemas as on the dataset cards:
    c4             allenai/c4, config en, split train: {text, timestamp, url}                  -> text
    wikipedia      wikimedia/wikipedia, config 20231101.en, split train: {id, url, title, text} -> title + text
    wikipedia-zh   the same with config 20231101.zh
    tiny-codes     nampdn-ai/tiny-codes, split train: {prompt, main_topic, subtopic, adjective, action_verb,
                   scenario, target_audience, programming_language, common_sense_topic, idx, response}
                                                                                            -> prompt + response
    gutenberg      manu/project_gutenberg, split en (its splits are languages, no train): {id, text}
                   -> text between the "*** START OF ... ***" and "*** END OF ..." licence lines
    gutenberg-zh   the same with split zh
    stackexchange  HuggingFaceH4/stack-exchange-preferences, split train: {qid, question, date, metadata,
                   answers: [{answer_id, author, author_id, author_profile, pm_score, selected, text}]}
                   -> question + answers (highest pm_score first, downvoted ones left out), HTML made plain text
                   (entities unescaped, tags dropped, <pre>/<code> contents kept)
                   Named sources (ids, cleaners) live in llm_train/sources.py: the tokenizer stage takes the same
                   names.
  midtrain         generated chat-format documents (mid-training, as nanochat does between base and SFT): the
                   arithmetic word problems of llm_train/arithmetic.py with worked answers (training split only, another seed than
                   SFT's) and the embedded chatterbot training conversations, rendered with the chat template, their
                   <|im_start|>/<|im_end|> as the real special tokens; endless, so it needs --max-tokens. The base
                   model then knows the chat format and the digits before SFT.
  To add a dataset, add an entry to NAMED_SOURCES. --data-files NAME=GLOB reads a named source from local
  .json[l][.gz] / .parquet files of the same schema instead of the hub (offline use, and how the tests run these
  paths). A named source is read shuffled: up to 10 of its files at a time, in a seeded random order, through a
  buffer of --shuffle-buffer-mb of text, so a --max-tokens budget samples the whole dataset, not its first files
  (a stream reads a dataset's files in order, and stack-exchange's files hold one site after another).

Weights: with --max-tokens T, source i contributes about T * w_i / sum(w) tokens (train + val); a source that runs
out first contributes what it has. Documents of all sources are interleaved in that proportion, so every shard has
the same mix. Without --max-tokens every source is read to its end and weights are ignored.

Rows: each document's tokens are followed by <|endoftext|>, the stream is cut into rows of context_length + 1
tokens (inputs = row[:-1], targets = row[1:]); the tail of a split that does not fill a row is dropped (logged).
Generated chat documents (midtrain) are packed whole, as many as fit, into rows that start with one (a chat longer
than a row is cut at its end), and the rest of each such row is filled with the text stream: GPT-2's positions are
learned, and the worked arithmetic is learned from fewer problems when each one starts at a chat boundary near the
row's start than when chats straddle rows; packing puts ~3 problems in every row of 257 tokens. Give the text
sources enough weight to fill those rows (a few dozen tokens per row).
Split: a document goes to val when a hash of its text falls under --val-fraction (the same text always lands in the
same split); a source with more than one document always gets at least one val document (its second one if the
hash picked none before). Text that spells a special token ("<|endoftext|>") is tokenized as plain text, except in
the generated midtrain documents.

Work is done in batches of documents, one batch per shard: about --rows-per-shard rows' worth of text (at least
64 KB), tokenized by datasets.map with --num-proc processes. After each batch its complete rows are written as one
train and one val shard (atomically), the less-than-a-row rest is carried over, and the progress is saved in
pretrain_data_chunks/.partial/; a killed run rerun with the same command skips its finished shards: local files
are re-read (not re-tokenized) up to where it stopped, a named source's stream continues where it stopped (its
datasets state_dict is saved with each shard; the rows that sat in its shuffle buffer are then skipped or repeated,
at most about --shuffle-buffer-mb of text; with --shuffle-buffer-mb 0 the resumed run equals an uninterrupted one).
Local sources are not read ahead of time: the progress bar's total is estimated from the file sizes. A finished run
moves its output into place in one rename; a failed run leaves an existing complete output untouched. Rerunning a
finished run with the same settings (and tokenizer) does nothing and says so; replacing chunks that a pretrained
model in output/ was built from needs --force.
"""

import argparse
import glob
import itertools
import json
import os
import shutil
import signal
import time
from pathlib import Path

from llm_train.arithmetic import arithmetic_task_stream
from llm_train.atomic import atomic_write_json
from llm_train.chunks import ShardWriter, doc_hash_fraction, raw_tokenizer, token_dtype, tokenize
from llm_train.cli import nonnegative_float, positive_float, positive_int, settings_of
from llm_train.corpus import default_corpus_files, gzip_text_size, local_files, read_jsonl_gz, read_text_file, text_size
from llm_train.errors import UserError, run_main
from llm_train.paths import CHUNKS_DIR, DATA_DIR, REPO, SFT_CHAT_FILE, TOKENIZER_DIR
from llm_train.sources import NAMED_SOURCES, SHUFFLE_BUFFER_MB, named_source, named_texts, parse_data_files
from llm_train.stage import Stage
from llm_train.tokenizer import EOT, render_messages, tokenizer_fingerprint

FORMAT = 3  # 1: parquet shards (list<int32> rows); 2: flat uint16/uint32 token files; 3: parquet shards of
# fixed_size_list<uint16/uint32> rows, uncompressed, one data page per row group
LAYOUT = "chats-packed-rows"  # chunk sets made before chats were packed several to a row are made again
MIDTRAIN_SEED = 4242  # SFT draws its problems with other seeds; the train/held-out split is by hash either way


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", nargs="+", default=["default"], metavar="NAME[:WEIGHT]",
                    help="default | midtrain | a file or directory | " + " | ".join(NAMED_SOURCES) +
                    " (default: default)")
    ap.add_argument("--data-files", nargs="+", metavar="NAME=GLOB", help="read a named source from local files")
    ap.add_argument("--shuffle-buffer-mb", type=nonnegative_float, default=SHUFFLE_BUFFER_MB,
                    help="text in each named source's shuffle buffer (default %(default)s; 0 reads in file order)")
    ap.add_argument("--max-tokens", type=positive_float, help="total tokens to take, shared by the sources' weights")
    ap.add_argument("--context-length", type=positive_int, default=1024, help="model context; rows hold one more token")
    ap.add_argument("--rows-per-shard", type=positive_int, default=16384,
                    help="about this many rows per shard (16384 rows x 1025 ids x 4 B = 67 MB); one batch of text each")
    ap.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for validation")
    ap.add_argument("--num-proc", type=positive_int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else os.cpu_count(), help="tokenizer processes (default: the cores this process may use)")
    ap.add_argument("--tokenizer-dir", default=str(TOKENIZER_DIR), help="default tokenizer/")
    ap.add_argument("--output-dir", default=str(CHUNKS_DIR), help="default pretrain_data_chunks/")
    ap.add_argument("--force", action="store_true", help="replace existing chunks that later stages were built from")
    ap.add_argument("--stop-after-shards", type=int, help=argparse.SUPPRESS)  # tests: die like kill -9 after N shards
    args = ap.parse_args()
    if not 0 <= args.val_fraction < 1:
        raise UserError("--val-fraction must be in [0, 1)")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Sources: each is {name, weight, origin, hub, size, open}: open(progress) returns an iterator over its documents
# that starts after the progress["docs"] documents a killed run already took (open() from the start); size is its
# text in bytes if known without reading it.
def skip_docs(texts, progress):
    return itertools.islice(texts, progress["docs"] if progress else 0, None)


def default_sources(weight):
    """The embedded corpus, one source per file, the weight split by the files' text sizes."""
    files = default_corpus_files("train")
    if not files:
        raise UserError(f"embedded corpus missing in {DATA_DIR}: run python data/build_default_corpus.py")
    sizes = [gzip_text_size(f) for f in files]
    return [dict(name=f"default/{f.name.split('.')[0]}", weight=weight * size / sum(sizes),
                 origin=str(f.relative_to(REPO)), hub=False, size=size,
                 open=lambda p=None, f=f: skip_docs((d["text"] for d in read_jsonl_gz(f) if d["text"]), p))
            for f, size in zip(files, sizes)]


def midtrain_texts():
    """Endless chat-format documents: seven arithmetic conversations for every chatterbot conversation (the
    arithmetic needs every problem it can get; SFT brings the chatterbot conversations again)."""
    chats = [r["messages"] for r in read_jsonl_gz(SFT_CHAT_FILE) if r["split"] == "train"]
    for n, task in enumerate(arithmetic_task_stream("train", seed=MIDTRAIN_SEED)):
        yield render_messages([{"role": "user", "content": task["prompt"]},
                               {"role": "assistant", "content": task["response"]}])
        if n % 7 == 6:
            yield render_messages(chats[(n // 7) % len(chats)])


def open_named(source, shuffle_mb, progress=None):
    """A named source's documents; with the progress of a killed run, its stream resumes where that run stopped
    (datasets' state_dict, saved in progress["state"]), instead of being read again up to there."""
    rows, where = named_source(source["name"], source["files"], shuffle_mb if progress is not None else 0)
    if progress and progress.get("state"):
        rows.load_state_dict(progress["state"])
    if progress is not None:
        source["rows"] = rows  # its state_dict is saved with every shard
    return named_texts(rows, source["name"], where)


def named_dataset_source(name, weight, files, shuffle_mb):
    origin = f"files {' '.join(files)}" if files else f"hub {NAMED_SOURCES[name]['hub']}"
    size = sum(text_size(f) for pattern in files or [] for f in glob.glob(os.path.expanduser(pattern))) or None
    source = dict(name=name, weight=weight, origin=origin, hub=not files, files=files, size=size)
    source["open"] = lambda p=None: open_named(source, shuffle_mb, p)
    return source


def local_source(name, weight):
    files = local_files(Path(name).expanduser(), f" (and is not a named source: "
                        f"{', '.join(['default', 'midtrain', *NAMED_SOURCES])})")
    return dict(name=name, weight=weight, origin=name, hub=False, size=sum(map(text_size, files)),
                open=lambda p=None: skip_docs((t for f in files for t in read_text_file(f)), p))


def parse_source_spec(spec):
    """NAME[:WEIGHT] -> (name, weight); a colon not followed by a number is part of the name (a path)."""
    name, weight = spec, 1.0
    head, colon, tail = spec.rpartition(":")
    if colon:
        try:
            name, weight = head, float(tail)
        except ValueError:
            pass
    if not weight > 0:
        raise UserError(f"--sources {spec}: the weight must be a positive number")
    return name, weight


def parse_sources(specs, data_files, shuffle_mb):
    """--sources NAME[:WEIGHT] ... -> list of sources; 'default' expands into one source per embedded corpus file."""
    overrides = parse_data_files(data_files)
    sources = []
    for name, weight in map(parse_source_spec, specs):
        if name == "default":
            sources += default_sources(weight)
        elif name == "midtrain":
            sources.append(dict(name=name, weight=weight, origin="generated chats (arithmetic + chatterbot)",
                                hub=False, endless=True, chat=True, size=None,
                                open=lambda p=None: skip_docs(midtrain_texts(), p)))
        elif name in NAMED_SOURCES:
            sources.append(named_dataset_source(name, weight, overrides.get(name), shuffle_mb))
        else:
            sources.append(local_source(name, weight))
    if len({s["name"] for s in sources}) != len(sources):
        raise UserError(f"--sources {' '.join(specs)}: a source is given twice")
    unused = set(overrides) - {s["name"] for s in sources}
    if unused:
        raise UserError(f"--data-files given for {', '.join(sorted(unused))}, which is not in --sources")
    return sources


def interleave(sources, progress, budgets, bytes_per_token):
    """Yield (source index, index within source, text, utf-8 bytes) in token proportion to the sources' weights.

    Next comes the source furthest below its share (estimated tokens so far / weight), so the mix is the same all
    through the stream. Resumes after progress[i]['docs'] documents of each source."""
    iters = [s["open"](p) if not p["done"] else iter(()) for s, p in zip(sources, progress)]

    def est_tokens(i):
        return progress[i]["bytes"] / bytes_per_token[i]

    active = [i for i, p in enumerate(progress) if not p["done"] and est_tokens(i) < budgets[i]]
    while active:
        i = min(active, key=lambda i: est_tokens(i) / sources[i]["weight"])
        text = next(iters[i], None)
        if text is None:
            progress[i]["done"] = True
            active.remove(i)
            continue
        n_bytes = len(text.encode("utf-8"))
        progress[i]["docs"] += 1
        progress[i]["bytes"] += n_bytes
        if est_tokens(i) >= budgets[i]:
            active.remove(i)
        yield i, progress[i]["docs"] - 1, text, n_bytes


# ---------------------------------------------------------------------------------------------------------------
# The steps of main, in order.
def load_tokenizer_checked(tokenizer_dir):
    """(its fingerprint, the fast tokenizer, the end-of-text id), or one UserError."""
    fingerprint = tokenizer_fingerprint(tokenizer_dir)  # a missing tokenizer: one error naming the stage-1 script
    tokenizer_path = str(Path(tokenizer_dir) / "tokenizer.json")
    tok = raw_tokenizer(tokenizer_path)
    eot_id = tok.token_to_id(EOT)
    if eot_id is None:
        raise UserError(f"{tokenizer_path} has no {EOT} token: retrain it with the stage-1 script")
    return fingerprint, tok, eot_id


def measure_bytes_per_token(sources, tok):
    """Bytes per token of each source, from its first documents (in file order): turns token budgets into text."""
    bytes_per_token = []
    for s in sources:
        sample = []
        for text in s["open"]():
            sample.append(text[:16384])
            if sum(map(len, sample)) > 65536:
                break
        if not sample:
            raise UserError(f"source {s['name']} ({s['origin']}) holds no text: give files that contain text")
        n_tokens = sum(len(e.ids) for e in tok.encode_batch_fast(sample, add_special_tokens=False))
        bytes_per_token.append(sum(len(t.encode("utf-8")) for t in sample) / max(n_tokens, 1))
    return bytes_per_token


def plan(sources, max_tokens, tok):
    """(each source's token budget: its weight's share of max_tokens; its bytes per token; the text to read in all,
    for the progress bar: the budget, or less for a local source that holds less by file size (a .jsonl's size
    counts its JSON syntax too: an estimate; nothing is read ahead))."""
    total_weight = sum(s["weight"] for s in sources)
    budgets = [max_tokens * s["weight"] / total_weight if max_tokens else float("inf") for s in sources]
    bytes_per_token = measure_bytes_per_token(sources, tok)
    expected_bytes = sum(min(budget * bpt, s["size"] if s["size"] is not None else float("inf"))
                         for s, budget, bpt in zip(sources, budgets, bytes_per_token))
    return budgets, bytes_per_token, expected_bytes


def new_progress(sources):
    return {
        "splits": {s: {"shards": [], "rows": 0, "documents": 0, "text_bytes": 0, "doc_tokens": 0, "carry": []}
                   for s in ("train", "val")},
        "sources": [{"docs": 0, "bytes": 0, "done": False, "state": None, "documents": {"train": 0, "val": 0},
                     "tokens": {"train": 0, "val": 0}} for _ in sources],
    }


def resume_or_start(staging, config, sources):
    """The progress saved in staging/progress.json by a killed run with the same config (its shards still there),
    or a fresh one in an emptied staging dir."""
    progress_path = staging / "progress.json"
    if progress_path.is_file():
        saved = json.loads(progress_path.read_text())
        shards = [rel for info in saved.get("progress", {}).get("splits", {}).values() for rel in info["shards"]]
        if saved.get("config") == json.loads(json.dumps(config)) and all((staging / r).is_file() for r in shards):
            progress = saved["progress"]
            done = {s: len(progress["splits"][s]["shards"]) for s in ("train", "val")}
            print(f"resuming: skipping {done['train']} finished train and {done['val']} val shards "
                  f"({sum(p['docs'] for p in progress['sources']):,} documents already tokenized)")
            for s, p in zip(sources, progress["sources"]):
                if p.get("state"):
                    print(f"  {s['name']}: its stream continues where it stopped, after {p['docs']:,} documents")
            return progress
        print(f"discarding {staging}: it was made with other settings (or lost shards)")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return new_progress(sources)


def next_batch(stream, batch_bytes):
    """The next documents of the stream, about batch_bytes of text (at least one document unless it has ended)."""
    batch, size = [], 0
    for item in stream:  # breaking out leaves the generator where it is, for the next batch
        batch.append(item)
        size += item[3]
        if size >= batch_bytes:
            break
    return batch, size


def assign_splits(batch, lengths, progress, val_fraction):
    """Whether each document of the batch goes to val (its text's hash under val_fraction, or a source's second
    document when it has none in val yet); counted in progress."""
    is_val = []
    for (i, index, text, n_bytes), n_tokens in zip(batch, lengths):
        source = progress["sources"][i]
        val = doc_hash_fraction(text) < val_fraction or (index == 1 and source["documents"]["val"] == 0)
        split = progress["splits"]["val" if val else "train"]
        source["documents"]["val" if val else "train"] += 1
        source["tokens"]["val" if val else "train"] += n_tokens
        split["documents"] += 1
        split["text_bytes"] += n_bytes
        split["doc_tokens"] += n_tokens
        is_val.append(val)
    return is_val


def tokenize_to_shards(args, sources, progress, budgets, bytes_per_token, expected_bytes, staging, config, eot_id,
                       dtype):
    """The main loop: a batch of documents (about one shard's worth) -> tokenize -> split by hash -> both splits'
    complete rows go to disk as one shard each, and the progress is saved. Returns (text bytes read, tokens made)."""
    import datasets
    from tqdm import tqdm

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    row_length, tokenizer_path = args.context_length + 1, str(Path(args.tokenizer_dir) / "tokenizer.json")
    mean_bytes_per_token = sum(s["weight"] * b for s, b in zip(sources, bytes_per_token)) / sum(
        s["weight"] for s in sources)
    batch_bytes = max(args.rows_per_shard * row_length * mean_bytes_per_token, 1 << 16)
    writer = ShardWriter(staging, progress["splits"], row_length, dtype, eot_id)
    stream = interleave(sources, progress["sources"], budgets, bytes_per_token)
    bar = tqdm(total=round(expected_bytes) if expected_bytes < float("inf") else None,
               initial=sum(p["bytes"] for p in progress["sources"]), unit="B", unit_scale=True, unit_divisor=1000,
               desc="tokenize")
    n_bytes_read = n_tokens_made = shards_this_run = 0
    while True:
        batch, size = next_batch(stream, batch_bytes)
        if not batch:
            bar.close()
            return n_bytes_read, n_tokens_made
        is_chat = [sources[i].get("chat", False) for i, _, _, _ in batch]
        values, starts, ends = tokenize([text for _, _, text, _ in batch], is_chat, tokenizer_path, args.num_proc)
        lengths = (ends - starts + 1).tolist()  # + the end-of-text token
        is_val = assign_splits(batch, lengths, progress, args.val_fraction)
        n_tokens_made += sum(lengths)
        for split, in_split in (("train", False), ("val", True)):
            writer.add(split, values, starts, ends, [k for k, val in enumerate(is_val) if val == in_split], is_chat)
        n_bytes_read += size
        bar.update(size)
        writer.flush(tqdm.write)
        for s, p in zip(sources, progress["sources"]):
            if "rows" in s:  # a named source: where its stream is
                p["state"] = s["rows"].state_dict()
        atomic_write_json(staging / "progress.json", {"config": config, "progress": progress})
        shards_this_run += 1
        if args.stop_after_shards and shards_this_run >= args.stop_after_shards:
            os.kill(os.getpid(), signal.SIGKILL)


def manifest_of(progress, sources, tok, eot_id, fingerprint, context_length, dtype, config, seconds):
    """manifest.json's contents: the format, the tokenizer, and each split's shards, rows, tokens, bytes and
    documents (the dropped tail, less than a row, taken off the bytes pro rata so tokens / bytes stays true)."""
    row_length = context_length + 1
    manifest_splits = {}
    for split, info in progress["splits"].items():
        tokens = info["rows"] * row_length
        manifest_splits[split] = {
            "shards": info["shards"], "rows": info["rows"], "tokens": tokens,
            "bytes": round(info["text_bytes"] * tokens / max(info["doc_tokens"], 1)), "documents": info["documents"],
        }
    return {
        "format": FORMAT, "layout": LAYOUT, "tokenizer_fingerprint": fingerprint, "vocab_size": tok.get_vocab_size(),
        "eot_id": eot_id, "context_length": context_length, "row_length": row_length, "dtype": dtype.str,
        "splits": manifest_splits,
        "sources": [{"name": s["name"], "weight": s["weight"], "origin": s["origin"], "documents": p["documents"],
                     "tokens": p["tokens"]} for s, p in zip(sources, progress["sources"])],
        "seconds": round(seconds, 2),
        "config": config,
    }


def print_summary(manifest, progress, n_bytes_read, n_tokens_made, seconds_work):
    for split, info in manifest["splits"].items():
        dropped = progress["splits"][split]["doc_tokens"] - info["tokens"]
        print(f"{split:>5}: {info['documents']:,} documents, {info['rows']:,} rows, {info['tokens']:,} tokens, "
              f"{info['bytes'] / 1e6:.2f} MB of text, {len(info['shards'])} shards; dropped {dropped:,} "
              "tokens (the last, less than a row, and chats longer than a row)")
    rate = f"{n_bytes_read / 1e6 / seconds_work:.2f} MB/s, {n_tokens_made / seconds_work:,.0f} tokens/s"
    print(f"tokenized {n_bytes_read / 1e6:.1f} MB into {n_tokens_made:,} tokens in {seconds_work:.1f}s ({rate}); "
          f"total {manifest['seconds']:.1f}s")


def main():
    args = parse_args()
    t_start = time.perf_counter()

    # Everything that can be wrong is checked before any work: tokenizer, sources, output directory.
    tokenizer_dir, out_dir = Path(args.tokenizer_dir), Path(args.output_dir)
    fingerprint, tok, eot_id = load_tokenizer_checked(tokenizer_dir)
    sources = parse_sources(args.sources, args.data_files, args.shuffle_buffer_mb)
    max_tokens = int(args.max_tokens) if args.max_tokens else None
    if max_tokens is None and any(s["hub"] or s.get("endless") for s in sources):
        raise UserError("hub datasets and midtrain are streams without end: give --max-tokens (e.g. --max-tokens 2e9)")
    settings = {**settings_of(args, "sources", "data_files", "max_tokens", "context_length", "rows_per_shard",
                                     "val_fraction", "shuffle_buffer_mb"), "tokenizer_fingerprint": fingerprint,
                "format": FORMAT, "layout": LAYOUT}
    stage = Stage("chunks", "chunk set", out_dir, settings, force=args.force, parents={"tokenizer": tokenizer_dir},
                  tokenizer_dir=tokenizer_dir, done_file=out_dir / "manifest.json")
    if stage.done():
        return
    stage.prepare(writable=[out_dir])

    budgets, bytes_per_token, expected_bytes = plan(sources, max_tokens, tok)
    config = dict(format=FORMAT, layout=LAYOUT, tokenizer_fingerprint=fingerprint, context_length=args.context_length,
                  rows_per_shard=args.rows_per_shard, val_fraction=args.val_fraction, max_tokens=max_tokens,
                  shuffle_buffer_mb=args.shuffle_buffer_mb,
                  sources=[(s["name"], s["weight"], s["origin"]) for s in sources])
    staging = out_dir / ".partial"
    progress = resume_or_start(staging, config, sources)
    print(f"tokenizer {tokenizer_dir} (vocab {tok.get_vocab_size()}, eot {eot_id}), context {args.context_length}, "
          f"{len(sources)} sources, {args.num_proc} processes, ~{expected_bytes / 1e6:,.1f} MB of text")
    for s, budget, bpt in zip(sources, budgets, bytes_per_token):
        share = f"{budget:,.0f} tokens" if max_tokens else "all"
        print(f"  {s['name']:<28} {s['origin']:<48} {share}, ~{bpt:.2f} bytes/token")

    row_length, dtype = args.context_length + 1, token_dtype(tok.get_vocab_size())
    t_work = time.perf_counter()
    n_bytes_read, n_tokens_made = tokenize_to_shards(args, sources, progress, budgets, bytes_per_token,
                                                     expected_bytes, staging, config, eot_id, dtype)
    seconds_work = time.perf_counter() - t_work

    # The manifest, written last; then the whole directory replaces the old output in one rename.
    if progress["splits"]["train"]["rows"] == 0:
        raise UserError(f"too little text for one training row of {row_length} tokens: give more text "
                        "or a smaller --context-length")
    if progress["splits"]["val"]["rows"] == 0:
        print("warning: the validation split is empty (too few or too small documents)")
    manifest = manifest_of(progress, sources, tok, eot_id, fingerprint, args.context_length, dtype, config,
                           time.perf_counter() - t_start)
    atomic_write_json(staging / "manifest.json", manifest)
    with stage.output() as tmp:
        for name in ("train", "val", "manifest.json"):
            if (staging / name).exists():
                os.replace(staging / name, tmp / name)
    print_summary(manifest, progress, n_bytes_read, n_tokens_made, seconds_work)
    print(f"wrote {out_dir}/manifest.json")


if __name__ == "__main__":
    run_main(main)
