"""Stage 3: pretrain GPT-2 from scratch on the tokenized chunks, plain PyTorch, DDP or DeepSpeed ZeRO-2.

Reads:  pretrain_data_chunks/ (manifest.json + parquet shards of fixed-length token rows, from
        PreTrain/preprocess_dataset_for_pretrain_map.py) and tokenizer/ (its fingerprint must match the manifest's).
Writes: output/ a Hugging Face GPT-2 checkpoint (config.json, model.safetensors, generation_config.json, tokenizer
        files, history.jsonl, pretrain_summary.json) that AutoModelForCausalLM.from_pretrained("./output") loads;
        checkpoints/pretrain/step_NNNNNN/ (every --checkpoint-interval steps and at the end, last --keep-checkpoints
        kept), train.log, TensorBoard events in runs/pretrain/.

    python PreTrain/model.py                                   # CPU default: `cpu` preset, ~5 minutes on 2 cores
    python PreTrain/model.py --preset smoke                    # seconds
    cd PreTrain && torchrun --nproc_per_node=8 model.py        # DDP; gpt2-100m is the default preset on CUDA
    cd PreTrain && deepspeed --num_gpus=8 model.py --deepspeed ds_config.json   # ZeRO-2 (see ds_config.json)
    DS_ACCELERATOR=cpu deepspeed --num_gpus=2 --bind_cores_to_rank PreTrain/model.py --deepspeed PreTrain/ds_config.json
    python -m torch.distributed.launch --nproc_per_node=1 --use_env PreTrain/model.py    # the legacy launcher

Rerunning the same command resumes from the newest checkpoint in --checkpoint-dir (model, optimizer, step, data
position, RNG); delete that directory to start over. A NaN/inf loss stops the run before the bad update is applied.
The batch for an optimizer step is a pure function of (seed, step, rank): rows come from one seeded permutation of
the training rows per epoch and rank r takes its own disjoint slice, so a resumed run sees exactly the same data.
If --context-length is smaller than the chunks' rows, each row is cut into windows of context+1 tokens (sharing one
boundary token), so no token is thrown away; a larger one is an error (re-chunk the data instead).

Precision: --dtype auto = bf16 autocast on CUDA and on CPUs with bf16 matmul units (AMX / AVX512-BF16), else fp32.
On an AVX2-only CPU (e.g. the AMD EPYC development machine) a bf16 matmul is ~12x SLOWER than fp32 (measured), so
bf16 there is a loss, not a gain.

MFU = 6*N + 12*layers*dim*context FLOPs per token (PaLM appendix B) times tokens/s over the peak: bf16 dense peak by
GPU name (H100 989 TFLOP/s, ...); on CPU --peak-flops, by default a nominal peak from the CPU flags and thread count
(cpu_peak_flops: 2 AVX2 cores fp32 = 0.19e12, as on the AMD EPYC development machine; 2 AMX cores bf16 = 0.67e12).

DeepSpeed checkpoints: engine.save_checkpoint writes checkpoints/pretrain/step_NNNNNN/ from all ranks; only after
every rank has finished (barrier) rank 0 atomically replaces the `latest` file, which is what a resumed run loads.
A run killed mid-save leaves `latest` pointing at the previous complete checkpoint.
"""
import argparse
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from common import UserError  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# Model size, batch and schedule of each preset; every value can be overridden by its flag.
PRESETS = {
    # The real model of this project: GPT-2 small sizes with this project's tokenizer vocabulary.
    "gpt2-100m": dict(n_layer=12, n_embd=768, n_head=12, context_length=1024, vocab_size=None,
                      batch_size=16, grad_accum=4, max_steps=5000, lr=6e-4, warmup_steps=200),
    # GPT-2 small exactly (vocab 50257 padded to 50304), for throughput comparable to published numbers.
    "gpt2-124m": dict(n_layer=12, n_embd=768, n_head=12, context_length=1024, vocab_size=50304,
                      batch_size=16, grad_accum=4, max_steps=5000, lr=6e-4, warmup_steps=200),
    # What the CPU default run trains in ~5 minutes on 2 idle AVX2 cores (fp32, ~3k tokens/s): 820k tokens.
    "cpu": dict(n_layer=4, n_embd=192, n_head=4, context_length=128, vocab_size=None,
                batch_size=16, grad_accum=1, max_steps=400, lr=2e-3, warmup_steps=20),
    # Seconds: proves the pipeline end to end.
    "smoke": dict(n_layer=2, n_embd=64, n_head=2, context_length=64, vocab_size=None,
                  batch_size=8, grad_accum=1, max_steps=30, lr=3e-3, warmup_steps=5),
}

