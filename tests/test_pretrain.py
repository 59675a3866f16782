"""Pretraining stage (PreTrain/model.py, ds_config.json, inference.py): tiny models on tiny chunks, real code paths.

One plain reference run (a global batch of 8 rows per optimizer step, fp32) is shared: every other way of taking the
same 8 rows per step (grad accumulation on the plain path, DDP with 2 ranks, DeepSpeed ZeRO-2 with 2 ranks, 2 "nodes"
of 1 process on localhost) must reproduce its loss curve, a killed and resumed run must reproduce it exactly, and a
rerun of it must do nothing."""
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
from argparse import Namespace
from pathlib import Path

from llm_train import paths
from llm_train import pretrain_checkpoint as checkpoints
from llm_train.chunks import chunk_rows, write_shard
from llm_train.errors import UserError
from llm_train.gpt import GPT, hf_state_dict, padded_vocab, save_hf
from llm_train.lineage import check_lineage, output_fingerprint, read_lineage, write_lineage
from llm_train.pretrain_data import Batches, read_manifest, val_row_indices
from llm_train.pretrain_schedule import Schedule, plan_schedule
from llm_train.runtime import DTYPE_ENV, dtype_name
from llm_train.tokenizer import load_tokenizer, tokenizer_fingerprint

import numpy as np
import pytest
import torch

from conftest import BOTH_DTYPES, PY, REPO, free_port, load_script, run_group, run_script, sample_texts

CTX = 32
TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--context-length", CTX, "--batch-size", "4",
        "--global-batch-tokens", 4 * CTX, "--warmup-steps", "2", "--eval-interval", "4", "--eval-rows", "6",
        "--log-interval", "1"]
# The shared schedule: 6 steps of 8 rows (global batch), checkpoints (and validation) after steps 3 and 6.
SCHEDULE = ["--max-steps", 6, "--global-batch-tokens", 8 * CTX, "--checkpoint-interval", 3, "--eval-interval", 3]
FP32 = {DTYPE_ENV: "fp32"}
# Same rows per step, fp32: the curves differ only by summation order (micro-batch means vs one batch mean, the
# all-reduce / reduce-scatter over ranks), ~1e-7 relative per step, which Adam passes on. Measured over the 6 steps
# (losses ~6.3): plain accum and DDP 9.5e-7, DeepSpeed 4.8e-7, i.e. 1-2 float32 ulps. 1e-4 leaves room for other
# CPUs' kernels and is still ~100x below the loss change of one step (~1e-2): stepping on every micro batch, a
# wrong loss scale under clipping or other rows would all move the curve by far more.
CURVE_ATOL = 1e-4


def write_chunks(tokenizer_dir, out_dir, context_length=CTX, texts=None):
    """Chunks in exactly the manifest/shard format of PreTrain/preprocess_dataset_for_pretrain_map.py."""
    tok = load_tokenizer(tokenizer_dir)
    row_length = context_length + 1
    splits = {}
    texts = texts or sample_texts()
    for split, docs in (("train", texts[1:]), ("val", texts[:1] + texts[-20:])):
        ids, nbytes = [], 0
        for t in docs:
            ids += tok(t)["input_ids"] + [tok.eos_token_id]
            nbytes += len(t.encode())
        n = len(ids) // row_length
        rows = np.array(ids[: n * row_length], dtype="<u2").reshape(n, row_length)
        shards = []
        for i, part in enumerate(np.array_split(rows, 2)):
            rel = f"{split}/shard_{i:05d}.parquet"
            write_shard(out_dir / rel, part, row_length, "<u2")
            shards.append(rel)
        splits[split] = {"shards": shards, "rows": n, "tokens": n * row_length, "bytes": nbytes, "documents": len(docs)}
    manifest = {"format": 3, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer_dir),
                "vocab_size": len(tok), "eot_id": tok.eos_token_id, "context_length": context_length,
                "row_length": row_length, "dtype": "<u2", "splits": splits, "sources": ["test"], "seconds": 0.0}
    (out_dir / "manifest.json").write_text(json.dumps(manifest))
    return out_dir


@pytest.fixture(scope="module")
def chunks_dir(tiny_tokenizer_dir, tmp_path_factory):
    return write_chunks(tiny_tokenizer_dir, tmp_path_factory.mktemp("chunks"))


@pytest.fixture(scope="module")
def model_module():
    return load_script("PreTrain/model.py")


def dirs(tmp_path, tokenizer_dir, chunks):
    return ["--tokenizer-dir", tokenizer_dir, "--chunks-dir", chunks, "--output-dir", tmp_path / "output",
            "--checkpoint-dir", tmp_path / "ckpt", "--log-file", tmp_path / "train.log",
            "--tensorboard-dir", tmp_path / "runs"]


def history(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "history.jsonl").read_text().splitlines()]


def losses(out_dir):
    return {h["step"]: h["loss"] for h in history(out_dir) if "loss" in h}


def val_losses(out_dir):
    return {h["step"]: h["val_loss"] for h in history(out_dir) if "val_loss" in h}


def summary(out_dir):
    return json.loads((Path(out_dir) / "pretrain_summary.json").read_text())


def assert_same_curve(out_dir, reference_out):
    """The train loss and the gradient norm (before clipping) of every step, and the val loss of steps 3 and 6, equal
    the reference run's, to CURVE_ATOL. The norm catches a wrong loss scale that the loss cannot show: Adam is blind
    to the gradient's scale and clipping rescales it. The val loss: the same --eval-rows rows at any micro batch size
    and number of ranks."""
    for key, steps in (("loss", range(1, 7)), ("grad_norm", range(1, 7)), ("val_loss", (3, 6))):
        ours, ref = ({h["step"]: h[key] for h in history(d) if key in h} for d in (out_dir, reference_out))
        assert sorted(ours) == sorted(ref) == list(steps)
        np.testing.assert_allclose([ours[s] for s in steps], [ref[s] for s in steps], rtol=0, atol=CURVE_ATOL,
                                   err_msg=key)


