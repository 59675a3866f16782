"""Benchmark of the data stages on the embedded corpus; prints results and writes bench/results/bench_data.json.

1. Tokenizer training (stage 1's own train(), vocab 8192, the whole embedded training corpus): seconds per MB.
2. Preprocessing throughput of stage 2 (PreTrain/preprocess_dataset_for_pretrain_map.py --num-proc 2, run as a
   user runs it) next to the bare tokenizers `Tokenizer.encode_batch` rate (all cores) on the same text, all
   interleaved, medians of --reps runs. Goal: stage >= 0.8x bare encode_batch. The stage tokenizes with
   `encode_batch_fast` (same ids, no offsets), so the bare rate of that is reported too, for a same-method ratio.
   The stage's rate is its steady state (the tokenize-pack-write loop it reports); its end-to-end wall time
   (interpreter start, imports, the first pass over the input) is reported too.
3. Resident memory of a training rank vs the size of the chunk set: stage 2 chunks the whole embedded corpus
   (context 256, ~5M tokens), a second chunk set of >= --rss-tokens (default 2e8) tokens repeats its train shards
   (copies, in a temporary dir), and PreTrain/model.py trains a tiny model for --rss-steps steps on each, as a user
   runs it; its peak RSS (ru_maxrss, logged in history.jsonl) must be within 10% on both: the reader reads only
   the rows of each batch, nothing grows with the data (reading all rows into memory would add 4 bytes per token
   per rank).
4. The training reader's cost per batch: stage 2 chunks --reader-tokens of the corpus at context 1024 and 128
   (parquet shards, format 3) and the same rows are written as a format-2 chunk set (flat .bin token files, the
   reader before parquet); chunk_rows reads batches of 16 random rows (16 x 1025 and 16 x 129 tokens, as the
   gpt2-100m and cpu presets read) from both, in interleaved A/B rounds of --reader-batches batches each; medians
   of the per-round mean ms per batch, and that as a share of a training step: of gpt2-100m at 16 x 1024 on one
   GPU (~130 ms, measured elsewhere: --gpu-step-ms) and of the cpu preset (timed here: forward, backward and AdamW
   step of its model on 16 x 128 tokens, on this machine's cores).

    python bench/bench_data.py                 # ~6 min on 2 idle cores
    python bench/bench_data.py --slice-mb 4 --reps 3
    python bench/bench_data.py --parts rss     # only the RSS measurement (and the tokenizer it needs)
    python bench/bench_data.py --parts reader  # only the reader's cost per batch (and the tokenizer it needs)
"""
import argparse
import gzip
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llm_train.corpus import default_corpus_files, read_jsonl_gz
from llm_train.paths import DATA_DIR, load_script

REPO = Path(__file__).resolve().parents[1]

STAGE2 = REPO / "PreTrain" / "preprocess_dataset_for_pretrain_map.py"
STAGE3 = REPO / "PreTrain" / "model.py"


def corpus_slice(mb):
    """Whole documents from each embedded corpus file in turn, about mb MB of text in all (the same mix)."""
    files = default_corpus_files("train")
    per_file = mb * 1e6 / len(files)
    docs = []
    for f in files:
        size = 0
        for d in read_jsonl_gz(f):
            if size >= per_file:
                break
            docs.append(d["text"])
            size += len(d["text"].encode())
    return docs