# Dense bf16 peak FLOP/s by GPU name (no sparsity), for MFU.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
                  "4090": 165e12, "3090": 71e12, "V100": 125e12}


# ---------------------------------------------------------------------------------------------------------------
# The model: GPT-2 exactly (pre-LN, learned positions, GELU-tanh, tied embeddings, biases). Parameter names follow
# Hugging Face's GPT2LMHeadModel so the export is a rename plus a transpose (HF's Conv1D stores weight as (in, out)).
class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash attention on CUDA
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, context_length, n_layer, n_embd, n_head, activation_checkpointing=False):
        super().__init__()
        if n_embd % n_head:
            raise UserError(f"--n-embd {n_embd} must be divisible by --n-head {n_head}")
        self.config = dict(vocab_size=vocab_size, context_length=context_length, n_layer=n_layer, n_embd=n_embd,
                           n_head=n_head)
        self.activation_checkpointing = activation_checkpointing
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(context_length, n_embd),
            h=nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer)),
            ln_f=nn.LayerNorm(n_embd),
        ))
        # GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers), zero biases.
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, targets=None):
        """Logits (B, T, vocab) in float32, or the mean cross-entropy against targets."""
        t = idx.shape[1]
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(t, device=idx.device))
        for block in self.transformer.h:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.transformer.ln_f(x)
        logits = F.linear(x, self.transformer.wte.weight)  # tied LM head
        if targets is None:
            return logits.float()
        # (A chunked fused linear+cross-entropy that never holds all fp32 logits measured ~15% slower here in fp32.)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def flops_per_token(model_config, n_params):
    c = model_config
    n = n_params - c["context_length"] * c["n_embd"]  # position embeddings are a lookup, not a matmul
    return 6 * n + 12 * c["n_layer"] * c["n_embd"] * c["context_length"]


def hf_state_dict(model):
    """Our state dict under Hugging Face GPT2LMHeadModel names (Conv1D weights transposed), float32."""
    out = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().float().cpu()
        if re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", name):
            tensor = tensor.t()
        out[name] = tensor.contiguous()
    return out