def launch(launcher, nproc, args, env=None, check=True):
    """model.py under a launcher with a free rendezvous port: torchrun, the legacy torch.distributed.launch, or the
    deepspeed launcher on the CPU accelerator."""
    port = str(free_port())
    if launcher == "deepspeed":
        cmd = [str(Path(PY).parent / "deepspeed"), f"--num_gpus={nproc}", "--master_port", port]
        env = {"DS_ACCELERATOR": "cpu", **(env or {})}
    else:
        module = ["torch.distributed.run"] if launcher == "torchrun" else ["torch.distributed.launch", "--use_env"]
        cmd = [PY, "-m", *module, f"--nproc_per_node={nproc}", "--master_port", port]
    proc = run_group([*cmd, str(REPO / "PreTrain/model.py"), *map(str, args)], timeout=600, cwd=REPO,
                     env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not leaked_deepspeed_shm(port)
    return proc


def leaked_deepspeed_shm(port):
    """The /dev/shm files that DeepSpeed's CPU all-reduce of the run on this port left behind (RAM until a reboot)."""
    return list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def launch_two_nodes(launcher, args, workdir):
    """model.py as 2 nodes x 1 process on localhost, each "node" its own launcher process (so both workers have
    LOCAL_RANK 0): torchrun with a c10d rendezvous, or the deepspeed launcher's --no_ssh mode with a hostfile of 2
    hosts. Returns each launcher's (returncode, output)."""
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", **FP32}  # one core per "node"
    if launcher == "deepspeed":
        hostfile = workdir / "hostfile"
        hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two names: the launcher wants distinct hosts
        env["DS_ACCELERATOR"] = "cpu"
        cmds = [[str(Path(PY).parent / "deepspeed"), "--no_ssh", "--node_rank", str(node), "--hostfile", str(hostfile),
                 "--master_addr", "127.0.0.1", "--master_port", port] for node in (0, 1)]
    else:
        cmds = [[PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                 "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", port]
                for node in (0, 1)]
    logs = [workdir / f"node{node}.out" for node in (0, 1)]  # files, not pipes: a full pipe would stall a node
    procs = []
    for cmd, log in zip(cmds, logs):
        with open(log, "w") as out:
            procs.append(subprocess.Popen([*cmd, str(REPO / "PreTrain/model.py"), *map(str, args)], cwd=REPO, env=env,
                                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        results = [(proc.wait(timeout=600), log.read_text()) for proc, log in zip(procs, logs)]
    finally:  # no rank outlives the test
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    assert not leaked_deepspeed_shm(port)  # killed runs too
    return results


@pytest.fixture(scope="module")
def reference(tiny_tokenizer_dir, chunks_dir, tmp_path_factory):
    """The plain single-process run of SCHEDULE with 8 rows per step (batch 8, no accumulation), in fp32."""
    out = tmp_path_factory.mktemp("reference")
    run_script("PreTrain/model.py", *TINY, *SCHEDULE, "--batch-size", 8, *dirs(out, tiny_tokenizer_dir, chunks_dir),
               env=FP32)
    return out


def step_lines_read_as_a_reader_would(log_text):
    """{step: loss} from train.log. A step logged twice must have a "resumed at step N" line with N below it in
    between (the resume marks the killed run's later lines as superseded); anything else fails."""
    current = {}
    for line in log_text.splitlines():
        mark = re.search(r"resumed at step (\d+) from ", line)
        if mark:
            current = {s: v for s, v in current.items() if s <= int(mark.group(1))}
        m = re.search(r"step +(\d+) \| loss ([\d.]+)", line)
        if m:
            step = int(m.group(1))
            assert step not in current, f"step {step} logged twice without a resume mark in between"
            current[step] = float(m.group(2))
    return current


# ---------------------------------------------------------------------------------------------------------------
# Units: schedule, batches, export.
def schedule_of(lr, warmup_steps, max_steps, min_lr_ratio):
    return Schedule(grad_accum=1, max_steps=max_steps, warmup_steps=warmup_steps, lr=lr, min_lr_ratio=min_lr_ratio)


def test_lr_schedule_exact_values(reference):
    schedule = schedule_of(lr=1.0, warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    got = [schedule.lr_at(s) for s in (0, 1, 2, 3, 4, 9, 14, 20)]
    # warmup (s+1)/4; then 0.1 + 0.45 * (1 + cos(pi * (s - 4) / 10)): 1 at s=4, 0.55 halfway, the floor 0.1 at the
    # end and after it
    assert got == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.55, 0.1, 0.1], abs=1e-15)
    assert schedule_of(lr=3e-3, warmup_steps=0, max_steps=10, min_lr_ratio=0.0).lr_at(0) == 3e-3
    # the run used exactly this schedule: the lr logged for step s (1-based) is lr_at(s - 1) with its flags
    run_schedule = schedule_of(**{k: read_lineage(reference / "output")["settings"][k]
                                  for k in ("lr", "warmup_steps", "max_steps", "min_lr_ratio")})
    assert {h["step"]: h["lr"] for h in history(reference / "output") if "lr" in h} == {
        s: run_schedule.lr_at(s - 1) for s in range(1, 7)}


def test_batches_disjoint_across_ranks_and_deterministic():
    rows = np.arange(100, dtype=np.int32)[:, None].repeat(5, 1)
    per_rank = [Batches(rows, 3, 2, r, 2, seed=7) for r in range(2)]
    seen = [set(b.get(step, m)[0][:, 0].tolist()) for step in range(4) for m in range(2) for b in per_rank]
    assert sum(map(len, seen)) == len(set().union(*seen)) == 48  # 4 steps x 2 micro x 2 ranks x 3 rows, no repeats
    again = Batches(rows, 3, 2, 1, 2, seed=7)
    assert torch.equal(again.get(3, 1)[0], per_rank[1].get(3, 1)[0])


def test_every_split_of_a_step_takes_the_same_rows():
    """What the accumulation tests rely on: batch 8 x 1 rank, batch 4 x accum 2, and batch 2 x accum 2 x 2 ranks
    read the same 8 rows in each step (across an epoch boundary too: 100 rows, 8 per step)."""
    rows = np.arange(100, dtype=np.int32)[:, None].repeat(5, 1)

    def step_rows(batch, accum, ranks, step):
        per_rank = [Batches(rows, batch, accum, rank, ranks, seed=3) for rank in range(ranks)]
        return sorted(r for b in per_rank for m in range(accum) for r in b.get(step, m)[0][:, 0].tolist())

    for step in (0, 5, 12, 13):
        assert step_rows(8, 1, 1, step) == step_rows(4, 2, 1, step) == step_rows(2, 2, 2, step)
        assert len(set(step_rows(8, 1, 1, step))) == 8


def test_global_batch_and_length_are_the_same_on_any_number_of_ranks(model_module):
    """gpt2-100m's global batch of 524,288 tokens is 32 micro batches of 16 x 1024 on 1 GPU, 16 on 2, 4 on 8: the
    same steps either way. Its 2B-token budget is capped at --max-epochs 4 of the data present (the embedded
    corpus: 3.8M tokens at context 1024 with the 50k tokenizer, measured), with the warmup cut to a tenth of that
    short run; on 2.2B tokens of real data it is 3815 steps, warmup 200. A split that does not divide is one error
    naming the numbers and what to change."""
    def schedule(world_size, rows, *flags):
        a = model_module.parse_args(["--preset", "gpt2-100m", *flags])
        s = plan_schedule(a.global_batch_tokens, a.batch_size, a.context_length, world_size, rows, "chunks",
                          max_steps=a.max_steps, max_tokens=a.max_tokens, max_epochs=a.max_epochs,
                          warmup_steps=a.warmup_steps, warmup_from_preset=a.warmup_from_preset, lr=a.lr,
                          min_lr_ratio=a.min_lr_ratio)
        return s.grad_accum, s.max_steps, s.warmup_steps, s.description

    embedded = 3705  # rows of 1024 tokens
    runs = {w: schedule(w, embedded) for w in (1, 2, 8)}
    assert [runs[w][0] for w in (1, 2, 8)] == [32, 16, 4]
    assert {runs[w][1:3] for w in runs} == {(28, 2)}  # 28 x 524,288 = 14.7M tokens <= 4 x 3.79M
    assert ("training 14,680,064 tokens = 3.87 epochs over the 3,793,920 training tokens of" in runs[8][3]
            and "16 rows x 4 micro batches x 8 ranks" in runs[8][3]
            and "--max-tokens 2,000,000,000 capped at --max-epochs 4" in runs[8][3])
    assert schedule(8, 2_200_000_000 // 1024)[:3] == (4, 3815, 200)  # real data: the budget, uncapped
    assert schedule(1, embedded, "--max-epochs", "1")[1] == 7  # whole steps within the cap
    assert schedule(1, embedded, "--max-steps", "100", "--warmup-steps", "50")[1:3] == (100, 50)  # flags win

    with pytest.raises(UserError, match=r"--global-batch-tokens 524288 does not split into micro batches of "
                                               r"--batch-size 24 x --context-length 1024 tokens on 1 rank: 524288 is "
                                               r"not a multiple of 24 x 1024 x 1 = 24576\. Pass a --batch-size that "
                                               r"divides 512 \(2, 4, 8, 16, ...\) or a --global-batch-tokens"):
        schedule(1, embedded, "--batch-size", "24")
    with pytest.raises(UserError, match=r"on 3 ranks: .* = 49152\. Pass a --global-batch-tokens that is a "
                                               r"multiple of 49152 \(e.g. 540672\)$"):  # no batch size fits
        schedule(3, embedded)


def numbered_chunks(out_dir, shard_rows, row_length):
    """A chunk set whose token j of global row r is r * 100 + j: every row and window says where it came from."""
    splits = {}
    for split in ("train", "val"):
        shards, first = [], 0
        for i, n in enumerate(shard_rows):
            rows = (np.arange(first, first + n)[:, None] * 100 + np.arange(row_length)).astype("<u2")
            (out_dir / split).mkdir(parents=True, exist_ok=True)
            rows.tofile(out_dir / split / f"shard_{i:05d}.bin")
            shards.append(f"{split}/shard_{i:05d}.bin")
            first += n
        splits[split] = {"shards": shards, "rows": first}
    return {"format": 2, "row_length": row_length, "dtype": "<u2", "splits": splits}


def test_rows_are_read_lazily_and_ranks_share_them_out(tmp_path):
    """chunk_rows reads no shard up front (a shard rewritten after it is what later batches see, and it allocates
    next to nothing for 3 MB of shards); over one epoch the 2 ranks' batches are disjoint and cover every (row,
    window) of the split exactly once, and equal those of the same split loaded into memory."""
    import tracemalloc

    manifest = numbered_chunks(tmp_path, [200, 55, 345], row_length=33)  # 600 rows in 3 shards: 39,600 bytes
    tracemalloc.start()
    rows = chunk_rows(tmp_path, manifest, "train", 16, 10**6)  # windows of 16 + 1 tokens: 2 per row
    allocated = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(rows) == 1200 and allocated < 8000  # measured 2.3 KB; np.asarray(rows): 138 KB
    assert not isinstance(rows, np.ndarray)
    np.testing.assert_array_equal(rows[[0, 600, 255, 1199]], [np.arange(17), np.arange(16, 33),
                                                             25500 + np.arange(17), 59916 + np.arange(17)])
    in_memory = np.asarray(rows)
    assert in_memory.shape == (1200, 17)

    batches = [Batches(rows, 3, 2, rank, 2, seed=5) for rank in range(2)]
    steps_per_epoch = 1200 // 12
    seen = [[tuple(b.get(step, micro)[0][:, 0].tolist()) for step in range(steps_per_epoch) for micro in range(2)]
            for b in batches]
    per_rank = [[first for batch in s for first in batch] for s in seen]
    everything = sorted(per_rank[0] + per_rank[1])
    assert not set(per_rank[0]) & set(per_rank[1])
    assert everything == sorted(r * 100 + 16 * w for r in range(600) for w in range(2))  # each (row, window) once
    for rank in range(2):
        loaded = Batches(in_memory, 3, 2, rank, 2, seed=5)
        for step, micro in ((0, 0), (37, 1), (99, 1), (100, 0)):  # step 100 starts the next epoch
            assert torch.equal(loaded.get(step, micro)[0], batches[rank].get(step, micro)[0])

    # read when indexed, not before: rewrite row 3 of shard 1 (global row 203) on disk
    shard = tmp_path / "train" / "shard_00001.bin"
    data = np.fromfile(shard, "<u2").reshape(-1, 33)
    data[3] = 7
    data.tofile(shard)
    np.testing.assert_array_equal(rows[[203, 803]], [[7] * 17, [7] * 17])
    # a token id outside the vocabulary names the shard and row
    with pytest.raises(UserError, match=r"shard_00001.bin, row 3: token id outside the vocabulary \(size 7\)"):
        chunk_rows(tmp_path, manifest, "train", 16, 7)[[203]]
    # a truncated shard is found when loading
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UserError, match="shard_00001.bin: 3628 bytes is not a whole number of rows of 33"):
        chunk_rows(tmp_path, manifest, "train", 16, 10**6)


@BOTH_DTYPES
def test_hf_export_logits_match(dtype, tiny_tokenizer_dir, tmp_path, monkeypatch):
    """output/ holds fp32 weights whatever the training dtype; the exported GPT2LMHeadModel, run as a user runs it
    (inference.py: fp32 weights under bf16 autocast on the bf16 path), gives our model's logits under the same
    precision. The model trains with its embedding padded to a multiple of 64 rows (600 tokens -> 640): the export
    has the tokenizer's 600, loads with AutoModelForCausalLM, and its logits are the padded model's first 600 (the
    padding's are -inf). A Conv1D weight left untransposed must fail the same comparison. Its MLP activation is
    the training's fused tanh GELU, bit for bit."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv(DTYPE_ENV, dtype)
    torch.manual_seed(0)
    tok = load_tokenizer(tiny_tokenizer_dir)
    assert len(tok) == 600 and padded_vocab(len(tok)) == 640 and padded_vocab(50000) == 50048
    model = GPT(len(tok), 48, 3, 48, 4, padded_vocab_size=640).eval()
    assert model.transformer.wte.weight.shape == (640, 48)
    with torch.no_grad():  # non-trivial biases and LayerNorm params so a wrong mapping cannot hide; weights of
        for name, p in model.named_parameters():  # std 0.2 give logits of std ~1.4 (GPT-2 init: ~0.02)
            if p.dim() == 1:
                p.normal_(0, 0.1).add_(1.0 if re.search(r"ln_.\.weight", name) else 0.0)
            else:
                p.normal_(0, 0.2)
    state = hf_state_dict(model)
    save_hf(state, model.config, tok, tiny_tokenizer_dir, tmp_path / "good")
    broken = {k: v.t().contiguous() if k.endswith("attn.c_proj.weight") else v for k, v in state.items()}  # square
    save_hf(broken, model.config, tok, tiny_tokenizer_dir, tmp_path / "broken")
    idx = torch.randint(0, len(tok), (2, 48))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype_name() == "bf16")
    with torch.no_grad(), autocast:
        padded = model(idx)
        theirs = {d: AutoModelForCausalLM.from_pretrained(str(tmp_path / d)).eval()(idx).logits.float()
                  for d in ("good", "broken")}
    assert padded.shape[-1] == 640 and torch.isneginf(padded[..., 600:]).all()
    ours = padded[..., :600]
    # fp32: the same math in another op order, ~2e-6 apart (measured). bf16: both models compute in bf16 (8
    # significant bits) and round at different places (HF's Conv1D addmm vs F.linear, attention layouts), and the
    # logits come out in bf16, in steps of 2^-5 = 0.03 for |logit| 4..8: they end 1-2 such steps apart (measured max
    # 0.047). A layout error moves the logits by ~1.3 on average (max ~8) in both dtypes.
    atol, rtol = {"fp32": (2e-5, 1e-4), "bf16": (0.1, 0.02)}[dtype]
    torch.testing.assert_close(theirs["good"], ours, atol=atol, rtol=rtol)
    assert (theirs["broken"] - ours).abs().mean() > 5 * atol
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "good"))
    assert hf.config.vocab_size == len(tok) == hf.transformer.wte.weight.shape[0]
    assert torch.equal(hf.transformer.wte.weight, model.transformer.wte.weight[:600])
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied
    assert all(t.dtype == torch.float32 for t in hf.state_dict().values())
    # the MLP runs the fused tanh GELU the model trained with, not GPT-2's "gelu_new" (same formula in separate ops,
    # other roundings, slower: bench/bench_activation.py)
    x = torch.randn(4096) * 4
    assert torch.equal(hf.transformer.h[0].mlp.act(x), torch.nn.functional.gelu(x, approximate="tanh"))


# ---------------------------------------------------------------------------------------------------------------
# Training runs.
@BOTH_DTYPES
def test_pretrain_step_under_both_dtypes(dtype, tiny_tokenizer_dir, chunks_dir, tmp_path):
    """A 2-step run under LLM_TRAIN_DTYPE: the first loss is our fp32 model's loss on the first batch, exactly in
    fp32 and to bf16 precision (but not equal: autocast did run) in bf16; output/ holds the trained weights."""
    from safetensors.torch import load_file

    run_script("PreTrain/model.py", *TINY, "--max-steps", 2, "--checkpoint-interval", 2,
               *dirs(tmp_path, tiny_tokenizer_dir, chunks_dir), env={DTYPE_ENV: dtype})
    out = tmp_path / "output"
    assert summary(out)["dtype"] == dtype and f", {dtype}, " in (tmp_path / "train.log").read_text()
    tok = load_tokenizer(tiny_tokenizer_dir)
    manifest = read_manifest(chunks_dir, tiny_tokenizer_dir)
    rows = chunk_rows(chunks_dir, manifest, "train", CTX, len(tok))
    torch.manual_seed(1337)  # the run's --seed: the same initial weights (of a padded embedding)
    model = GPT(len(tok), CTX, 2, 32, 2, padded_vocab(len(tok)))
    with torch.no_grad():
        first = model(*Batches(rows, 4, 1, 0, 1, seed=1337).get(0, 0)).item()
    if dtype == "fp32":
        assert losses(out)[1] == pytest.approx(first, abs=1e-5)  # thread-count dependent summation order only
    else:  # bf16 logits of a ~6.4 loss: relative 2^-9 rounding -> ~1e-2
        assert losses(out)[1] != first and losses(out)[1] == pytest.approx(first, abs=3e-2)
    trained = GPT(len(tok), CTX, 2, 32, 2, 640)  # the checkpoint keeps the padded rows
    trained.load_state_dict(load_file(str(tmp_path / "ckpt" / "step_000002" / "model.safetensors")))
    exported = load_file(str(out / "model.safetensors"))
    expected = hf_state_dict(trained)
    expected["transformer.wte.weight"] = expected["transformer.wte.weight"][:len(tok)]  # the export: the tokenizer's
    assert exported.keys() <= expected.keys() and all(torch.equal(exported[k], expected[k]) for k in exported)


def test_output_loads_and_killed_run_resumes_exactly(reference, tiny_tokenizer_dir, chunks_dir, tmp_path):
    """output/ of the reference run loads in HF with the model's context as model_max_length and no generation
    length; a run SIGKILLed after step 5 (its last checkpoint: step 3) and rerun gives the reference's losses
    bit for bit, history.jsonl has each step once and train.log marks the resume."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = reference / "output"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "history.jsonl",
                 "pretrain_summary.json", "lineage.json"):
        assert (out / name).is_file(), name
    s = summary(out)
    assert s["steps"] == 6 and s["mode"] == "single process" and s["tokens_seen"] == 6 * 8 * CTX
    assert (s["global_batch_tokens"], s["batch_size"], s["grad_accum"]) == (8 * CTX, 8, 1)
    assert s["final_val_loss"] == val_losses(out)[6] and s["final_train_loss"] == losses(out)[6]
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert hf.config.n_layer == 2 and hf.config.vocab_size == len(load_tokenizer(out))
    assert load_tokenizer(out).model_max_length == CTX == hf.config.n_positions
    gen = GenerationConfig.from_pretrained(str(out))
    assert gen.max_new_tokens is None and gen.do_sample and gen.temperature == 0.8
    ids = torch.tensor([[5, 6, 7, 8]])  # a caller's max_length is obeyed, not overridden by a saved max_new_tokens
    assert hf.generate(ids, max_length=CTX, min_length=CTX, do_sample=False).shape == (1, CTX)
    lineage = read_lineage(out)
    assert lineage["stage"] == "pretrain" and lineage["settings"]["max_steps"] == 6
    assert lineage["parents"]["chunks"]["fingerprint"] == output_fingerprint(chunks_dir)

    args = [*TINY, *SCHEDULE, "--batch-size", 8, *dirs(tmp_path, tiny_tokenizer_dir, chunks_dir)]
    proc = run_script("PreTrain/model.py", *args, "--debug-kill-step", 5, env=FP32, check=False)
    assert proc.returncode == -9 and not (tmp_path / "output").exists()
    assert [d.name for d in (tmp_path / "ckpt").glob("step_*")] == ["step_000003"]
    run_script("PreTrain/model.py", *args, env=FP32)
    assert losses(tmp_path / "output") == losses(out) and val_losses(tmp_path / "output") == val_losses(out)
    steps = [h["step"] for h in history(tmp_path / "output") if "loss" in h]
    assert steps == [1, 2, 3, 4, 5, 6]
    log = (tmp_path / "train.log").read_text()
    assert f"resumed at step 3 from {tmp_path / 'ckpt' / 'step_000003'}" in log
    assert log.count("step      5 | loss") == 2  # the killed run's line, then the resumed run's
    assert step_lines_read_as_a_reader_would(log) == {k: round(v, 4) for k, v in losses(out).items()}


def test_compiled_run_repeats_bit_for_bit(tiny_tokenizer_dir, chunks_dir, tmp_path):
    """The same --compile command twice, 2 threads, the machine's dtype: the same losses and the same weights.
    (Without deterministic algorithms the compiled kernels' threads add up in a racing order: `make all`'s two
    pretraining runs parted by step 10 and their bases answered 93% and 67.5% of the held-out arithmetic.)"""
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        run_script("PreTrain/model.py", *TINY, "--n-embd", 64, "--max-steps", 12, "--compile",
                   *dirs(out, tiny_tokenizer_dir, chunks_dir), env={"OMP_NUM_THREADS": "2"})
        runs.append((losses(out / "output"), (out / "output" / "model.safetensors").read_bytes()))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]