def throughput(work, args, env):
    """2. stage 2 vs bare encode_batch, interleaved."""
    from tokenizers import Tokenizer

    docs = corpus_slice(args.slice_mb)
    mb = sum(len(d.encode()) for d in docs) / 1e6
    data = work / "slice.jsonl.gz"
    data.write_bytes(gzip.compress("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode(),
                                   compresslevel=1))
    bare_tok = Tokenizer.from_file(str(work / "tokenizer" / "tokenizer.json"))
    bare_tok.encode_special_tokens = True  # as the stage does
    bare, bare_fast, stage, stage_wall = [], [], [], []
    for rep in range(args.reps):
        for runs, encode in ((bare, bare_tok.encode_batch), (bare_fast, bare_tok.encode_batch_fast)):
            t0 = time.perf_counter()
            n_tokens = sum(len(e.ids) for e in encode(docs, add_special_tokens=False))
            seconds = time.perf_counter() - t0
            runs.append({"seconds": seconds, "mb_per_s": mb / seconds, "tokens_per_s": n_tokens / seconds})

        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(STAGE2), "--sources", str(data), "--tokenizer-dir",
                               str(work / "tokenizer"), "--output-dir", str(work / "chunks"), "--context-length",
                               "1024", "--num-proc", str(args.num_proc)], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"stage 2 failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        m = re.search(r"tokenized ([\d.]+) MB into ([\d,]+) tokens in ([\d.]+)s", proc.stdout)
        loop_mb, loop_tokens, loop_s = float(m.group(1)), int(m.group(2).replace(",", "")), float(m.group(3))
        stage.append({"seconds": loop_s, "mb_per_s": loop_mb / loop_s, "tokens_per_s": loop_tokens / loop_s})
        stage_wall.append({"seconds": wall, "mb_per_s": mb / wall})
        print(f"rep {rep + 1}/{args.reps}: bare encode_batch {bare[-1]['mb_per_s']:.2f} MB/s, encode_batch_fast "
              f"{bare_fast[-1]['mb_per_s']:.2f} MB/s, stage {stage[-1]['mb_per_s']:.2f} MB/s "
              f"(end to end {stage_wall[-1]['mb_per_s']:.2f} MB/s)")

    def median(runs, key):
        return statistics.median(r[key] for r in runs)

    ratio = median(stage, "mb_per_s") / median(bare, "mb_per_s")
    ratio_wall = median(stage_wall, "mb_per_s") / median(bare, "mb_per_s")
    ratio_fast = median(stage, "mb_per_s") / median(bare_fast, "mb_per_s")
    result = {
        "slice_mb": round(mb, 2), "context_length": 1024, "num_proc": args.num_proc, "reps": args.reps,
        "bare_encode_batch": {"mb_per_s": round(median(bare, "mb_per_s"), 3),
                              "tokens_per_s": round(median(bare, "tokens_per_s")), "runs": bare},
        "bare_encode_batch_fast": {"mb_per_s": round(median(bare_fast, "mb_per_s"), 3),
                                   "tokens_per_s": round(median(bare_fast, "tokens_per_s")), "runs": bare_fast},
        "stage": {"mb_per_s": round(median(stage, "mb_per_s"), 3),
                  "tokens_per_s": round(median(stage, "tokens_per_s")), "runs": stage},
        "stage_end_to_end": {"mb_per_s": round(median(stage_wall, "mb_per_s"), 3), "runs": stage_wall},
        "ratio_stage_vs_bare": round(ratio, 3), "ratio_end_to_end_vs_bare": round(ratio_wall, 3),
        "ratio_stage_vs_bare_fast": round(ratio_fast, 3),
        "goal": 0.8, "goal_met": ratio >= 0.8,
    }
    print(f"preprocessing {result['stage']['mb_per_s']:.2f} MB/s ({result['stage']['tokens_per_s']:,} tokens/s) vs "
          f"bare encode_batch {result['bare_encode_batch']['mb_per_s']:.2f} MB/s: ratio {ratio:.2f} (goal >= 0.8, "
          f"{'met' if ratio >= 0.8 else 'NOT met'}); end to end {ratio_wall:.2f}; vs bare encode_batch_fast "
          f"{result['bare_encode_batch_fast']['mb_per_s']:.2f} MB/s: {ratio_fast:.2f}")
    return result