def save_hf(model_state, model_config, tokenizer, tokenizer_dir, out_dir):
    """Write a GPT2LMHeadModel checkpoint + the tokenizer files into out_dir (a fresh temporary directory)."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    c = model_config
    config = GPT2Config(vocab_size=c["vocab_size"], n_positions=c["context_length"], n_embd=c["n_embd"],
                        n_layer=c["n_layer"], n_head=c["n_head"], activation_function="gelu_new",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    with torch.device("meta"):
        hf = GPT2LMHeadModel(config)
    hf.load_state_dict(model_state, strict=False, assign=True)
    hf.tie_weights()
    missing = [n for n, p in hf.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"export left parameters unset: {missing[:5]}")
    hf.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=0.8,
                                            top_k=50, max_new_tokens=100)
    hf.save_pretrained(str(out_dir), safe_serialization=True)
    for f in Path(tokenizer_dir).iterdir():  # the tokenizer as stage 1 wrote it (chat template included)
        if f.is_file() and f.name not in ("README.md", "report.json"):
            shutil.copy2(f, Path(out_dir) / f.name)


# ---------------------------------------------------------------------------------------------------------------
# Data: the manifest contract of PreTrain/preprocess_dataset_for_pretrain_map.py.
def read_manifest(chunks_dir, tokenizer_dir):
    path = Path(chunks_dir) / "manifest.json"
    if not path.is_file():
        raise UserError(f"no chunks: {path} not found. Run `python PreTrain/preprocess_dataset_for_pretrain_map.py` "
                        "first (or pass --chunks-dir)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        _ = manifest["splits"]["train"]["shards"], manifest["context_length"], manifest["row_length"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is not a chunks manifest: re-run the preprocessing stage") from None
    if manifest.get("format") != 1:
        raise UserError(f"{path}: unknown manifest format {manifest.get('format')!r}; this script reads format 1")
    fingerprint = common.tokenizer_fingerprint(tokenizer_dir)
    if manifest.get("tokenizer_fingerprint") != fingerprint:
        raise UserError(f"{path} was made with another tokenizer than {tokenizer_dir} (fingerprint mismatch): "
                        "re-run `python PreTrain/preprocess_dataset_for_pretrain_map.py` with this tokenizer")
    return manifest


def load_rows(chunks_dir, manifest, split, context_length, vocab_size):
    """All rows of a split as one int32 array (rows, context_length + 1), rows cut into windows if needed."""
    import pyarrow.parquet as pq

    row_length = manifest["row_length"]
    parts = []
    for rel in manifest["splits"][split]["shards"]:
        path = Path(chunks_dir) / rel
        if not path.is_file():
            raise UserError(f"{path} (listed in {Path(chunks_dir) / 'manifest.json'}) is missing: re-run preprocessing")
        try:
            column = pq.read_table(path, columns=["input_ids"]).column("input_ids").combine_chunks()
        except Exception as e:  # a truncated or foreign file: name it
            raise UserError(f"{path} is not a readable chunk shard ({type(e).__name__}: {e}): re-run preprocessing")
        lengths = np.diff(column.offsets.to_numpy())
        bad = np.flatnonzero(lengths != row_length)
        if len(bad):
            raise UserError(f"{path}, row {bad[0]}: {lengths[bad[0]]} tokens, expected row_length {row_length}: "
                            "re-run preprocessing")
        ids = column.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False).reshape(-1, row_length)
        if ids.size and (ids.max() >= vocab_size or ids.min() < 0):
            row = int(np.flatnonzero((ids >= vocab_size).any(1) | (ids < 0).any(1))[0])
            raise UserError(f"{path}, row {row}: token id outside the vocabulary (size {vocab_size}): "
                            "the chunks do not belong to this tokenizer/model")
        parts.append(ids)
    rows = np.concatenate(parts) if parts else np.zeros((0, row_length), np.int32)
    if context_length + 1 < row_length:
        windows = (row_length - 1) // context_length
        rows = np.concatenate([rows[:, i * context_length: (i + 1) * context_length + 1] for i in range(windows)])
    return np.ascontiguousarray(rows)


class Batches:
    """Rows for (step, micro step, rank): a seeded permutation of all rows per epoch, ranks take disjoint slices."""

    def __init__(self, rows, batch_size, grad_accum, rank, world_size, seed):
        self.rows, self.batch_size, self.grad_accum = rows, batch_size, grad_accum
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.rows_per_step = batch_size * grad_accum * world_size
        self._perm_epoch, self._perm = None, None

    def _perm_for(self, epoch):
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            self._perm_epoch = epoch
        return self._perm

    def get(self, step, micro):
        start = step * self.rows_per_step + (micro * self.world_size + self.rank) * self.batch_size
        positions = np.arange(start, start + self.batch_size)
        n = len(self.rows)
        index = np.array([self._perm_for(p // n)[p % n] for p in positions]) if (positions // n).min() != (
            positions // n).max() else self._perm_for(positions[0] // n)[positions % n]
        batch = torch.from_numpy(self.rows[index].astype(np.int64))
        return batch[:, :-1], batch[:, 1:]


# ---------------------------------------------------------------------------------------------------------------
# Training helpers.
def lr_at(step, args):
    """Linear warmup to --lr, then cosine decay to --lr * --min-lr-ratio at --max-steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    min_lr = args.lr * args.min_lr_ratio
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - min_lr)