def copy_run(src, dst):
    for name in ("output", "ckpt", "train.log"):
        (shutil.copytree if (src / name).is_dir() else shutil.copy2)(src / name, dst / name)


def test_rerun_is_a_noop_and_other_settings_stop(model_module, reference, tiny_tokenizer_dir, chunks_dir, tmp_path,
                                                 capsys):
    """The same command on a finished run does nothing and says so; another --max-steps (or lr) on its checkpoints
    stops with what the checkpoint was trained for and what to do; nothing is written either way."""
    copy_run(reference, tmp_path)
    before = {p: p.read_bytes() for p in [*tmp_path.rglob("*")] if p.is_file()}
    args = list(map(str, [*TINY, *SCHEDULE, "--batch-size", 8, *dirs(tmp_path, tiny_tokenizer_dir, chunks_dir),
                          "--dtype", "fp32"]))
    model_module.main(args)
    assert "already finished with these settings; nothing to do" in capsys.readouterr().out
    # the same global batch split another way (4 rows x 2 micro batches) is the same run
    model_module.main([*args, "--batch-size", "4"])
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"belongs to a run of 6 steps \(--max-steps 6.*rerun with --max-steps "
                                               r"6 to finish that run, or delete .*ckpt \(or pass another "
                                               r"--checkpoint-dir"):
        model_module.main([*args, "--max-steps", "9"])
    with pytest.raises(UserError, match=r"other settings \(lr: 0.003 there, 0.001 now\)"):
        model_module.main([*args, "--lr", "1e-3"])
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_chunks_rebuilt_alike_resume_their_checkpoints(model_module, reference, tiny_tokenizer_dir, chunks_dir,
                                                       tmp_path):
    """`make all` back on a SCALE rebuilds the same chunks, differing only in the manifest's build time: the run's
    checkpoints are still its own, so the finished run is only exported again (the same weights); chunks of other
    content stop it with what to delete."""
    copy_run(reference, tmp_path)
    rebuilt = tmp_path / "chunks"
    shutil.copytree(chunks_dir, rebuilt)
    manifest = json.loads((rebuilt / "manifest.json").read_text())
    manifest["seconds"] += 1.5
    (rebuilt / "manifest.json").write_text(json.dumps(manifest))
    args = list(map(str, [*TINY, *SCHEDULE, "--batch-size", 8, *dirs(tmp_path, tiny_tokenizer_dir, rebuilt),
                          "--dtype", "fp32"]))
    model_module.main(args)
    assert f"resumed at step 6 from {tmp_path / 'ckpt' / 'step_000006'}" in (tmp_path / "train.log").read_text()
    assert history(tmp_path / "output") == history(reference / "output")
    assert (tmp_path / "output" / "model.safetensors").read_bytes() == (
        reference / "output" / "model.safetensors").read_bytes()
    manifest["splits"]["train"]["documents"] += 1
    (rebuilt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"trained with another chunks .* delete .*ckpt"):
        model_module.main(args)