def repeated_chunks(small, big, min_tokens):
    """A chunk set of >= min_tokens train tokens in `big`: the train shards of `small`, copied as often as needed."""
    manifest = json.loads((small / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    copies = math.ceil(min_tokens / train["tokens"])
    (big / "train").mkdir(parents=True)
    shards = []
    for c in range(copies):
        for rel in train["shards"]:
            shards.append(f"train/shard_{len(shards):05d}{Path(rel).suffix}")
            shutil.copyfile(small / rel, big / shards[-1])
    shutil.copytree(small / "val", big / "val")
    manifest["splits"]["train"] = {**train, "shards": shards, "rows": train["rows"] * copies,
                                   "tokens": train["tokens"] * copies, "bytes": train["bytes"] * copies}
    (big / "manifest.json").write_text(json.dumps(manifest))
    return manifest["splits"]["train"]["tokens"]


def train_rank_rss(chunks, tokenizer, run_dir, steps, env):
    """Peak RSS (MB) of PreTrain/model.py, one process, training a tiny model for `steps` steps on `chunks`."""
    cmd = [sys.executable, str(STAGE3), "--preset", "smoke", "--context-length", "256",
           "--global-batch-tokens", "2048", "--max-steps", str(steps),
           "--eval-interval", str(steps), "--eval-rows", "32", "--checkpoint-interval", str(10 * steps),
           "--tokenizer-dir", str(tokenizer), "--chunks-dir", str(chunks), "--output-dir", str(run_dir / "output"),
           "--checkpoint-dir", str(run_dir / "ckpt"), "--log-file", str(run_dir / "train.log"),
           "--tensorboard-dir", str(run_dir / "runs")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"training on {chunks} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    history = [json.loads(line) for line in (run_dir / "output" / "history.jsonl").read_text().splitlines()]
    return max(h["peak_mem_mb"] for h in history if "peak_mem_mb" in h), time.perf_counter() - t0


def rss_vs_chunk_set_size(work, tokenizer, args, env):
    small, big = work / "chunks_small", work / "chunks_big"
    proc = subprocess.run([sys.executable, str(STAGE2), "--tokenizer-dir", str(tokenizer), "--output-dir", str(small),
                           "--context-length", "256", "--num-proc", str(args.num_proc)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"stage 2 failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    small_tokens = json.loads((small / "manifest.json").read_text())["splits"]["train"]["tokens"]
    big_tokens = repeated_chunks(small, big, args.rss_tokens)
    result = {"steps": args.rss_steps, "model": "preset smoke at context 256, one process", "goal": 1.10}
    for name, chunks, tokens in (("small", small, small_tokens), ("big", big, big_tokens)):
        rss, seconds = train_rank_rss(chunks, tokenizer, work / f"run_{name}", args.rss_steps, env)
        disk = sum(f.stat().st_size for f in (chunks / "train").iterdir())
        result[name] = {"train_tokens": tokens, "train_bytes_on_disk": disk, "peak_rss_mb": round(rss, 1),
                        "seconds": round(seconds, 1)}
        print(f"training rank on {tokens / 1e6:,.1f}M train tokens ({disk / 1e6:,.0f} MB of shards): peak RSS "
              f"{rss:,.0f} MB ({seconds:.0f}s)")
    ratio = result["big"]["peak_rss_mb"] / result["small"]["peak_rss_mb"]
    result.update(ratio=round(ratio, 3), goal_met=ratio <= result["goal"])
    print(f"peak RSS big / small: {ratio:.3f} (goal <= 1.10, {'met' if ratio <= 1.10 else 'NOT met'})")
    shutil.rmtree(big)
    return result


def flat_copy(chunks, flat):
    """The rows of a (format 3) chunk set as a format-2 chunk set: flat .bin token files, the same shards and rows."""
    import numpy as np
    import pyarrow.parquet as pq

    manifest = json.loads((chunks / "manifest.json").read_text())
    for split, info in manifest["splits"].items():
        (flat / split).mkdir(parents=True)
        for i, rel in enumerate(info["shards"]):
            ids = pq.read_table(chunks / rel).column("input_ids").combine_chunks().flatten().to_numpy()
            info["shards"][i] = str(Path(rel).with_suffix(".bin"))
            np.asarray(ids, manifest["dtype"]).tofile(flat / info["shards"][i])
    (flat / "manifest.json").write_text(json.dumps({**manifest, "format": 2}))


def cpu_preset_step_ms(vocab_size, steps=8):
    """Median ms of one optimizer step of the cpu preset's model (16 x 128 tokens: forward, backward, AdamW)."""
    from llm_train.gpt import GPT

    import torch

    preset = load_script("PreTrain/model.py").PRESETS["cpu"]
    torch.manual_seed(0)
    model = GPT(vocab_size, preset["context_length"], preset["n_layer"], preset["n_embd"], preset["n_head"])
    opt = torch.optim.AdamW(model.parameters(), lr=preset["lr"])
    x = torch.randint(0, vocab_size, (preset["batch_size"], preset["context_length"] + 1))
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[2:])


def reader_cost(work, tokenizer, args, env):
    """4. ms per batch of chunk_rows on parquet shards vs flat .bin files, interleaved A/B rounds."""
    from llm_train.chunks import chunk_rows

    import numpy as np

    result = {"batch_rows": 16, "rounds": args.reader_rounds, "batches_per_round": args.reader_batches,
              "gpu_step_ms": args.gpu_step_ms}
    for context in (1024, 128):
        chunks, flat = work / f"reader_{context}", work / f"reader_{context}_flat"
        proc = subprocess.run([sys.executable, str(STAGE2), "--tokenizer-dir", str(tokenizer), "--output-dir",
                               str(chunks), "--context-length", str(context), "--num-proc", str(args.num_proc),
                               "--max-tokens", str(int(args.reader_tokens))], capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"stage 2 failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        flat_copy(chunks, flat)
        manifest = json.loads((chunks / "manifest.json").read_text())
        readers = {"parquet": chunk_rows(chunks, manifest, "train", context, manifest["vocab_size"]),
                   "bin": chunk_rows(flat, json.loads((flat / "manifest.json").read_text()), "train", context,
                                     manifest["vocab_size"])}
        rng = np.random.default_rng(0)
        per_round = {name: [] for name in readers}
        for r in range(args.reader_rounds):
            index = rng.integers(0, len(readers["bin"]), (args.reader_batches, 16))
            for name in (("bin", "parquet") if r % 2 else ("parquet", "bin")):  # alternate which goes first
                t0 = time.perf_counter()
                for batch in index:
                    readers[name][batch]
                per_round[name].append((time.perf_counter() - t0) * 1e3 / args.reader_batches)
        np.testing.assert_array_equal(readers["parquet"][index[0]], readers["bin"][index[0]])
        out = {"train_rows": len(readers["bin"]), "shards": len(manifest["splits"]["train"]["shards"]),
               "bytes_on_disk": {name: sum(f.stat().st_size for f in (d / "train").iterdir())
                                 for name, d in (("parquet", chunks), ("bin", flat))}}
        for name, times in per_round.items():
            out[name] = {"ms_per_batch": round(statistics.median(times), 4), "rounds": [round(t, 4) for t in times]}
        result[f"16x{context + 1}"] = out
        shutil.rmtree(chunks), shutil.rmtree(flat)
    result["cpu_step_ms"] = round(cpu_preset_step_ms(manifest["vocab_size"]), 1)
    for shape, step, what in (("16x1025", args.gpu_step_ms, "gpt2-100m GPU step"),
                              ("16x129", result["cpu_step_ms"], "cpu preset step")):
        for name in ("parquet", "bin"):
            ms = result[shape][name]["ms_per_batch"]
            result[shape][name][f"percent_of_{what.replace(' ', '_')}"] = round(100 * ms / step, 3)
        p, b = result[shape]["parquet"]["ms_per_batch"], result[shape]["bin"]["ms_per_batch"]
        disk = {name: size / 1e6 for name, size in result[shape]["bytes_on_disk"].items()}
        print(f"reader, batch of {shape} tokens: parquet {p:.3f} ms, bin {b:.3f} ms per batch = {100 * p / step:.2f}% "
              f"vs {100 * b / step:.3f}% of a {what} ({step:.0f} ms); on disk parquet {disk['parquet']:.1f} MB, "
              f"bin {disk['bin']:.1f} MB")
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=["throughput", "rss", "reader"],
                    default=["throughput", "rss", "reader"],
                    help="what to measure besides tokenizer training (default: all)")
    ap.add_argument("--slice-mb", type=float, default=8.0, help="text for the throughput comparison")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--rss-tokens", type=float, default=2e8, help="train tokens of the big chunk set")
    ap.add_argument("--rss-steps", type=int, default=20, help="training steps on each chunk set")
    ap.add_argument("--reader-tokens", type=float, default=5e6, help="tokens of each reader benchmark chunk set")
    ap.add_argument("--reader-rounds", type=int, default=9, help="A/B rounds of the reader benchmark")
    ap.add_argument("--reader-batches", type=int, default=200, help="batches per reader and round")
    ap.add_argument("--gpu-step-ms", type=float, default=130.0,
                    help="ms of a gpt2-100m step of 16 x 1024 on one GPU, to compare the reader's cost with")
    args = ap.parse_args()
    if not default_corpus_files("train"):
        sys.exit(f"embedded corpus missing in {DATA_DIR}: run python data/build_default_corpus.py")
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))

    # 1. tokenizer training
    stage1 = load_script("PreTrain/train_byte_level_bpe_tokenizer.py")
    texts = [d["text"] for f in default_corpus_files("train") for d in read_jsonl_gz(f)]
    train_mb = sum(len(t.encode()) for t in texts) / 1e6
    t0 = time.perf_counter()
    tok = stage1.train(texts, vocab_size=8192)
    train_seconds = time.perf_counter() - t0
    stage1.save(tok, work / "tokenizer")
    print(f"tokenizer training: {train_mb:.1f} MB in {train_seconds:.1f}s = {train_seconds / train_mb:.2f} s/MB")
    del texts

    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    result = {"cpu_count": os.cpu_count(), "loadavg_start": load_start,
              "tokenizer_training": {"vocab_size": 8192, "mb": round(train_mb, 2), "seconds": round(train_seconds, 2),
                                     "seconds_per_mb": round(train_seconds / train_mb, 3)}}
    if "throughput" in args.parts:
        result["throughput"] = throughput(work, args, env)
    if "rss" in args.parts:
        result["rss"] = rss_vs_chunk_set_size(work, work / "tokenizer", args, env)
    if "reader" in args.parts:
        result["reader"] = reader_cost(work, work / "tokenizer", args, env)
    result["loadavg_end"] = os.getloadavg()
    out = REPO / "bench" / "results" / "bench_data.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
