"""Benchmark the pretraining step (PreTrain/model.py) against the plain reference step, and data loading.

Reads:  PreTrain/model.py, ../shared/bench/reference_gpt2_step.py (skipped with a message if missing),
        pretrain_data_chunks/ + tokenizer/ if they exist (else tiny chunks are written to a temp dir).
Writes: bench/results/bench_pretrain.json

    .venv/bin/python bench/bench_pretrain.py                  # cpu preset sizes + gpt2-124m (batch 1), ~10 min
    .venv/bin/python bench/bench_pretrain.py --rounds 5 --skip-124m

1. Step speed: our training step (model.py's own engine, forward_backward() and update(): the GPT of llm_train/gpt.py
   and fused AdamW, in the dtype
   model.py picks: --dtype, else $LLM_TRAIN_DTYPE, else bf16 autocast where the CPU has bf16 units and fp32
   otherwise) vs the reference's plain eager step at the same sizes, dtype and batch, each in a fresh subprocess,
   interleaved A/B/A/B for --rounds rounds; the ratio of medians of tokens/s is reported (goal >= 1.3x). At the cpu
   preset's sizes twice: our step eager, and compiled as `make all` runs it (--compile; compile time not counted).
2. Data loading: our step fed by model.py's Batches over real chunk rows vs a fixed synthetic tensor, interleaved;
   the real-data step time should be within 5% of the synthetic one.
3. fp32 and bf16 matmul rates of this machine (what model.py measures for MFU on CPU).
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llm_train.atomic import atomic_write_json
from llm_train.chunks import chunk_rows
from llm_train.cli import nonnegative_int, positive_int
from llm_train.gpt import GPT
from llm_train.paths import CHUNKS_DIR, TOKENIZER_DIR, load_script
from llm_train.pretrain_data import Batches, read_manifest
from llm_train.runtime import DTYPE_ENV, DTYPES, cpu_has_fast_bf16, dtype_name

REPO = Path(__file__).resolve().parents[1]

REFERENCE = REPO.parent / "shared" / "bench" / "reference_gpt2_step.py"
RESULTS = REPO / "bench" / "results" / "bench_pretrain.json"


def worker(a):
    """Time our step in this process (called as a subprocess): prints one JSON line like the reference."""
    import numpy as np
    import torch

    m = load_script("PreTrain/model.py")
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)  # as model.py trains on CPU
    model = GPT(a.vocab, a.ctx, a.layers, a.dim, a.heads)
    dist = argparse.Namespace(distributed=False, device=torch.device("cpu"), local_rank=0)
    optimizer = {"lr": 3e-4, "betas": (0.9, 0.95), "weight_decay": 0.1}
    # compiled: the first (warm-up) step pays the compile
    engine = m.build_engine(model, dist, a.compile, a.dtype == "bf16", optimizer)
    if a.chunks:  # real chunk rows through model.py's data path, read from disk as it reads them
        manifest = json.loads((Path(a.chunks) / "manifest.json").read_text(encoding="utf-8"))
        rows = chunk_rows(a.chunks, manifest, "train", min(a.ctx, manifest["context_length"]), a.vocab)
    else:  # synthetic: the same rows every step, no sampling
        rows = np.random.default_rng(0).integers(0, a.vocab, (a.batch, a.ctx + 1), dtype=np.int32)

    class Fixed:
        def get(self, step, micro):
            batch = fixed
            return batch[:, :-1], batch[:, 1:]

    fixed = torch.from_numpy(rows[: a.batch].astype(np.int64))
    batches = Batches(rows, a.batch, 1, 0, 1, seed=0) if a.chunks else Fixed()
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        loss = m.forward_backward(engine, batches, i, 1, dist.device)
        m.update(engine, True, 1.0)
        loss.item()
        times.append(time.perf_counter() - t0)
    elapsed = sum(times[a.warmup:])
    print(json.dumps({"tokens_per_s": round(a.batch * a.ctx * a.steps / elapsed, 1),
                      "median_step_s": statistics.median(times[a.warmup:])}))


def run_json(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def size_args(c):
    return ["--layers", c["layers"], "--dim", c["dim"], "--heads", c["heads"], "--ctx", c["ctx"], "--batch",
            c["batch"], "--vocab", c["vocab"], "--steps", c["steps"], "--warmup", c["warmup"], "--dtype", c["dtype"]]


def compare(name, c, rounds, ours_flags=()):
    ours_cmd = [sys.executable, __file__, "--worker", *map(str, size_args(c)), *ours_flags]
    ref_cmd = [sys.executable, str(REFERENCE), *map(str, size_args(c))]
    ours, ref = [], []
    for r in range(rounds):
        ours.append(run_json(ours_cmd)["tokens_per_s"])
        ref.append(run_json(ref_cmd)["tokens_per_s"])
        print(f"  {name} round {r + 1}/{rounds}: ours {ours[-1]:,.0f} tok/s, reference {ref[-1]:,.0f} tok/s",
              flush=True)
    result = {"config": c, "ours_tokens_per_s": ours, "reference_tokens_per_s": ref,
              "ours_median": statistics.median(ours), "reference_median": statistics.median(ref)}
    result["speedup"] = result["ours_median"] / result["reference_median"]
    print(f"{name}: ours {result['ours_median']:,.0f} tok/s vs reference {result['reference_median']:,.0f} tok/s "
          f"-> {result['speedup']:.2f}x (goal >= 1.3x, floor 1.0x)", flush=True)
    return result


def real_chunks(c, tmp):
    """(dir, training rows) of real chunks for the worker: pretrain_data_chunks/, or tiny ones made here."""
    chunks, tok_dir = CHUNKS_DIR, TOKENIZER_DIR
    if not (chunks / "manifest.json").is_file():  # the real stage scripts, on the embedded corpus, small
        tok_dir, chunks = Path(tmp) / "tok", Path(tmp) / "chunks"
        subprocess.run([sys.executable, str(REPO / "PreTrain" / "train_byte_level_bpe_tokenizer.py"), "--vocab-size",
                        str(c["vocab"]), "--max-chars", "1e6", "--output-dir", str(tok_dir)], check=True)
        subprocess.run([sys.executable, str(REPO / "PreTrain" / "preprocess_dataset_for_pretrain_map.py"),
                        "--tokenizer-dir", str(tok_dir), "--output-dir", str(chunks), "--context-length", str(c["ctx"]),
                        "--max-tokens", "3e5"], check=True)
        print(f"  (no {CHUNKS_DIR}/manifest.json: using small chunks written to {chunks})")
    manifest = read_manifest(chunks, tok_dir)  # the worker reads the rows as model.py does, never all at once
    return chunks, len(chunk_rows(chunks, manifest, "train", min(c["ctx"], manifest["context_length"]),
                                         c["vocab"]))


def matmul_peak(dtype):
    import torch

    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    best = 0.0
    for _ in range(4):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * 1024**3 / (time.perf_counter() - t0))
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name, default in [("layers", 4), ("dim", 256), ("heads", 4), ("ctx", 256), ("batch", 16),
                          ("vocab", 8192), ("steps", 6), ("warmup", 2)]:
        ap.add_argument(f"--{name}", type=nonnegative_int if name == "warmup" else positive_int,
                        default=default)
    ap.add_argument("--dtype", choices=DTYPES, default=None,
                    help=f"compute dtype of both steps (default: ${DTYPE_ENV}, else what model.py picks here)")
    ap.add_argument("--chunks", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)  # worker: torch.compile our step
    ap.add_argument("--rounds", type=positive_int, default=3)
    ap.add_argument("--skip-124m", action="store_true")
    a = ap.parse_args()
    if a.worker:
        return worker(a)

    import torch

    m = load_script("PreTrain/model.py")
    p = m.PRESETS["cpu"]
    dtype = dtype_name(a.dtype)  # the dtype model.py trains in here, decided in one place
    cpu_cfg = {"layers": p["n_layer"], "dim": p["n_embd"], "heads": p["n_head"], "ctx": p["context_length"],
               "batch": p["batch_size"], "vocab": 8192, "steps": 4, "warmup": 1, "dtype": dtype}
    results = {"machine": {"threads": torch.get_num_threads(), "fast_bf16": cpu_has_fast_bf16()}, "dtype": dtype}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        results[f"{name}_matmul_flops"] = matmul_peak(dt)
        print(f"{name} 1024^3 matmul: {results[f'{name}_matmul_flops'] / 1e9:.1f} GFLOP/s", flush=True)
    if dtype == "fp32" and not cpu_has_fast_bf16():
        print("this CPU has no bf16 matmul units (no AMX/AVX512-BF16): bf16 is far slower than fp32 here, so both "
              "steps are compared in fp32, the dtype model.py uses on this machine")
    if REFERENCE.is_file():
        results["cpu_preset"] = compare("cpu preset", cpu_cfg, a.rounds)
        # more steps: a compiled step is short, and 4 would be mostly timer noise
        results["cpu_preset_compiled"] = compare("cpu preset, ours compiled", {**cpu_cfg, "steps": 20, "warmup": 2},
                                                 a.rounds, ["--compile"])
        if not a.skip_124m:
            big = {"layers": 12, "dim": 768, "heads": 12, "ctx": 1024, "batch": 1, "vocab": 50304, "steps": 2,
                   "warmup": 1, "dtype": dtype}
            results["gpt2_124m"] = compare("gpt2-124m", big, max(2, a.rounds - 1))
    else:
        print(f"reference step not found at {REFERENCE}: skipping the comparison")
        results["reference"] = f"missing: {REFERENCE}"

    with tempfile.TemporaryDirectory() as tmp:
        chunks, n_rows = real_chunks(cpu_cfg, tmp)
        base = [sys.executable, __file__, "--worker", *map(str, size_args({**cpu_cfg, "steps": 8}))]
        real, synthetic = [], []
        for _ in range(a.rounds):
            real.append(run_json(base + ["--chunks", str(chunks)])["median_step_s"])
            synthetic.append(run_json(base)["median_step_s"])
        ratio = statistics.median(real) / statistics.median(synthetic)
        results["data_loading"] = {"real_rows": n_rows, "real_step_s": real, "synthetic_step_s": synthetic,
                                   "real_over_synthetic": ratio}
        print(f"data loading: step with real chunks {statistics.median(real) * 1e3:.1f} ms vs synthetic "
              f"{statistics.median(synthetic) * 1e3:.1f} ms -> {ratio:.3f}x (goal <= 1.05)")
    atomic_write_json(RESULTS, results)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