def test_replacing_an_output_later_stages_use_needs_force(model_module, reference, tiny_tokenizer_dir, chunks_dir,
                                                          tmp_path, monkeypatch):
    out = tmp_path / "output"
    shutil.copytree(reference / "output", out)
    sft = tmp_path / "sft"
    write_lineage(sft, "sft", {}, base=out)  # an adapter trained on this base
    monkeypatch.setattr(paths, "SFT_OUTPUT_DIR", sft)
    args = list(map(str, [*TINY, "--max-steps", 2, *dirs(tmp_path, tiny_tokenizer_dir, chunks_dir), "--dtype", "fp32"]))
    weights = (out / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match=r"sft were built from.*Pass --force"):
        model_module.main(args)
    assert (out / "model.safetensors").read_bytes() == weights and not (tmp_path / "ckpt").exists()
    model_module.main([*args, "--force"])
    assert summary(out)["steps"] == 2
    with pytest.raises(UserError, match="they do not belong together"):  # the adapter is now known stale
        check_lineage(sft, "python SFT/qlora_fine_tune_trl.py", base=out)


def same_global_batch(out_dir, reference_out, batch_size, grad_accum, world_size):
    """The run split the reference's global batch (8 rows of CTX tokens per step, 6 steps) as expected."""
    ours, ref = summary(out_dir), summary(reference_out)
    assert (ours["batch_size"], ours["grad_accum"], ours["world_size"]) == (batch_size, grad_accum, world_size)
    assert batch_size * grad_accum * world_size * CTX == ours["global_batch_tokens"] == ref["global_batch_tokens"]
    assert ours["tokens_seen"] == ref["tokens_seen"] == 6 * 8 * CTX and ours["epochs"] == ref["epochs"]