def param_groups(model, weight_decay):
    """Weight decay on matrices (linear weights, embeddings) only, not on biases and LayerNorm."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(model, args, device):
    # fused AdamW: one kernel over all parameters (CPU and CUDA), measurably faster than the foreach default
    return torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(args.beta1, args.beta2),
                             eps=1e-8, fused=True)


def train_step(model, optimizer, batches, step, args, device, autocast):
    """One optimizer step of the plain/DDP path: grad accumulation, clipping. Returns (mean loss, grad norm)."""
    losses = []
    for micro in range(args.grad_accum):
        x, y = batches.get(step, micro)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        last = micro == args.grad_accum - 1
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync, autocast:
            loss = model(x, y)
            if args.debug_nan_step == step:
                loss = loss * float("nan")
        (loss / args.grad_accum).backward()
        losses.append(loss.detach())
    loss = torch.stack(losses).mean()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    return loss, grad_norm


def gpu_peak_flops(device):
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_PEAK_FLOPS.items():
        if key in name:
            return flops, name
    return None, name


def cpu_has_fast_bf16():
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_peak_flops(dtype):
    """Nominal peak of the cores torch uses: per core 0.335e12 bf16 with AMX (measured, 2-core Sapphire Rapids
    VM), else fp32 FMA: 64 FLOP/cycle with AVX-512, 32 with AVX2 (e.g. AMD EPYC Zen 3), at ~3 GHz."""
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    if dtype == "bf16" and "amx_bf16" in flags:
        per_core = 0.335e12
    else:
        per_core = (64 if "avx512f" in flags else 32) * 3e9
    return torch.get_num_threads() * per_core


def peak_mem_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: step_NNNNNN/ directories. Plain: model.safetensors + optimizer.pt + state.json written into a temp
# dir and renamed. DeepSpeed: engine.save_checkpoint + an atomically replaced `latest` file (see the docstring).
def checkpoint_steps(ckpt_dir):
    steps = []
    for d in Path(ckpt_dir).glob("step_*"):
        if d.is_dir() and re.fullmatch(r"step_\d+", d.name):
            steps.append(int(d.name[5:]))
    return sorted(steps)


def latest_checkpoint(ckpt_dir, deepspeed_mode):
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    latest = ckpt_dir / "latest"
    plain = [s for s in checkpoint_steps(ckpt_dir) if (ckpt_dir / f"step_{s:06d}" / "state.json").is_file()]
    if deepspeed_mode:
        if plain and not latest.is_file():
            raise UserError(f"{ckpt_dir} holds checkpoints of a run without --deepspeed: run without it to resume, "
                            "or choose another --checkpoint-dir")
        return latest.read_text().strip() if latest.is_file() else None
    if latest.is_file() and not plain:
        raise UserError(f"{ckpt_dir} holds DeepSpeed checkpoints: add --deepspeed PreTrain/ds_config.json to resume, "
                        "or choose another --checkpoint-dir")
    return f"step_{plain[-1]:06d}" if plain else None


def prune_checkpoints(ckpt_dir, keep):
    for s in checkpoint_steps(ckpt_dir)[:-keep]:
        shutil.rmtree(Path(ckpt_dir) / f"step_{s:06d}", ignore_errors=True)


def check_resume_compatible(state, model_config, fingerprint, ckpt_path):
    if state["model_config"] != model_config or state.get("tokenizer_fingerprint") != fingerprint:
        raise UserError(f"{ckpt_path} is a checkpoint of a different model or tokenizer ({state['model_config']}): "
                        "rerun with the same flags, or delete/choose another --checkpoint-dir to start over")


def check_output_dir(out_dir):
    """Refuse to replace a directory that holds anything but a previous output of this script (or README.md)."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"output path {out_dir} exists and is not a directory: choose another --output-dir")
    names = {p.name for p in out_dir.iterdir() if not p.name.startswith(".")} - {"README.md"}
    if names and "pretrain_summary.json" not in names:
        raise UserError(f"{out_dir} holds files that are not a previous pretraining output ({sorted(names)[:5]}): "
                        "move them away or choose another --output-dir; nothing was written")


# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model size and schedule (default: gpt2-100m with CUDA, cpu without)")
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-embd", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--context-length", type=int)
    p.add_argument("--vocab-size", type=int, help="model vocabulary (default: the tokenizer's)")
    p.add_argument("--batch-size", type=int, help="micro batch per rank, in rows")
    p.add_argument("--grad-accum", type=int, help="micro batches per optimizer step")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of --lr (cosine decay)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16 autocast or fp32; auto: bf16 on CUDA and on CPUs with AMX/AVX512-BF16, else fp32")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward: less memory")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on with CUDA, off on CPU)")
    p.add_argument("--eval-interval", type=int, default=100, help="validate every N steps (and at the end)")
    p.add_argument("--eval-batches", type=int, default=20, help="micro batches of the val split per validation")
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--checkpoint-interval", type=int, default=100)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--peak-flops", type=float, default=None,
                   help="peak FLOP/s for MFU on CPU (default: measured matmul rate at startup)")
    p.add_argument("--chunks-dir", type=Path, default=common.CHUNKS_DIR)
    p.add_argument("--tokenizer-dir", type=Path, default=common.TOKENIZER_DIR)
    p.add_argument("--output-dir", type=Path, default=common.OUTPUT_DIR)
    p.add_argument("--checkpoint-dir", type=Path, default=common.REPO / "checkpoints" / "pretrain")
    p.add_argument("--log-file", type=Path, default=common.REPO / "train.log")
    p.add_argument("--tensorboard-dir", type=Path, default=common.REPO / "runs" / "pretrain")
    p.add_argument("--deepspeed", type=Path, default=None, metavar="DS_CONFIG", help="train with DeepSpeed (ZeRO-2)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by launchers
    p.add_argument("--debug-nan-step", type=int, default=-1, help="testing: make the loss NaN at this step")
    p.add_argument("--debug-kill-step", type=int, default=-1,
                   help="testing: SIGKILL this process right after the checkpoint of this step")
    args = p.parse_args(argv)
    args.preset = args.preset or ("gpt2-100m" if torch.cuda.is_available() else "cpu")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()

    # --- distributed setup: torchrun / torch.distributed.launch set RANK etc.; the deepspeed launcher too
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", max(args.local_rank, 0)))
    distributed = "RANK" in os.environ or args.deepspeed is not None
    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    elif world_size > 1 and "OMP_NUM_THREADS" not in os.environ:  # share the cores between local ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    master = rank == 0
    if args.dtype == "auto":
        args.dtype = "bf16" if use_cuda or cpu_has_fast_bf16() else "fp32"

    # --- inputs, checked before anything is started or written
    if args.deepspeed is not None and not args.deepspeed.is_file():
        raise UserError(f"DeepSpeed config {args.deepspeed} not found (it ships as PreTrain/ds_config.json)")
    manifest = read_manifest(args.chunks_dir, args.tokenizer_dir)
    tokenizer = common.load_tokenizer(args.tokenizer_dir)
    vocab_size = args.vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise UserError(f"--vocab-size {vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
    if args.context_length > manifest["context_length"]:
        raise UserError(f"--context-length {args.context_length} is larger than the chunks' context_length "
                        f"{manifest['context_length']} in {args.chunks_dir}: re-run preprocessing with "
                        f"--context-length {args.context_length} or pass a smaller --context-length")
    check_output_dir(args.output_dir)
    if master:
        common.check_writable_dir(args.output_dir.parent)
        common.check_writable_dir(args.checkpoint_dir)
    train_rows = load_rows(args.chunks_dir, manifest, "train", args.context_length, vocab_size)
    val_rows = load_rows(args.chunks_dir, manifest, "val", args.context_length, vocab_size)
    if len(val_rows) == 0:
        raise UserError(f"{args.chunks_dir}: the val split has no rows: re-run preprocessing with a val split")
    if len(train_rows) < args.batch_size * world_size:
        raise UserError(f"{args.chunks_dir}: only {len(train_rows)} training rows, fewer than one batch "
                        f"({args.batch_size} x {world_size} ranks): use more data or a smaller --batch-size")

    torch.manual_seed(args.seed)
    model = GPT(vocab_size, args.context_length, args.n_layer, args.n_embd, args.n_head,
                activation_checkpointing=args.activation_checkpointing).to(device)
    model_config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    fpt = flops_per_token(model_config, n_params)
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        peak, device_name = gpu_peak_flops(device)
    else:
        peak = args.peak_flops or cpu_peak_flops(args.dtype)
        device_name = f"cpu ({torch.get_num_threads()} threads, {args.dtype} peak {peak / 1e9:.0f} GFLOP/s)"
    fingerprint = manifest["tokenizer_fingerprint"]
    compile_model = args.compile if args.compile is not None else use_cuda

    # --- engine: DeepSpeed ZeRO-2, DDP, or a single process
    engine = None
    if args.deepspeed is not None:
        import deepspeed

        ds_config = json.loads(args.deepspeed.read_text())
        ds_config.pop("_comment", None)
        auto = {"train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": args.grad_accum,
                "train_batch_size": args.batch_size * args.grad_accum * world_size, "gradient_clipping": args.grad_clip}
        for key, value in auto.items():
            if ds_config.get(key, "auto") == "auto":
                ds_config[key] = value
        opt_params = ds_config.get("optimizer", {}).get("params", {})
        for key, value in {"lr": args.lr, "betas": [args.beta1, args.beta2], "weight_decay": args.weight_decay}.items():
            if opt_params.get(key) == "auto":
                opt_params[key] = value
        ds_config.setdefault("bf16", {})["enabled"] = args.dtype == "bf16"
        if compile_model:
            model = torch.compile(model)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, args.weight_decay),
                                                       config=ds_config)
        rank, world_size = engine.global_rank, engine.world_size
        master = rank == 0
        autocast = nullcontext()  # DeepSpeed's bf16 mode keeps bf16 weights itself
        train_model = engine
    else:
        if distributed:
            torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
        optimizer = make_optimizer(model, args, device)
        train_model = torch.compile(model) if compile_model else model
        if distributed:
            train_model = torch.nn.parallel.DistributedDataParallel(train_model, device_ids=[local_rank] if use_cuda else None)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def all_reduce_mean(t):
        if world_size > 1:
            torch.distributed.all_reduce(t)
            t = t / world_size
        return t

    # --- resume from the newest checkpoint, if any
    step, history = 0, []
    tag = latest_checkpoint(args.checkpoint_dir, engine is not None)
    if tag is not None:
        ckpt_path = args.checkpoint_dir / tag
        if engine is not None:
            _, client_state = engine.load_checkpoint(str(args.checkpoint_dir), tag=tag)
            if client_state is None:
                raise UserError(f"could not load DeepSpeed checkpoint {ckpt_path}: delete it to start over")
            state = client_state["trainer_state"]
            check_resume_compatible(state, model_config, fingerprint, ckpt_path)
        else:
            from safetensors.torch import load_file

            state = json.loads((ckpt_path / "state.json").read_text())
            check_resume_compatible(state, model_config, fingerprint, ckpt_path)
            model.load_state_dict(load_file(str(ckpt_path / "model.safetensors")))
            extra = torch.load(ckpt_path / "optimizer.pt", map_location=device, weights_only=True)
            optimizer.load_state_dict(extra["optimizer"])
            torch.set_rng_state(extra["cpu_rng"])
            if use_cuda and "cuda_rng" in extra:
                torch.cuda.set_rng_state(extra["cuda_rng"])
        step, history = state["step"], state["history"]
        if state["rows_per_step"] != args.batch_size * args.grad_accum * world_size:
            raise UserError(f"{ckpt_path} was trained with {state['rows_per_step']} rows per step; rerun with the "
                            "same --batch-size x --grad-accum x ranks, or start over with another --checkpoint-dir")

    def save_checkpoint():
        state = {"step": step, "rows_per_step": batches.rows_per_step, "data_rows_consumed": step * batches.rows_per_step,
                 "model_config": model_config, "tokenizer_fingerprint": fingerprint, "history": history,
                 "args": {k: str(v) for k, v in vars(args).items()}}
        tag = f"step_{step:06d}"
        if engine is not None:
            engine.save_checkpoint(str(args.checkpoint_dir), tag=tag, client_state={"trainer_state": state},
                                   save_latest=False)
            if master:  # every rank has written its part (save_checkpoint ends in a barrier): now point at it
                common.atomic_write_bytes(args.checkpoint_dir / "latest", tag.encode())
                prune_checkpoints(args.checkpoint_dir, args.keep_checkpoints)
            torch.distributed.barrier()
            return
        if master:
            from safetensors.torch import save_file

            final = args.checkpoint_dir / tag
            with common.atomic_dir(final) as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                          str(tmp / "model.safetensors"))
                extra = {"optimizer": optimizer.state_dict(), "cpu_rng": torch.get_rng_state()}
                if use_cuda:
                    extra["cuda_rng"] = torch.cuda.get_rng_state(device)
                torch.save(extra, tmp / "optimizer.pt")
                (tmp / "state.json").write_text(json.dumps(state))
            prune_checkpoints(args.checkpoint_dir, args.keep_checkpoints)
        if world_size > 1:
            torch.distributed.barrier()

    batches = Batches(train_rows, args.batch_size, args.grad_accum, rank, world_size, args.seed)
    tokens_per_step = batches.rows_per_step * args.context_length
    val_tokens_per_byte = manifest["splits"]["val"]["tokens"] / max(1, manifest["splits"]["val"]["bytes"])

    @torch.no_grad()
    def evaluate():
        train_model.eval()
        n = min(len(val_rows), args.eval_batches * args.batch_size)
        mine = val_rows[:n][rank::world_size]
        total, count = torch.zeros((), device=device), torch.zeros((), device=device)
        for i in range(0, len(mine), args.batch_size):
            batch = torch.from_numpy(mine[i:i + args.batch_size].astype(np.int64)).to(device)
            with autocast:
                loss = train_model(batch[:, :-1], batch[:, 1:])
            total += loss.float() * len(batch)
            count += len(batch)
        if world_size > 1:
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(count)
        train_model.train()
        val_loss = (total / count.clamp(min=1)).item()
        return {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                "val_bpb": val_loss * val_tokens_per_byte / math.log(2)}

    # --- logging
    writer, log_file = None, None
    if master:
        from torch.utils.tensorboard import SummaryWriter

        args.log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(args.log_file, "a", encoding="utf-8")
        writer = SummaryWriter(str(args.tensorboard_dir))

    def log(msg):
        if master:
            from tqdm import tqdm

            tqdm.write(msg)
            log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
            log_file.flush()

    mode = "deepspeed" if engine is not None else ("ddp" if distributed else "single process")
    log(f"pretrain: preset {args.preset}, {n_params / 1e6:.2f}M params ({model_config}), {mode} x{world_size} on "
        f"{device_name}, {args.dtype}, {len(train_rows)} train rows / {len(val_rows)} val rows of "
        f"{args.context_length + 1} tokens, {tokens_per_step} tokens/step, {args.max_steps} steps"
        + (f", resuming at step {step} from {args.checkpoint_dir / tag}" if step else ""))

    from tqdm import tqdm

    bar = tqdm(total=args.max_steps, initial=step, desc="pretrain", disable=not master, dynamic_ncols=True)
    step_times = []
    while step < args.max_steps:
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        if engine is not None:
            losses = []
            for micro in range(args.grad_accum):
                x, y = batches.get(step, micro)
                loss = engine(x.to(device), y.to(device))
                if args.debug_nan_step == step:
                    loss = loss * float("nan")
                engine.backward(loss)
                losses.append(loss.detach().float())
                if micro < args.grad_accum - 1:
                    engine.step()
            loss = all_reduce_mean(torch.stack(losses).mean())
            if math.isfinite(loss.item()):
                engine.step()
            grad_norm = engine.get_global_grad_norm()
        else:
            loss, grad_norm = train_step(train_model, optimizer, batches, step, args, device, autocast)
            loss = all_reduce_mean(loss.float())
            if math.isfinite(loss.item()):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            last = latest_checkpoint(args.checkpoint_dir, engine is not None)
            log(f"step {step}: loss is {loss_value}; stopping before the update. Last good checkpoint: "
                f"{args.checkpoint_dir / last if last else 'none'}. Lower --lr or check the data, then rerun.")
            bar.close()
            raise UserError(f"loss became {loss_value} at step {step}: training stopped, no output written "
                            f"(last good checkpoint: {last or 'none'})")
        dt = time.perf_counter() - t0
        step += 1
        step_times.append(dt)
        bar.update(1)
        tokens_per_s = tokens_per_step / dt
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if step % args.log_interval == 0 or step == args.max_steps or step == 1:
            entry = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                     "tokens_per_s": tokens_per_s, "mfu": fpt * tokens_per_s / (peak * world_size) if peak else None,
                     "peak_mem_mb": peak_mem_mb(device)}
            history.append(entry)
            mfu = f"{100 * entry['mfu']:.1f}%" if peak else "n/a"
            log(f"step {step:6d} | loss {loss_value:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                f"{tokens_per_s:,.0f} tok/s | MFU {mfu} | peak mem {entry['peak_mem_mb']:,.0f} MB")
            if writer:
                for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
                    if entry[k] is not None:
                        writer.add_scalar(f"train/{k}", entry[k], step)
            bar.set_postfix(loss=f"{loss_value:.3f}")
        if step % args.eval_interval == 0 or step == args.max_steps:
            val = evaluate()
            history.append(val)
            log(f"step {step:6d} | val loss {val['val_loss']:.4f} | val ppl {val['val_ppl']:.2f} | "
                f"val bits/byte {val['val_bpb']:.4f}")
            if writer:
                for k in ("val_loss", "val_ppl", "val_bpb"):
                    writer.add_scalar(f"val/{k[4:]}", val[k], step)
        if step % args.checkpoint_interval == 0 or step == args.max_steps:
            save_checkpoint()
            if step == args.debug_kill_step:
                os.kill(os.getpid(), signal.SIGKILL)
    bar.close()

    # --- export output/ (rank 0), atomically
    if engine is not None:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        if master:  # the fp32 master weights, gathered from the final ZeRO checkpoint
            state_dict = get_fp32_state_dict_from_zero_checkpoint(str(args.checkpoint_dir), tag=f"step_{step:06d}")
            model_for_export = GPT(**model_config)
            model_for_export.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state_dict.items()})
    else:
        model_for_export = model
    if master:
        if not history or "val_loss" not in history[-1]:  # resumed after the end: still report validation
            history.append(evaluate())
        train_entries = [h for h in history if "loss" in h]
        val = [h for h in history if "val_loss" in h][-1]
        summary = {"preset": args.preset, "model_config": model_config, "params": n_params, "steps": step,
                   "tokens_seen": step * tokens_per_step, "world_size": world_size, "mode": mode,
                   "final_train_loss": train_entries[-1]["loss"] if train_entries else None,
                   "first_train_loss": train_entries[0]["loss"] if train_entries else None,
                   "final_val_loss": val["val_loss"], "val_ppl": val["val_ppl"], "val_bpb": val["val_bpb"],
                   "median_tokens_per_s": tokens_per_step / float(np.median(step_times)) if step_times else None,
                   "wall_seconds": time.time() - t_start, "device": device_name, "dtype": args.dtype}
        summary["mfu"] = fpt * summary["median_tokens_per_s"] / (peak * world_size) if peak and step_times else None
        with common.atomic_dir(args.output_dir) as tmp:
            save_hf(hf_state_dict(model_for_export), model_config, tokenizer, args.tokenizer_dir, tmp)
            (tmp / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
            common.atomic_write_json(tmp / "pretrain_summary.json", summary)
        log(f"done: {step} steps, final train loss {summary['final_train_loss']}, val loss {val['val_loss']:.4f}, "
            f"val bits/byte {val['val_bpb']:.4f}, wrote {args.output_dir} in {summary['wall_seconds']:.0f}s")
        writer.close()
        log_file.close()
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    common.run_main(main)