def test_grad_accum_matches_bigger_batch_plain(reference, tiny_tokenizer_dir, chunks_dir, tmp_path):
    """--batch-size 4 with the reference's global batch: 2 micro batches accumulated, the reference's curve."""
    run_script("PreTrain/model.py", *TINY, *SCHEDULE, "--batch-size", 4,
               *dirs(tmp_path, tiny_tokenizer_dir, chunks_dir), env=FP32)
    same_global_batch(tmp_path / "output", reference / "output", 4, 2, 1)
    assert_same_curve(tmp_path / "output", reference / "output")


def test_ddp_two_ranks_with_grad_accum_matches_bigger_batch(reference, tiny_tokenizer_dir, chunks_dir, tmp_path):
    """torchrun with 2 ranks and the reference's flags but --batch-size 2: 2 micro batches each (the no_sync
    path), the same global batch and the reference's curve."""
    launch("torchrun", 2, [*TINY, *SCHEDULE, "--batch-size", 2, *dirs(tmp_path, tiny_tokenizer_dir, chunks_dir)],
           env=FP32)
    assert "ddp x2" in (tmp_path / "train.log").read_text()
    same_global_batch(tmp_path / "output", reference / "output", 2, 2, 2)
    assert_same_curve(tmp_path / "output", reference / "output")


def test_legacy_launcher(tiny_tokenizer_dir, chunks_dir, tmp_path):
    """torch.distributed.launch still exists in torch 2.13 (deprecated): --use_env works."""
    launch("legacy", 1, [*TINY, "--max-steps", 2, *dirs(tmp_path, tiny_tokenizer_dir, chunks_dir)])
    assert "ddp x1" in (tmp_path / "train.log").read_text()
    assert summary(tmp_path / "output")["steps"] == 2


def test_deepspeed_grad_accum_and_resume(reference, tiny_tokenizer_dir, chunks_dir, tmp_path):
    """ZeRO-2 on the CPU accelerator, 2 ranks x 2 rows x 2 micro batches: the reference's curve. The same run as 2
    "nodes" of 1 process on localhost (the deepspeed launcher's --no_ssh mode, both with LOCAL_RANK 0, one shared
    filesystem), killed after step 4 (checkpoint 3) and rerun, gives the single-node run's losses exactly; only
    global rank 0 wrote the log, the model states and `latest`, each rank its own ZeRO shard. Another --max-steps
    stops with one clear error under the launcher and no traceback. The launches print no DeepSpeed noise."""
    pytest.importorskip("deepspeed")
    args = [*TINY, *SCHEDULE, "--batch-size", 2, "--deepspeed", REPO / "PreTrain/ds_config.json"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = launch("deepspeed", 2, [*args, *dirs(full, tiny_tokenizer_dir, chunks_dir)], env=FP32)
    for noise in ("FutureWarning", "built successfully", "Setting accelerator to CPU", "Traceback"):
        assert noise not in proc.stdout + proc.stderr, noise
    s = summary(full / "output")
    assert s["world_size"] == 2 and s["mode"] == "deepspeed" and "deepspeed x2" in (full / "train.log").read_text()
    same_global_batch(full / "output", reference / "output", 2, 2, 2)
    assert_same_curve(full / "output", reference / "output")

    killed.mkdir()
    procs = launch_two_nodes("deepspeed", [*args, *dirs(killed, tiny_tokenizer_dir, chunks_dir), "--debug-kill-step",
                                           4], killed)
    assert all(rc != 0 for rc, _ in procs) and (killed / "ckpt" / "latest").read_text() == "step_000003"
    assert not (killed / "output").exists() and (killed / "train.log").read_text().count("| loss") == 4
    for rc, out in launch_two_nodes("deepspeed", [*args, *dirs(killed, tiny_tokenizer_dir, chunks_dir)], killed):
        assert rc == 0, out[-3000:]
    step_dir = killed / "ckpt" / "step_000006"
    assert len(list(step_dir.glob("*optim_states.pt"))) == 2 and len(list(step_dir.glob("*model_states.pt"))) == 1
    assert (killed / "ckpt" / "latest").read_text() == "step_000006"
    assert losses(killed / "output") == losses(full / "output")
    assert val_losses(killed / "output") == val_losses(full / "output")
    log = (killed / "train.log").read_text()
    assert "resumed at step 3 from" in log
    assert step_lines_read_as_a_reader_would(log) == {k: round(v, 4) for k, v in losses(full / "output").items()}

    # the export is the trained fp32 weights: the HF model's val loss is the run's own final val loss
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(full / "output"))
    tok = load_tokenizer(tiny_tokenizer_dir)
    rows = chunk_rows(chunks_dir, read_manifest(chunks_dir, tiny_tokenizer_dir), "val", CTX, len(tok))
    val = torch.from_numpy(rows[val_row_indices(len(rows), 6)].astype(np.int64))  # --eval-rows 6
    with torch.no_grad():
        logits = hf(val[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), val[:, 1:].reshape(-1)).item()
    assert loss == pytest.approx(s["final_val_loss"], abs=1e-5)

    proc = launch("deepspeed", 2, [*args, *dirs(full, tiny_tokenizer_dir, chunks_dir), "--max-steps", 8], env=FP32,
                  check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "belongs to a run of 6 steps" in errors[0], proc.stderr[-3000:]


def test_two_nodes_save_and_resume(reference, tiny_tokenizer_dir, chunks_dir, tmp_path):
    """torchrun --nnodes 2: 2 "nodes" of 1 process on localhost sharing one filesystem, both with LOCAL_RANK 0. Only
    global rank 0 writes (every step line is logged once, each checkpoint is written once), the run killed after
    step 4 resumes from step 3 on both nodes, and the whole curve is the reference's (the same global batch: 4 rows
    on each of 2 ranks, no accumulation). DeepSpeed's 2-node mode: test_deepspeed_grad_accum_and_resume."""
    args = [*TINY, *SCHEDULE, *dirs(tmp_path, tiny_tokenizer_dir, chunks_dir)]
    killed = launch_two_nodes("torchrun", [*args, "--debug-kill-step", 4], tmp_path)
    assert all(rc != 0 for rc, _ in killed) and not (tmp_path / "output").exists()
    ckpt = tmp_path / "ckpt"
    step_lines = (tmp_path / "train.log").read_text().count("| loss")
    assert step_lines == 4 and [d.name for d in ckpt.glob("step_*")] == ["step_000003"], killed[0][1][-3000:]
    for rc, out in launch_two_nodes("torchrun", args, tmp_path):
        assert rc == 0, out[-3000:]
    log = (tmp_path / "train.log").read_text()
    assert log.count("resumed at step 3 from ") == 1 and "ddp x2" in log
    assert sorted(step_lines_read_as_a_reader_would(log)) == [1, 2, 3, 4, 5, 6]
    same_global_batch(tmp_path / "output", reference / "output", 4, 1, 2)
    assert_same_curve(tmp_path / "output", reference / "output")
    assert sorted(d.name for d in ckpt.glob("step_*")) == ["step_000003", "step_000006"]


def test_length_in_tokens_capped_at_epochs_and_indivisible_batch_exits_2(tiny_tokenizer_dir, chunks_dir, tmp_path):
    """Without --max-steps the run trains --max-tokens, capped at --max-epochs of the training rows, and says so;
    a global batch the micro batches cannot split is one error line and exit code 2, before anything is written."""
    flags = [*TINY, "--global-batch-tokens", 16 * CTX, "--max-tokens", "1e9", "--max-epochs", 0.5,
             "--eval-interval", 1000, "--checkpoint-interval", 1000, "--log-interval", 1000]
    run_script("PreTrain/model.py", *flags, *dirs(tmp_path, tiny_tokenizer_dir, chunks_dir), env=FP32)
    train_rows = json.loads((chunks_dir / "manifest.json").read_text())["splits"]["train"]["rows"]
    steps = train_rows // 2 // 16  # half an epoch of 16-row steps, whole steps
    s = summary(tmp_path / "output")
    assert s["steps"] == steps and s["grad_accum"] == 4 and s["epochs"] == pytest.approx(steps * 16 / train_rows)
    assert (f"training {steps * 16 * CTX:,} tokens = {steps * 16 / train_rows:.2f} epochs over the "
            f"{train_rows * CTX:,} training tokens of {chunks_dir} ({steps} steps of {16 * CTX} tokens: 4 rows x 4 "
            f"micro batches x 1 rank; --max-tokens 1,000,000,000 capped at --max-epochs 0.5") in (
        tmp_path / "train.log").read_text()

    proc = run_script("PreTrain/model.py", *flags, "--batch-size", 3, *dirs(tmp_path / "x", tiny_tokenizer_dir,
                                                                            chunks_dir), check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1
    assert "--global-batch-tokens 512 does not split into micro batches of --batch-size 3" in errors[0]
    assert not (tmp_path / "x").exists()


def test_nan_loss_stops_and_keeps_checkpoint(tiny_tokenizer_dir, chunks_dir, tmp_path):
    proc = run_script("PreTrain/model.py", *TINY, "--max-steps", 8, "--checkpoint-interval", 2,
                      "--debug-nan-step", 5, *dirs(tmp_path, tiny_tokenizer_dir, chunks_dir), check=False)
    assert proc.returncode == 2 and "loss became nan at step 5" in proc.stderr
    assert not (tmp_path / "output").exists()
    assert (tmp_path / "ckpt" / "step_000004" / "state.json").is_file()
    assert not (tmp_path / "ckpt" / "step_000006").exists()


def test_bad_inputs(model_module, tiny_tokenizer_dir, chunks_dir, tmp_path, capsys):
    """Each bad input is one clear error before anything is written: bad numbers are argparse usage errors (exit 2),
    the rest UserErrors (exit code 2 is checked in the NaN test)."""
    d = dirs(tmp_path, tiny_tokenizer_dir, chunks_dir)
    for flag, value in [("--batch-size", 0), ("--batch-size", -1), ("--global-batch-tokens", 0),
                        ("--global-batch-tokens", 1.5), ("--max-tokens", "-2e9"), ("--max-epochs", 0),
                        ("--context-length", 0),
                        ("--max-steps", 0), ("--lr", 0), ("--lr", "nan"), ("--warmup-steps", -1), ("--beta2", 1),
                        ("--seed", -1), ("--eval-interval", 0), ("--keep-checkpoints", 0), ("--n-head", "two")]:
        with pytest.raises(SystemExit) as e:
            model_module.main(list(map(str, [*TINY, "--max-steps", 2, *d, flag, value])))
        assert e.value.code == 2 and flag in capsys.readouterr().err
    assert not any(tmp_path.iterdir())

    def fails(*args, match):
        with pytest.raises(UserError, match=match):
            model_module.main(list(map(str, [*TINY, "--max-steps", 2, *args])))

    fails(*d[:2], "--chunks-dir", tmp_path / "nothing", *d[4:], match="no chunks")
    # chunks made with another tokenizer
    other_tok = tmp_path / "other_tok"
    stage = load_script("PreTrain/train_byte_level_bpe_tokenizer.py")
    stage.save(stage.train(sample_texts()[:6], vocab_size=400), other_tok)
    fails("--tokenizer-dir", other_tok, *d[2:], match="another tokenizer")
    fails(*d, "--context-length", 64, match="larger than the chunks' context_length 32")
    # an output dir holding something else is left alone, --force or not
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "precious.txt").write_text("keep me")
    fails(*d, match="not a previous pretrained model output")
    fails(*d, "--force", match="not a previous pretrained model output")
    assert (tmp_path / "output" / "precious.txt").read_text() == "keep me"
    # a shard whose rows do not have the manifest's row length is named, with the row
    broken = tmp_path / "broken"
    shutil.copytree(chunks_dir, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["row_length"] = CTX + 2
    (broken / "manifest.json").write_text(json.dumps(manifest))
    fails(*d[:2], "--chunks-dir", broken, "--output-dir", tmp_path / "o2", *d[6:],
          match=r"shard_00000.parquet: its rows are 33 uint16 token ids, not the manifest's 34 uint16")
    assert not (tmp_path / "o2").exists() and not list((tmp_path / "ckpt").glob("step_*"))


def test_log_file_that_is_a_directory_is_one_error(model_module, tiny_tokenizer_dir, chunks_dir, tmp_path):
    """--log-file naming a directory is one UserError before anything is written (it was an IsADirectoryError
    traceback after the model was built)."""
    (tmp_path / "logs").mkdir()
    args = [*TINY, "--max-steps", 2, *dirs(tmp_path, tiny_tokenizer_dir, chunks_dir), "--log-file", tmp_path / "logs"]
    with pytest.raises(UserError, match=rf"--log-file {re.escape(str(tmp_path / 'logs'))} is a directory: pass the "
                                        r"path of a file"):
        model_module.main(list(map(str, args)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs"]


def test_chunks_of_another_tokenizer_say_what_fixes_it(model_module, tiny_tokenizer_dir, tmp_path):
    """Chunks made with another tokenizer than --tokenizer-dir's: the error offers the tokenizer they were made with
    only while its directory still holds it, and always the preprocessing command that re-chunks them with this
    tokenizer into the same --chunks-dir at their context length (with --force: a pretraining output built from the
    old chunks would stop a plain rerun). The usual case is tokenizer/ retrained in place, where the error used to
    say to pass the very --tokenizer-dir that was given, and its command wrote the chunks to the default dir."""
    stage = load_script("PreTrain/train_byte_level_bpe_tokenizer.py")
    tok, other = tmp_path / "tok", tmp_path / "other"
    shutil.copytree(tiny_tokenizer_dir, tok)
    stage.save(stage.train(sample_texts()[:6], vocab_size=400), other)
    chunks = write_chunks(tok, tmp_path / "chunks")
    write_lineage(chunks, "chunks", {}, tokenizer=tok)
    rerun = "re-run `python PreTrain/preprocess_dataset_for_pretrain_map.py --tokenizer-dir {} --output-dir " + str(
        chunks) + f" --context-length {CTX} --force` to chunk the data with this one"

    def error(tokenizer_dir):
        args = [*TINY, "--max-steps", 2, *dirs(tmp_path, tokenizer_dir, chunks)]
        with pytest.raises(UserError, match="was made with another tokenizer") as e:
            model_module.main(list(map(str, args)))
        return str(e.value)

    message = error(other)  # the tokenizer they were made with is still there
    assert f"pass --tokenizer-dir {tok} (the tokenizer they were made with), or {rerun.format(other)}" in message
    shutil.rmtree(tok)  # retrained in place: the tokenizer they were made with is gone
    stage.save(stage.train(sample_texts()[:6], vocab_size=400), tok)
    message = error(tok)
    assert "the tokenizer they were made with" not in message and f": {rerun.format(tok)}" in message
    assert not (tmp_path / "output").exists() and not (tmp_path / "ckpt").exists()


def test_resume_restores_rng_states_from_cpu_whatever_the_device(tmp_path, monkeypatch):
    """Issue 34: torch.set_rng_state (and torch.cuda.set_rng_state) take CPU tensors only, and resuming on CUDA
    crashed because optimizer.pt was loaded onto the run's device (map_location=device). No GPU here, so the run's
    device is "meta", a device a tensor loaded onto cannot be read back from: a loader that maps anything of the
    checkpoint onto the run's device fails as it did on CUDA. The plain/DDP loader and the DeepSpeed RNG file must
    restore weights, optimizer and RNG state exactly; the CUDA state goes to torch.cuda as a CPU tensor."""
    torch.manual_seed(0)
    model = GPT(50, 8, 1, 8, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))).backward()
    optimizer.step()
    checkpoints.save_plain(tmp_path, "step_000001", model, optimizer, torch.device("cpu"), {"step": 1}, keep=2)
    (tmp_path / "ds" / "step_000001").mkdir(parents=True)
    checkpoints.mark_deepspeed_checkpoint(tmp_path / "ds", "step_000001", torch.device("cpu"), {"step": 1}, keep=2)
    after_save = torch.rand(4)

    torch.manual_seed(1)
    resumed = GPT(50, 8, 1, 8, 2)
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    checkpoints.load_plain(tmp_path / "step_000001", resumed, resumed_optimizer, torch.device("meta"))
    assert torch.equal(torch.rand(4), after_save)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), model.state_dict().values()))
    ours, theirs = resumed_optimizer.state_dict()["state"], optimizer.state_dict()["state"]
    assert all(torch.equal(ours[i][k], theirs[i][k]) for i in theirs for k in ("exp_avg", "exp_avg_sq"))
    torch.manual_seed(2)
    checkpoints.restore_deepspeed_rng(tmp_path / "ds" / "step_000001", torch.device("meta"))
    assert torch.equal(torch.rand(4), after_save)

    handed = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": handed.append((state, device)))
    cuda_state = torch.arange(16, dtype=torch.uint8)
    checkpoints.restore_rng({"cpu_rng": torch.get_rng_state(), "cuda_rng": cuda_state}, torch.device("cuda", 0))
    assert len(handed) == 1 and handed[0][0].device.type == "cpu" and torch.equal(handed[0][0], cuda_state)
    assert handed[0][1] == torch.device("cuda", 0)
    checkpoints.restore_rng({"cpu_rng": torch.get_rng_state(), "cuda_rng": cuda_state}, torch.device("cpu"))  # no GPU
    assert len(handed) == 1


def test_smaller_context_uses_windows(tiny_tokenizer_dir, chunks_dir):
    manifest = read_manifest(chunks_dir, tiny_tokenizer_dir)
    full = np.asarray(chunk_rows(chunks_dir, manifest, "train", CTX, 10**6))
    half = np.asarray(chunk_rows(chunks_dir, manifest, "train", CTX // 2, 10**6))
    assert half.shape == (2 * len(full), CTX // 2 + 1)
    np.testing.assert_array_equal(half[: len(full)], full[:, : CTX // 2 + 1])
    np.testing.assert_array_equal(half[len(full):], full[:, CTX // 2:])


def test_validation_reads_the_spread_rows_and_builds_no_graph(model_module):
    """evaluate() scores exactly the val_row_indices rows, in micro batches, with autograd off (a graph over the
    val batches would cost memory and time in every validation)."""
    rows = np.random.default_rng(0).integers(0, 50, size=(23, 9))
    scored, grad_enabled = [], []

    class Recording(GPT):
        def forward(self, idx, targets=None):
            scored.append(idx[:, 0].tolist())
            grad_enabled.append(torch.is_grad_enabled())
            return super().forward(idx, targets)

    model = Recording(vocab_size=50, context_length=8, n_layer=1, n_embd=8, n_head=2)
    dist = Namespace(rank=0, world_size=1, device=torch.device("cpu"))
    val = model_module.evaluate(model, torch.autocast("cpu", enabled=False), rows, 7, 3, dist, 0.5)
    picked = val_row_indices(len(rows), 7)
    assert picked.tolist() == [0, 4, 7, 11, 15, 18, 22]
    assert sum(scored, []) == rows[picked, 0].tolist() and [len(b) for b in scored] == [3, 3, 1]
    assert grad_enabled == [False] * 3 and model.training and math.isfinite(val["val_loss"])
    assert val_row_indices(5, 7).tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------------------------
# inference.py
def test_inference_runs_on_output(tiny_model_dir):
    proc = run_script("PreTrain/inference.py", "--model-dir", tiny_model_dir, "--max-new-tokens", 5, "--seed", 0)
    assert proc.stdout.count("tokens/s") == 3  # the English, Chinese and code default prompts
    assert "床前明月光" in proc.stdout and "def fibonacci" in proc.stdout
    inference = load_script("PreTrain/inference.py")
    with pytest.raises(UserError, match="no model in"):
        inference.main(["--model-dir", str(tiny_model_dir.parent / "missing")])
    for flag, value in [("--max-new-tokens", 0), ("--temperature", -1), ("--top-k", -1), ("--top-p", 0),
                        ("--top-p", 1.5), ("--seed", -1)]:
        with pytest.raises(SystemExit) as e:
            inference.main(["--model-dir", str(tiny_model_dir), flag, str(value)])
        assert e.value.code == 2


def test_generation_past_the_context_slides_the_window(reference, capsys):
    """The reference model has a 32-token context; 70 greedy tokens from a short prompt need slides. Each token is
    the model's argmax given the window the docstring describes (the last 16 tokens after each slide)."""
    from transformers import AutoModelForCausalLM

    inference = load_script("PreTrain/inference.py")
    out = reference / "output"
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = load_tokenizer(out)
    ids = tok("The quick brown fox jumps", return_tensors="pt").input_ids
    with torch.no_grad():
        new, slides = inference.generate(model, ids, 70, tok.eos_token_id, do_sample=False,
                                         pad_token_id=tok.pad_token_id)
        window, expected, cuts = ids[0].tolist(), [], 0
        while len(expected) < 70 and (not expected or expected[-1] != tok.eos_token_id):
            if len(window) == CTX:
                window, cuts = window[-(CTX // 2):], cuts + 1
            expected.append(int(model(torch.tensor([window])).logits[0, -1].argmax()))
            window.append(expected[-1])
    assert new[0].tolist() == expected and slides == cuts
    assert len(expected) < 70 or cuts == math.ceil((70 - (CTX - ids.shape[1])) / (CTX // 2))
    inference.main(["--model-dir", str(out), "--prompt", "The answer is", "--max-new-tokens", "70",
                    "--temperature", "0"])
    assert re.search(r"--- \d+ new tokens in .*tokens/s", capsys.readouterr().out)


# ---------------------------------------------------------------------------------------------------------------
# Any number of GPUs, GPU memory (chunked loss, --batch-size auto), fp16.
def test_any_gpu_count_plans_the_makefile_batch(model_module):
    """make all SCALE=gpu (gpt2-100m, --global-batch-tokens 131072) on 1-8 GPUs: the preset's micro batch of 16 x
    1024 splits 128 rows on 1, 2, 4 and 8 ranks; on 3, 5, 6 and 7 no micro batch does, so the global batch moves to
    the nearest that splits (within 4%, micro batches of 8-16 rows) and one line says so. An explicit --batch-size
    that does not split is still the error it was; --batch-size auto on CPU is the preset's."""
    def schedule(world_size, *flags):
        a = model_module.parse_args(["--preset", "gpt2-100m", "--global-batch-tokens", "131072", *flags])
        return plan_schedule(a.global_batch_tokens, a.batch_size, a.context_length, world_size, 3705, "chunks",
                             max_steps=a.max_steps, max_tokens=a.max_tokens, max_epochs=a.max_epochs,
                             warmup_steps=a.warmup_steps, warmup_from_preset=a.warmup_from_preset, lr=a.lr,
                             min_lr_ratio=a.min_lr_ratio, batch_from_preset=a.batch_from_preset)

    for w in range(1, 9):
        s = schedule(w)
        assert s.batch_size * s.grad_accum * w * 1024 == s.global_batch_tokens and 8 <= s.batch_size <= 16
        assert f"{s.max_steps} steps of {s.global_batch_tokens:,} tokens: {s.batch_size} rows x {s.grad_accum}" in (
            s.description)
        if w in (1, 2, 4, 8):
            assert (s.global_batch_tokens, s.batch_size, s.grad_accum, s.adjusted) == (131072, 16, 8 // w, "")
        else:
            assert abs(s.global_batch_tokens / 131072 - 1) < 0.04 and "\n" not in s.adjusted
            assert s.adjusted.startswith(f"--global-batch-tokens {s.global_batch_tokens:,} (")
            assert "instead of 131,072: 131,072 tokens do not split into micro batches of 8..16 rows" in s.adjusted
    assert (schedule(3).batch_size, schedule(3).grad_accum, schedule(3).global_batch_tokens) == (14, 3, 129024)
    # the micro batch alone moves when that keeps the global batch: 24 rows a rank split by 12
    s = schedule(1, "--global-batch-tokens", str(24 * 1024))
    assert (s.batch_size, s.grad_accum, s.global_batch_tokens) == (12, 2, 24 * 1024)
    assert s.adjusted.startswith("--batch-size 12 (not the preset's 16): ")
    with pytest.raises(UserError, match=r"--global-batch-tokens 131072 does not split into micro batches of "
                                        r"--batch-size 16 x --context-length 1024 tokens on 3 ranks"):
        schedule(3, "--batch-size", "16")
    a = model_module.parse_args(["--preset", "gpt2-100m", "--batch-size", "auto"])
    assert a.batch_auto and a.batch_from_preset and a.batch_size == 16


def test_three_ranks_with_a_batch_that_did_not_split(tiny_tokenizer_dir, chunks_dir, tmp_path):
    """torchrun with 3 CPU ranks at the smoke preset (tiny model): a 32-row global batch (1,024 tokens at context
    32) has no split over 3 ranks, which stopped the run; it now trains the nearest that splits, 30 rows = 2 micro
    batches of 5 rows per rank, and the log says so in one line."""
    flags = ["--preset", "smoke", "--n-layer", 2, "--n-embd", 32, "--n-head", 2, "--context-length", CTX,
             "--global-batch-tokens", 32 * CTX, "--max-steps", 2, "--eval-rows", 6, "--log-interval", 1]
    launch("torchrun", 3, [*flags, *dirs(tmp_path, tiny_tokenizer_dir, chunks_dir)],
           env={"OMP_NUM_THREADS": "1", **FP32})
    s = summary(tmp_path / "output")
    assert (s["world_size"], s["batch_size"], s["grad_accum"], s["global_batch_tokens"]) == (3, 5, 2, 30 * CTX)
    assert s["tokens_seen"] == 2 * 30 * CTX and len(losses(tmp_path / "output")) == 2
    log = (tmp_path / "train.log").read_text()
    assert log.count("--global-batch-tokens 960 (-6.2%) instead of 1,024: ") == 1
    assert "5 rows x 2 micro batches x 3 ranks" in log


def grads_of(model, idx, dtype):
    """The loss of a forward + backward under dtype's autocast, and every parameter's gradient."""
    from llm_train.runtime import autocast

    model.zero_grad(set_to_none=True)
    with autocast("cpu", dtype):
        loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@BOTH_DTYPES
def test_chunked_loss_equals_the_full_logits_loss(dtype, monkeypatch):
    """chunked_cross_entropy in 4 chunks (a padded vocabulary: 600 tokens in 640 rows) gives the plain loss and
    gradients: to float32 rounding in fp32, to bf16 rounding under bf16 autocast (where the chunks' bf16 weight
    gradients are summed in fp32, not in one bf16 matmul). Without gradients (validation) the same loss, and the
    logits (targets None, as inference and the export use them) are the plain ones."""
    from llm_train import gpt

    monkeypatch.setenv(DTYPE_ENV, dtype)
    monkeypatch.setattr(gpt, "LOSS_CHUNK_ELEMENTS", 640 * 16)  # 4 chunks of the 2 x 32 rows
    torch.manual_seed(0)
    model = GPT(600, CTX, 2, 32, 2, 640)
    idx = torch.randint(0, 600, (2, CTX + 1))
    loss, grads = grads_of(model, idx, dtype)
    model.chunked_loss = True
    chunked_loss, chunked_grads = grads_of(model, idx, dtype)
    atol, rtol = (1e-6, 1e-4) if dtype == "fp32" else (2e-3, 2e-2)
    torch.testing.assert_close(chunked_loss, loss, atol=atol, rtol=rtol)
    for name, grad in grads.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(chunked_grads[name], grad, atol=atol * max(scale, 1e-3), rtol=rtol, msg=name)
    assert chunked_grads["transformer.wte.weight"][600:].abs().max() == 0  # the padding rows get no gradient
    with torch.no_grad():
        assert model(idx[:, :-1], idx[:, 1:]).item() == pytest.approx(loss.item(), abs=atol * 10)
        model.chunked_loss = False
        plain_logits = model(idx[:, :-1])
        model.chunked_loss = True
        assert torch.equal(model(idx[:, :-1]), plain_logits)


def test_chunked_loss_never_holds_all_the_logits(monkeypatch):
    """A forward + backward at a 16k vocabulary: the plain loss makes tensors of rows x vocab elements (the fp32
    logits, their gradient), the chunked one none larger than a chunk (every op's output is seen by a dispatch
    mode, backward's too), so its peak memory is lower by ~2 x rows x vocab x 4 bytes."""
    from llm_train import gpt

    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes = [t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.largest = max([self.largest, *sizes])
            return out

    vocab, rows = 16384, 4 * CTX
    monkeypatch.setattr(gpt, "LOSS_CHUNK_ELEMENTS", vocab * rows // 4)
    torch.manual_seed(0)
    model = GPT(vocab, CTX, 1, 32, 2)
    idx = torch.randint(0, vocab, (4, CTX + 1))
    largest = {}
    for chunked in (False, True):
        model.chunked_loss = chunked
        with Largest() as mode:
            model(idx[:, :-1], idx[:, 1:]).backward()
        largest[chunked] = mode.largest
    assert largest == {False: rows * vocab, True: rows * vocab // 4}


def test_fp16_skips_an_overflowed_step_without_stopping(model_module):
    """fp16 (no DeepSpeed): fp16 autocast and a GradScaler; gradients that overflowed skip the update (the weights
    stay, the scale halves) and return, no NaN stop; a finite step updates the weights."""
    from llm_train.distributed import Dist

    torch.manual_seed(0)
    model = GPT(600, CTX, 1, 32, 2, 640)
    dist = Dist(0, 0, 1, False, torch.device("cpu"))
    engine = model_module.build_engine(model, dist, False, "fp16", {"lr": 1e-2, "betas": (0.9, 0.95),
                                                                    "weight_decay": 0.1})
    assert engine.scaler is not None and engine.autocast.fast_dtype == torch.float16
    batches = Batches(np.random.default_rng(0).integers(0, 600, (8, CTX + 1)), 4, 2, 0, 1, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model_module.forward_backward(engine, batches, 0, 2, dist.device)
    model.transformer.h[0].mlp.c_fc.weight.grad[0, 0] = float("inf")
    scale = engine.scaler.get_scale()
    model_module.update(engine, True, 1.0)
    assert engine.scaler.get_scale() == scale / 2
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    loss = model_module.forward_backward(engine, batches, 1, 2, dist.device)
    model_module.update(engine, True, 1.0)
    assert math.isfinite(loss.item()) and engine.scaler.get_scale() == scale / 2
    assert not torch.equal(model.transformer.wte.weight, before["transformer.wte.weight"])


def test_fp16_trains_and_a_killed_run_restores_the_scaler(tiny_tokenizer_dir, chunks_dir, tmp_path):
    """--dtype fp16 on CPU (fp16 autocast, GradScaler): finite, decreasing losses; the scaler's state is in each
    checkpoint, and a run killed after step 5 resumes from step 3 with it, to the uninterrupted run's losses and
    scaler state exactly."""
    args = [*TINY, *SCHEDULE, "--batch-size", 8, "--dtype", "fp16"]
    run_script("PreTrain/model.py", *args, *dirs(tmp_path / "a", tiny_tokenizer_dir, chunks_dir))
    ref = losses(tmp_path / "a" / "output")
    assert summary(tmp_path / "a" / "output")["dtype"] == "fp16"
    assert all(math.isfinite(v) for v in ref.values()) and ref[6] < ref[1] - 0.2

    def scaler(run, step):
        return json.loads((tmp_path / run / "ckpt" / f"step_{step:06d}" / "state.json").read_text())["grad_scaler"]

    assert scaler("a", 6)["scale"] > 0 and "_growth_tracker" in scaler("a", 6)
    d = dirs(tmp_path / "b", tiny_tokenizer_dir, chunks_dir)
    proc = run_script("PreTrain/model.py", *args, *d, "--debug-kill-step", 5, check=False)
    assert proc.returncode == -9 and scaler("b", 3) == scaler("a", 3)
    run_script("PreTrain/model.py", *args, *d)
    assert "resumed at step 3" in (tmp_path / "b" / "train.log").read_text()
    assert losses(tmp_path / "b" / "output") == ref and scaler("b", 6) == scaler("a", 6)


def test_batch_size_auto_halves_until_it_fits(monkeypatch):
    """--batch-size auto's probe (CUDA only; here its CUDA calls are stand-ins): from the rows per rank down by
    halves (the largest divisor of at most half), past an OutOfMemoryError and past a batch that would leave no room
    for AdamW's states, to the largest that fits."""
    from llm_train import throughput
    from llm_train.distributed import Dist

    torch.manual_seed(0)
    model = GPT(600, CTX, 1, 32, 2, 640)
    params = sum(p.numel() for p in model.parameters())
    tried, peak = [], {}

    def forward(idx, targets):
        rows = idx.shape[0]
        tried.append(rows)
        if rows > 12:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        peak["bytes"] = rows * 10**6 - 12 * params  # 0.9 x 10^7 total: 9 rows of memory besides AdamW's states
        return model.transformer.wte.weight.sum() * 0 + rows

    monkeypatch.setattr(model, "forward", forward)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Namespace(total_memory=10**7))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: peak["bytes"])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    dist = Dist(0, 0, 1, False, torch.device("cpu"))
    assert throughput.largest_fitting_batch(model, contextlib.nullcontext(), 48, CTX, dist) == 6
    assert tried == [48, 24, 12, 6]
    tried.clear()
    assert throughput.largest_fitting_batch(model, contextlib.nullcontext(), 64, CTX, dist) == 8
    assert tried == [64, 32, 16, 8]
