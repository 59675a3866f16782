"""Stage 3: pretrain GPT-2 from scratch on the tokenized chunks, plain PyTorch, DDP or DeepSpeed ZeRO-2.

Reads:  pretrain_data_chunks/ (manifest.json + flat token files of fixed-length rows, from
        PreTrain/preprocess_dataset_for_pretrain_map.py) and tokenizer/ (its fingerprint must match the manifest's).
        Rows are read from disk as batches need them (ChunkRows): a rank's memory does not grow with the chunk set.
Writes: output/ a Hugging Face GPT-2 checkpoint (config.json, model.safetensors, generation_config.json, tokenizer
        files with model_max_length = the context, history.jsonl, pretrain_summary.json, lineage.json) that
        AutoModelForCausalLM.from_pretrained("./output") loads; checkpoints/pretrain/step_NNNNNN/ (every
        --checkpoint-interval steps and at the end, last --keep-checkpoints kept; `make all` passes
        --checkpoint-dir checkpoints/<SCALE>/pretrain), train.log, TensorBoard events in runs/pretrain/.

    python PreTrain/model.py                                   # CPU default: `cpu` preset, ~5 minutes on 2 cores
    python PreTrain/model.py --preset smoke                    # seconds
    cd PreTrain && torchrun --nproc_per_node=8 model.py        # DDP; gpt2-100m is the default preset on CUDA
    cd PreTrain && deepspeed --num_gpus=8 model.py --deepspeed ds_config.json   # ZeRO-2 (see ds_config.json)
    DS_ACCELERATOR=cpu deepspeed --num_gpus=2 --bind_cores_to_rank PreTrain/model.py --deepspeed PreTrain/ds_config.json
    python -m torch.distributed.launch --nproc_per_node=1 --use_env PreTrain/model.py    # the legacy launcher

Reruns. Rerunning the same command resumes from the newest checkpoint in --checkpoint-dir (model, optimizer, step,
data position, RNG); train.log then gets a "resumed at step N from ..." line, and step lines of the killed run above
it for later steps are superseded (history.jsonl holds each step once). Rerunning a finished run with the same
settings (run_settings: sizes, rows per step, schedule, seed, dtype; tokenizer and chunks unchanged) does nothing
and says so (output/lineage.json records them; --force redoes the export). A checkpoint of a run with other settings
is never resumed: with another --max-steps the run stops and says how many steps the checkpoint was trained for (its
lr schedule ends there); rerun with that --max-steps to finish it, or use a new --checkpoint-dir (or delete the old
one) to train from scratch. Replacing an output/ that later stages (SFT, ...) were built from needs --force; an
output/ holding files that are not a pretraining output is never replaced.

One experiment on any number of GPUs: --global-batch-tokens G (from the preset) is the batch of an optimizer step,
in tokens over all ranks; --batch-size B is the micro batch of one rank, in rows of --context-length T tokens, and
each of the R ranks accumulates G / (B x T x R) micro batches (gpt2-100m: 524,288 tokens = 32 micro batches of
16 x 1024 on 1 GPU, 4 on 8 GPUs). A G that does not split that way is an error. The length is --max-tokens (the
preset's: 2B for gpt2-100m, Chinchilla-like), capped at --max-epochs passes over the training tokens present, so a
small corpus is not memorised; the log says how many tokens and epochs the run trains. --max-steps overrides both.

The batch for an optimizer step is a pure function of (seed, step, rank): rows come from one seeded permutation of
the training rows per epoch and rank r takes its own disjoint slice, so a resumed run sees exactly the same data, and
a micro batch of B rows on R ranks sees the same rows per step as any other split of the G tokens. A NaN/inf loss
stops the run before the bad update is applied. If --context-length is smaller than the chunks' rows, each row
is cut into windows of context+1 tokens (sharing one boundary token), so no token is thrown away; a larger one is an
error (re-chunk the data instead).

Vocabulary: the embedding (tied with the LM head) has the tokenizer's size rounded up to a multiple of 64 rows
(50,000 -> 50,048; faster matmuls on GPUs), or --vocab-size rows. Logits of the padding rows are -inf, so they are
never predicted and get no gradient; the export keeps the tokenizer's rows only (config.vocab_size ==
len(tokenizer)) and gives the trained model's logits exactly. Checkpoints keep the padded size.

Precision: --dtype (default: $LLM_TRAIN_DTYPE, else auto) = bf16 autocast (DeepSpeed: its bf16 mode) or fp32; auto
picks bf16 on CUDA and on CPUs with bf16 matmul units (AMX / AVX512-BF16), else fp32: on an AVX2-only CPU a bf16
matmul is ~12x SLOWER than fp32 (measured). The exported weights are always fp32.

Reproducible on CPU: the same command on the same machine and thread count trains the same model (deterministic
algorithms; with --compile the threads' partial sums otherwise add up in a racing order, and two runs of the cpu
preset parted by step 10 and ended with bases that answered 93% and 67.5% of the held-out arithmetic). --seed
changes the initialisation and the data order.

MFU = 6*N + 12*layers*dim*context FLOPs per token (PaLM appendix B) times tokens/s over the peak: bf16 dense peak by
GPU name (H100 989 TFLOP/s, ...); on CPU --peak-flops, by default a nominal peak from the CPU flags and thread count
(cpu_peak_flops: 2 AVX2 cores fp32 = 0.19e12, as on the AMD EPYC development machine; 2 AMX cores bf16 = 0.67e12).

DeepSpeed checkpoints: engine.save_checkpoint writes checkpoints/pretrain/step_NNNNNN/ from all ranks; only after
every rank has finished (barrier) rank 0 adds trainer_state.json (step, history, settings) and atomically replaces
the `latest` file, which is what a resumed run loads. A run killed mid-save leaves `latest` pointing at the previous
complete checkpoint.

Multi-node (torchrun --nnodes N, deepspeed --hostfile): the checkpoint, log and output directories must be on a
filesystem shared by all nodes (NFS, Lustre, ...). Only the process of GLOBAL rank 0 writes checkpoints, `latest`,
train.log, TensorBoard events and output/ (DeepSpeed: every rank writes its own ZeRO shard into the same step
directory); every rank reads the checkpoint on resume. Each node's first process has LOCAL_RANK 0 too: it picks the
GPU, never who writes.

    torchrun --nnodes 2 --nproc_per_node 8 --node_rank 0 --master_addr HOST0 --master_port 29500 PreTrain/model.py
    deepspeed --hostfile hosts --master_addr HOST0 PreTrain/model.py --deepspeed PreTrain/ds_config.json
"""
import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from llm_train.atomic import atomic_dir, atomic_write_bytes, atomic_write_json, check_writable_dir
from llm_train.chunks import chunk_rows
from llm_train.cli import apply_preset, nonnegative_float, nonnegative_int, positive_float, positive_int, settings_of
from llm_train.errors import UserError, run_main
from llm_train.lineage import LINEAGE, already_done, check_output_dir, read_lineage, refuse_to_replace, write_lineage
from llm_train.paths import CHUNKS_DIR, OUTPUT_DIR, REPO, TOKENIZER_DIR
from llm_train.runtime import DTYPE_ENV, DTYPES, dtype_name, end_distributed
from llm_train.tokenizer import load_tokenizer, tokenizer_fingerprint

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# DeepSpeed's ZeRO code calls a torch collective that torch has deprecated: nothing a user of this script can act on.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)

# Model size, batch and schedule of each preset; every value can be overridden by its flag. The batch is global, in
# tokens per optimizer step (nanoGPT): 1, 2 or 8 GPUs train the same schedule, each rank accumulating
# global_batch_tokens / (batch_size x context_length x ranks) micro batches. The length is max_tokens, capped at
# --max-epochs passes over the training tokens present.
PRESETS = {
    # The real model of this project: GPT-2 small sizes with this project's tokenizer vocabulary (embedding padded to
    # a multiple of 64). GPT-2's 0.5M-token batch (1 GPU accumulates 32 micro batches of 16 x 1024, 8 GPUs 4) and
    # the Chinchilla budget, ~20 tokens per parameter: 2B tokens on real data.
    "gpt2-100m": dict(n_layer=12, n_embd=768, n_head=12, context_length=1024, vocab_size=None,
                      batch_size=16, global_batch_tokens=524288, max_tokens=2_000_000_000, lr=6e-4, warmup_steps=200),
    # GPT-2 small exactly (vocab 50257 padded to 50304), for throughput comparable to published numbers.
    "gpt2-124m": dict(n_layer=12, n_embd=768, n_head=12, context_length=1024, vocab_size=50304,
                      batch_size=16, global_batch_tokens=524288, max_tokens=2_500_000_000, lr=6e-4, warmup_steps=200),
    # The CPU default run: 1500 steps of 16 x 128 tokens (3.1M tokens). Its chunks start each arithmetic chat at
    # position 0 of a row of its own (filled up with text): a 3.4M model needs ~20k worked problems before it answers
    # any, and ~3x more when they sit anywhere in a row (measured). At a fixed number of problems, batch 16 beat 32
    # (12% vs 4% held-out exact match after 16k problems): the number of updates counts too. bench/sweep_pretrain.py
    # on these chunks, 500k tokens per run, val loss (of the first 320 val rows, as validation read then): batch 16 at
    # lr 1.5e-3 / 3e-3 / 6e-3: 5.01 / 4.95 / 5.87, batch 32: 5.31 / 5.72 / 6.30. The arithmetic comes late: fp32 with
    # AVX2 kernels, 900 steps (what would fit make all into 15 min there) answered 21% (base) / 38% (after SFT) of the
    # held-out problems, 1,500 steps 73% / 89.5%; bf16 on the AMX Xeon: 1,000 steps 32% / 50%, the same 16k rows as
    # 2,000 steps of batch 8 31% / 47% (and 16% slower there), 1,500 steps 89% / 94.5%.
    "cpu": dict(n_layer=4, n_embd=192, n_head=4, context_length=128, vocab_size=None, batch_size=16,
                global_batch_tokens=16 * 128, max_tokens=1500 * 16 * 128, lr=3e-3, warmup_steps=20),
    # Seconds: proves the pipeline end to end (30 steps of 8 rows).
    "smoke": dict(n_layer=2, n_embd=64, n_head=2, context_length=128, vocab_size=None,
                  batch_size=8, global_batch_tokens=8 * 128, max_tokens=30 * 8 * 128, lr=3e-3, warmup_steps=3),
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


def padded_vocab(vocab_size, multiple=64):
    """Embedding rows for a vocabulary: rounded up to a multiple of 64 (50,000 -> 50,048) for efficient matmuls."""
    return -(-vocab_size // multiple) * multiple


class GPT(nn.Module):
    """vocab_size tokens (the tokenizer's) in an embedding of padded_vocab_size >= vocab_size rows (default: no
    padding); the logits of the padding rows are -inf."""

    def __init__(self, vocab_size, context_length, n_layer, n_embd, n_head, padded_vocab_size=None,
                 activation_checkpointing=False):
        super().__init__()
        if n_embd % n_head:
            raise UserError(f"--n-embd {n_embd} must be divisible by --n-head {n_head}")
        padded_vocab_size = padded_vocab_size or vocab_size
        self.config = dict(vocab_size=vocab_size, padded_vocab_size=padded_vocab_size, context_length=context_length,
                           n_layer=n_layer, n_embd=n_embd, n_head=n_head)
        self.activation_checkpointing = activation_checkpointing
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(padded_vocab_size, n_embd),
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
        logits = F.linear(x, self.transformer.wte.weight).float()  # tied LM head
        if self.config["padded_vocab_size"] > self.config["vocab_size"]:
            # padding rows are no tokens: -inf keeps the softmax (and so the loss) that of the real vocabulary, which
            # the export keeps; writes only the padding columns
            logits[..., self.config["vocab_size"]:] = float("-inf")
        if targets is None:
            return logits
        # (A chunked fused linear+cross-entropy that never holds all fp32 logits measured ~15% slower here in fp32.)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


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
    """Write a GPT2LMHeadModel checkpoint + the tokenizer files into out_dir (a fresh temporary directory).

    The embedding keeps the tokenizer's rows only (the padding rows are no tokens; the trained model's logits for
    them are -inf), so config.vocab_size == len(tokenizer). The tokenizer's model_max_length is the model's context
    (the tokenizer dir's own value knows no model), and the generation config holds sampling defaults only: a
    max_new_tokens there would override a caller's generate(max_length=...). The MLP activation is the fused tanh GELU
    this model trained with (F.gelu(approximate="tanh")): GPT-2's "gelu_new" is the same formula in ~8 separate ops,
    which made every later stage's forward + backward 1.7x (bf16) to 1.9x (fp32) slower on CPU."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its bar over the one shard written is noise

    c = model_config
    vocab = len(tokenizer)
    if c["vocab_size"] != vocab:
        raise RuntimeError(f"model of {c['vocab_size']} tokens, tokenizer of {vocab}")
    model_state = {**model_state, "transformer.wte.weight": model_state["transformer.wte.weight"][:vocab].clone()}
    config = GPT2Config(vocab_size=vocab, n_positions=c["context_length"], n_embd=c["n_embd"],
                        n_layer=c["n_layer"], n_head=c["n_head"], activation_function="gelu_pytorch_tanh",
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
                                            top_k=50)
    hf.save_pretrained(str(out_dir), safe_serialization=True)
    for f in Path(tokenizer_dir).iterdir():  # the tokenizer as stage 1 wrote it (chat template included)
        if f.is_file() and f.name not in ("README.md", "report.json", LINEAGE):
            shutil.copy2(f, Path(out_dir) / f.name)
    tokenizer_config = Path(out_dir) / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text(encoding="utf-8")) if tokenizer_config.is_file() else {}
    atomic_write_json(tokenizer_config, {**settings, "model_max_length": c["context_length"]})


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
    if manifest.get("format") != 2:
        raise UserError(f"{path}: chunks in format {manifest.get('format')!r}, this script reads format 2 (flat token "
                        "files): re-run `python PreTrain/preprocess_dataset_for_pretrain_map.py --force` with your "
                        "settings")
    fingerprint = tokenizer_fingerprint(tokenizer_dir)
    if manifest.get("tokenizer_fingerprint") != fingerprint:
        made_with = (read_lineage(chunks_dir) or {}).get("parents", {}).get("tokenizer", {}).get("path")
        use = f"pass --tokenizer-dir {made_with} (the tokenizer they were made with), or " if made_with else ""
        raise UserError(f"{path} was made with another tokenizer than {tokenizer_dir} (fingerprint mismatch): {use}"
                        f"re-run `python PreTrain/preprocess_dataset_for_pretrain_map.py --tokenizer-dir "
                        f"{tokenizer_dir}` to chunk the data with this one")
    return manifest


load_rows = chunk_rows  # a split's rows, read from disk as batches need them


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
    """Linear warmup to --lr, then cosine decay to --lr * --min-lr-ratio at --max-steps (the lr of step 0-based)."""
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
    """Forward/backward of one optimizer step of the plain/DDP path: grad accumulation (DDP syncs gradients on the
    last micro batch only), clipping. Returns (mean loss, grad norm); the caller steps the optimizer."""
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


def cpu_peak_flops(dtype):
    """Nominal peak of the cores torch uses: per core 0.335e12 bf16 with AMX (measured, 2-core Sapphire Rapids
    VM), else fp32 FMA: 64 FLOP/cycle with AVX-512, 32 with AVX2 (e.g. AMD EPYC Zen 3), at ~3 GHz. The vector width
    is the one torch's kernels use, so ATEN_CPU_CAPABILITY=avx2 (emulating an AVX2-only CPU) counts AVX2's peak."""
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    if dtype == "bf16" and "amx_bf16" in flags:
        per_core = 0.335e12
    else:
        per_core = (64 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 32) * 3e9
    return torch.get_num_threads() * per_core


def device_peak_flops(args, dist):
    """(peak FLOP/s of one rank for MFU, or None for an unknown GPU; a description of the device)."""
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return gpu_peak_flops(dist.device)
    peak = args.peak_flops or cpu_peak_flops(args.dtype)
    return peak, f"cpu ({torch.get_num_threads()} threads, {args.dtype} peak {peak / 1e9:.0f} GFLOP/s)"


def peak_mem_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


@contextlib.contextmanager
def quiet_stdout():
    """Drop what DeepSpeed prints unasked ("... op built successfully", "Processing zero checkpoint ..."); shown
    after all if the call fails."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    except BaseException:
        sys.stdout.write(out.getvalue())
        sys.stderr.write(err.getvalue())
        raise


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


def run_settings(args, vocab_size, padded_vocab_size):
    """What decides the trained model: compared with a checkpoint's run before resuming it, and recorded in
    output/lineage.json, where an identical rerun finds the run finished. Not paths or logging, and not how the
    rows of a step are split into ranks and micro batches (any split of the same rows_per_step trains the same)."""
    return {**settings_of(args, "n_layer", "n_embd", "n_head", "context_length", "max_steps", "lr",
                                 "warmup_steps", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip", "seed",
                                 "dtype"),
            "vocab_size": vocab_size, "padded_vocab_size": padded_vocab_size,
            "rows_per_step": args.global_batch_tokens // args.context_length}


def check_resume(state, settings, fingerprints, ckpt_path, ckpt_dir):
    """A checkpoint is resumed only by the run that wrote it: same tokenizer, chunks and settings."""
    start_over = f"delete {ckpt_dir} (or pass another --checkpoint-dir) to train from scratch"
    for what, fingerprint in fingerprints.items():
        if state.get(f"{what}_fingerprint") != fingerprint:
            raise UserError(f"{ckpt_path} was trained with another {what} than the one now given (it was rebuilt "
                            f"since): {start_over}")
    recorded = state.get("settings")
    if recorded is None:
        raise UserError(f"{ckpt_path} was written by an older version of this script: {start_over}")
    if recorded["max_steps"] != settings["max_steps"]:
        raise UserError(f"{ckpt_path} belongs to a run of {recorded['max_steps']} steps (--max-steps "
                        f"{recorded['max_steps']}; its lr schedule ends there), not {settings['max_steps']}: rerun "
                        f"with --max-steps {recorded['max_steps']} to finish that run, or {start_over} for "
                        f"{settings['max_steps']} steps. Nothing was changed")
    changed = [k for k in settings if recorded.get(k) != settings[k]]
    if changed:
        what = "; ".join(f"{k}: {recorded.get(k)} there, {settings[k]} now" for k in changed)
        what += " (rows_per_step = --global-batch-tokens / --context-length)" if "rows_per_step" in changed else ""
        raise UserError(f"{ckpt_path} is a checkpoint of a run with other settings ({what}): rerun with that run's "
                        f"flags to continue it, or {start_over}. Nothing was changed")


# ---------------------------------------------------------------------------------------------------------------
def token_count(text):
    """A positive whole number of tokens, also written as 2e9 or 524_288."""
    value = positive_float(text)
    if value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens, got {text}")
    return int(value)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    pos_int, nonneg_int = positive_int, nonnegative_int
    pos_float, nonneg_float = positive_float, nonnegative_float
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model size and schedule (default: gpt2-100m with CUDA, cpu without)")
    p.add_argument("--n-layer", type=pos_int)
    p.add_argument("--n-embd", type=pos_int)
    p.add_argument("--n-head", type=pos_int)
    p.add_argument("--context-length", type=pos_int)
    p.add_argument("--vocab-size", type=pos_int,
                   help="embedding rows (default: the tokenizer's size rounded up to a multiple of 64); the export "
                        "keeps the tokenizer's rows")
    p.add_argument("--batch-size", type=pos_int, help="micro batch per rank, in rows")
    p.add_argument("--global-batch-tokens", type=token_count,
                   help="tokens per optimizer step over all ranks; each rank accumulates global / (batch-size x "
                        "context-length x ranks) micro batches")
    p.add_argument("--max-tokens", type=token_count,
                   help="training length in tokens (e.g. 2e9), capped at --max-epochs passes over the training data")
    p.add_argument("--max-epochs", type=pos_float, default=4.0,
                   help="at most this many passes over the training tokens present (caps --max-tokens)")
    p.add_argument("--max-steps", type=pos_int, help="optimizer steps (overrides --max-tokens and --max-epochs)")
    p.add_argument("--lr", type=pos_float, help="peak learning rate")
    p.add_argument("--warmup-steps", type=nonneg_int)
    p.add_argument("--min-lr-ratio", type=nonneg_float, default=0.1,
                   help="final lr as a fraction of --lr (cosine decay)")
    p.add_argument("--weight-decay", type=nonneg_float, default=0.1)
    p.add_argument("--beta1", type=nonneg_float, default=0.9)
    p.add_argument("--beta2", type=nonneg_float, default=0.95)
    p.add_argument("--grad-clip", type=pos_float, default=1.0)
    p.add_argument("--seed", type=nonneg_int, default=1337)
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help=f"bf16 autocast or fp32 (default: ${DTYPE_ENV}, else auto: bf16 on CUDA and on CPUs "
                        "with AMX/AVX512-BF16)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward: less memory")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on with CUDA, off on CPU; make all compiles the cpu run)")
    p.add_argument("--eval-interval", type=pos_int, default=100, help="validate every N steps (and at the end)")
    p.add_argument("--eval-rows", type=pos_int, default=320,
                   help="val rows per validation, spread evenly over the val split (all of them when it has fewer)")
    p.add_argument("--log-interval", type=pos_int, default=10)
    p.add_argument("--checkpoint-interval", type=pos_int, default=100)
    p.add_argument("--keep-checkpoints", type=pos_int, default=2)
    p.add_argument("--peak-flops", type=pos_float, default=None,
                   help="peak FLOP/s for MFU on CPU (default: a nominal peak from the CPU flags, see cpu_peak_flops)")
    p.add_argument("--chunks-dir", type=Path, default=CHUNKS_DIR)
    p.add_argument("--tokenizer-dir", type=Path, default=TOKENIZER_DIR)
    p.add_argument("--output-dir", type=Path, default=OUTPUT_DIR)
    p.add_argument("--checkpoint-dir", type=Path, default=REPO / "checkpoints" / "pretrain")
    p.add_argument("--log-file", type=Path, default=REPO / "train.log")
    p.add_argument("--tensorboard-dir", type=Path, default=REPO / "runs" / "pretrain")
    p.add_argument("--deepspeed", type=Path, default=None, metavar="DS_CONFIG", help="train with DeepSpeed (ZeRO-2)")
    p.add_argument("--force", action="store_true",
                   help="replace an output/ that later stages were built from, and redo a finished run's export")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by launchers
    p.add_argument("--debug-nan-step", type=int, default=-1, help="testing: make the loss NaN at this step")
    p.add_argument("--debug-kill-step", type=int, default=-1,
                   help="testing: SIGKILL this process at the end of this step (after its checkpoint, if one is due)")
    args = p.parse_args(argv)
    if args.beta1 >= 1 or args.beta2 >= 1:
        p.error(f"--beta1 and --beta2 must be below 1, got {args.beta1} and {args.beta2}")
    if args.min_lr_ratio > 1:
        p.error(f"--min-lr-ratio must be at most 1, got {args.min_lr_ratio}")
    args.warmup_from_preset = args.warmup_steps is None  # then shortened for a short run (resolve_schedule)
    apply_preset(args, PRESETS, "gpt2-100m" if torch.cuda.is_available() else "cpu")
    args.dtype = dtype_name(args.dtype)
    return args


# ---------------------------------------------------------------------------------------------------------------
# The phases of a run, in the order main() calls them.
@dataclass
class Dist:
    """Where this process runs: its rank among world_size processes and its device."""
    rank: int
    local_rank: int
    world_size: int
    distributed: bool  # a process group exists (DDP or DeepSpeed, even with one rank)
    device: torch.device

    @property
    def master(self):
        return self.rank == 0


def setup_distributed(args):
    """Rank, world size and device from the launcher's environment (torchrun, torch.distributed.launch and the
    deepspeed launcher set RANK etc.), and the process group: gloo on CPU, nccl on CUDA, DeepSpeed's own choice."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", max(args.local_rank, 0)))
    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:  # DeepSpeed (imported by transformers too) would warn that it found no GPU: this script knows
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not use_cuda and world_size > 1 and "OMP_NUM_THREADS" not in os.environ:  # share the cores between local ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    dist = Dist(rank, local_rank, world_size, "RANK" in os.environ or args.deepspeed is not None, device)
    if args.deepspeed is not None:
        if not args.deepspeed.is_file():
            raise UserError(f"DeepSpeed config {args.deepspeed} not found (it ships as PreTrain/ds_config.json)")
        with quiet_stdout():
            import deepspeed

            deepspeed.init_distributed()
        dist.rank, dist.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    elif dist.distributed:
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return dist


def read_inputs(args):
    """The chunks manifest and the tokenizer, checked against each other and the flags before anything is written:
    (manifest, tokenizer, vocab_size (the tokenizer's), padded_vocab_size (embedding rows), fingerprints of the
    tokenizer and the chunk set)."""
    manifest = read_manifest(args.chunks_dir, args.tokenizer_dir)
    tokenizer = load_tokenizer(args.tokenizer_dir)
    vocab_size = len(tokenizer)
    padded_vocab_size = args.vocab_size or padded_vocab(vocab_size)
    if padded_vocab_size < vocab_size:
        raise UserError(f"--vocab-size {padded_vocab_size} is smaller than the tokenizer's {vocab_size}")
    if args.context_length > manifest["context_length"]:
        raise UserError(f"--context-length {args.context_length} is larger than the chunks' context_length "
                        f"{manifest['context_length']} in {args.chunks_dir}: re-run preprocessing with "
                        f"--context-length {args.context_length} or pass a smaller --context-length")
    # the chunks' content, not when they were made ("seconds"): chunks rebuilt alike (make all after another SCALE)
    # still resume their checkpoints
    content = json.dumps({k: v for k, v in manifest.items() if k != "seconds"}, sort_keys=True)
    fingerprints = {"tokenizer": manifest["tokenizer_fingerprint"],
                    "chunks": hashlib.sha256(content.encode()).hexdigest()}
    return manifest, tokenizer, vocab_size, padded_vocab_size, fingerprints


def load_data(args, manifest, vocab_size, dist):
    """(train rows, val rows): ChunkRows readers of context_length + 1 tokens per row."""
    train_rows = load_rows(args.chunks_dir, manifest, "train", args.context_length, vocab_size)
    val_rows = load_rows(args.chunks_dir, manifest, "val", args.context_length, vocab_size)
    if len(val_rows) == 0:
        raise UserError(f"{args.chunks_dir}: the val split has no rows: re-run preprocessing with a val split")
    if len(train_rows) < args.batch_size * dist.world_size:
        raise UserError(f"{args.chunks_dir}: only {len(train_rows)} training rows, fewer than one batch "
                        f"({args.batch_size} x {dist.world_size} ranks): use more data or a smaller --batch-size")
    return train_rows, val_rows


def resolve_schedule(args, train_rows, world_size):
    """Set args.grad_accum (micro batches per rank per step) from the global batch and args.max_steps from the
    length in tokens, capped at --max-epochs over the training rows; returns the log line saying what the run
    trains. The same flags give the same steps and tokens per step on any number of ranks."""
    g, b, t, w = args.global_batch_tokens, args.batch_size, args.context_length, world_size
    rows_per_rank, rest = divmod(g, t * w)
    if rest or rows_per_rank % b:
        fits = [d for d in range(1, min(b, rows_per_rank) + 1) if not rest and rows_per_rank % d == 0][-4:]
        batch = f"a --batch-size that divides {rows_per_rank} ({', '.join(map(str, fits))}, ...) or " if fits else ""
        raise UserError(f"--global-batch-tokens {g} does not split into micro batches of --batch-size {b} x "
                        f"--context-length {t} tokens on {w} rank{'s' * (w > 1)}: {g} is not a multiple of {b} x "
                        f"{t} x {w} = {b * t * w}. Pass {batch}a --global-batch-tokens that is a multiple of "
                        f"{b * t * w} (e.g. {max(1, round(g / (b * t * w))) * b * t * w})")
    args.grad_accum = rows_per_rank // b
    train_tokens = len(train_rows) * t
    if args.max_steps is not None:
        how = "--max-steps"
    else:
        tokens, how = args.max_tokens, f"--max-tokens {args.max_tokens:,}"
        if tokens > args.max_epochs * train_tokens:  # whole steps within the cap
            args.max_steps = max(1, math.floor(args.max_epochs * train_tokens / g))
            how += f" capped at --max-epochs {args.max_epochs:g}: more data would let it train them"
        else:
            args.max_steps = math.ceil(tokens / g)
    if args.warmup_from_preset and args.warmup_steps > args.max_steps // 10:  # a short run: warm up for a tenth
        how += f"; the preset's {args.warmup_steps} warmup steps shortened to {args.max_steps // 10}"
        args.warmup_steps = args.max_steps // 10
    trained = args.max_steps * g
    return (f"training {trained:,} tokens = {trained / train_tokens:.2f} epochs over the {train_tokens:,} training "
            f"tokens of {args.chunks_dir} ({args.max_steps} steps of {g:,} tokens: {b} rows x {args.grad_accum} "
            f"micro batch{'es' * (args.grad_accum > 1)} x {w} rank{'s' * (w > 1)}; {how})")


@dataclass
class Engine:
    """The model as the chosen mode trains it: single process, DDP, or a DeepSpeed ZeRO-2 engine (`ds`)."""
    model: nn.Module  # the GPT itself
    train_model: nn.Module  # what forward/backward run through: model (compiled, DDP-wrapped) or the DeepSpeed engine
    optimizer: object
    autocast: object  # bf16 autocast; nullcontext under DeepSpeed, whose bf16 mode keeps bf16 weights itself
    ds: object = None
    mode: str = "single process"


def build_engine(args, dist, model):
    compile_model = args.compile if args.compile is not None else dist.device.type == "cuda"
    if args.deepspeed is not None:
        import deepspeed

        ds_config = json.loads(args.deepspeed.read_text())
        ds_config.pop("_comment", None)
        auto = {"train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": args.grad_accum,
                "train_batch_size": args.batch_size * args.grad_accum * dist.world_size,
                "gradient_clipping": args.grad_clip}
        for key, value in auto.items():
            if ds_config.get(key, "auto") == "auto":
                ds_config[key] = value
            elif key != "gradient_clipping" and ds_config[key] != value:  # one source of truth for the batch
                raise UserError(f"{args.deepspeed}: {key} is {ds_config[key]}, but --global-batch-tokens "
                                f"{args.global_batch_tokens} and --batch-size {args.batch_size} on {dist.world_size} "
                                f"ranks make it {value}: set it to \"auto\" and choose the batch with those flags")
        opt_params = ds_config.get("optimizer", {}).get("params", {})
        for key, value in {"lr": args.lr, "betas": [args.beta1, args.beta2], "weight_decay": args.weight_decay}.items():
            if opt_params.get(key) == "auto":
                opt_params[key] = value
        ds_config.setdefault("bf16", {})["enabled"] = args.dtype == "bf16"  # the one dtype switch decides
        if compile_model:
            model = torch.compile(model)
        with quiet_stdout():
            ds, optimizer, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                                       model_parameters=param_groups(model, args.weight_decay))
        return Engine(model, ds, optimizer, nullcontext(), ds=ds, mode="deepspeed")
    optimizer = make_optimizer(model, args, dist.device)
    train_model = torch.compile(model) if compile_model else model
    if dist.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    return Engine(model, train_model, optimizer, autocast, mode="ddp" if dist.distributed else "single process")


@dataclass
class Run:
    """A run's fixed facts and where it stands: the step done and the history (train and val entries, restored on
    resume, so each step is in it once)."""
    settings: dict
    fingerprints: dict
    model_config: dict
    rows_per_step: int
    step: int = 0
    history: list = field(default_factory=list)
    step_times: list = field(default_factory=list)
    resumed_from: Path = None


def checkpoint_to_resume(args, run):
    """(path, trainer state) of the newest checkpoint in --checkpoint-dir, checked to belong to this run, or None.
    Read before the engine is built, so a mismatch stops the run at once."""
    tag = latest_checkpoint(args.checkpoint_dir, args.deepspeed is not None)
    if tag is None:
        return None
    ckpt_path = args.checkpoint_dir / tag
    state_file = ckpt_path / ("trainer_state.json" if args.deepspeed is not None else "state.json")
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{state_file} is missing or unreadable: delete {ckpt_path} to resume from the checkpoint "
                        f"before it, or delete {args.checkpoint_dir} to start over") from None
    check_resume(state, run.settings, run.fingerprints, ckpt_path, args.checkpoint_dir)
    return ckpt_path, state


def resume(dist, engine, run, checkpoint):
    """Load the weights, optimizer and RNG state of a checked checkpoint; the run continues after its step."""
    ckpt_path, state = checkpoint
    if engine.ds is not None:
        with quiet_stdout():
            path, _ = engine.ds.load_checkpoint(str(ckpt_path.parent), tag=ckpt_path.name)
        if path is None:
            raise UserError(f"could not load DeepSpeed checkpoint {ckpt_path}: delete it to start over")
    else:
        from safetensors.torch import load_file

        engine.model.load_state_dict(load_file(str(ckpt_path / "model.safetensors")))
        extra = torch.load(ckpt_path / "optimizer.pt", map_location=dist.device, weights_only=True)
        engine.optimizer.load_state_dict(extra["optimizer"])
        torch.set_rng_state(extra["cpu_rng"])
        if dist.device.type == "cuda" and "cuda_rng" in extra:
            torch.cuda.set_rng_state(extra["cuda_rng"])
    run.step, run.history, run.resumed_from = state["step"], state["history"], ckpt_path


def save_checkpoint(args, dist, engine, run):
    state = {"step": run.step, "rows_per_step": run.rows_per_step, "data_rows_consumed": run.step * run.rows_per_step,
             "model_config": run.model_config, "settings": run.settings, "history": run.history,
             **{f"{k}_fingerprint": v for k, v in run.fingerprints.items()},
             "args": {k: str(v) for k, v in vars(args).items()}}
    tag = f"step_{run.step:06d}"
    if engine.ds is not None:
        engine.ds.save_checkpoint(str(args.checkpoint_dir), tag=tag, save_latest=False)
        if dist.master:  # every rank has written its part (save_checkpoint ends in a barrier): now point at it
            atomic_write_json(args.checkpoint_dir / tag / "trainer_state.json", state)
            atomic_write_bytes(args.checkpoint_dir / "latest", tag.encode())
            prune_checkpoints(args.checkpoint_dir, args.keep_checkpoints)
        torch.distributed.barrier()
        return
    if dist.master:
        from safetensors.torch import save_file

        with atomic_dir(args.checkpoint_dir / tag) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in engine.model.state_dict().items()},
                      str(tmp / "model.safetensors"))
            extra = {"optimizer": engine.optimizer.state_dict(), "cpu_rng": torch.get_rng_state()}
            if dist.device.type == "cuda":
                extra["cuda_rng"] = torch.cuda.get_rng_state(dist.device)
            torch.save(extra, tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps(state))
        prune_checkpoints(args.checkpoint_dir, args.keep_checkpoints)
    if dist.world_size > 1:
        torch.distributed.barrier()


def all_reduce_mean(t, dist):
    if dist.world_size > 1:
        torch.distributed.all_reduce(t)
        t = t / dist.world_size
    return t


def optimizer_step(args, dist, engine, batches, step):
    """One optimizer step at the schedule's lr over args.grad_accum micro batches per rank (resolve_schedule), with clipping; the update
    is skipped when the loss (mean over ranks) is not finite. Returns (loss, lr, grad norm)."""
    lr = lr_at(step, args)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    if engine.ds is not None:
        losses = []
        for micro in range(args.grad_accum):
            x, y = batches.get(step, micro)
            loss = engine.ds(x.to(dist.device), y.to(dist.device))
            if args.debug_nan_step == step:
                loss = loss * float("nan")
            engine.ds.backward(loss)  # DeepSpeed scales by 1 / gradient_accumulation_steps itself
            losses.append(loss.detach().float())
            if micro < args.grad_accum - 1:
                engine.ds.step()  # counts the micro step; DeepSpeed updates only at the accumulation boundary
        loss = all_reduce_mean(torch.stack(losses).mean(), dist)
        if math.isfinite(loss.item()):
            engine.ds.step()
        grad_norm = engine.ds.get_global_grad_norm()
    else:
        loss, grad_norm = train_step(engine.train_model, engine.optimizer, batches, step, args, dist.device,
                                     engine.autocast)
        loss = all_reduce_mean(loss.float(), dist)
        if math.isfinite(loss.item()):
            engine.optimizer.step()
        engine.optimizer.zero_grad(set_to_none=True)
    return loss.item(), lr, float(grad_norm) if grad_norm is not None else float("nan")


def val_row_indices(n_rows, eval_rows):
    """The val rows a validation reads: eval_rows of them at even spacing over the split (every row when it has
    fewer). The same rows at any batch size and number of ranks, so runs compare; and spread, because the split holds
    its documents in stream order (on the default corpus its first 160 rows are mostly chats: a loss a third lower)."""
    if n_rows <= eval_rows:
        return np.arange(n_rows)
    return np.linspace(0, n_rows - 1, eval_rows).round().astype(np.int64)  # spacing >= 1: no row twice


@torch.no_grad()
def evaluate(args, dist, engine, val_rows, step, tokens_per_byte):
    """Mean loss per token over the --eval-rows rows of val_row_indices, shared out over the ranks."""
    engine.train_model.eval()
    rows = val_row_indices(len(val_rows), args.eval_rows)
    mine = val_rows[rows[dist.rank::dist.world_size]]  # only this rank's rows are read
    total, count = torch.zeros((), device=dist.device), torch.zeros((), device=dist.device)
    for i in range(0, len(mine), args.batch_size):
        batch = torch.from_numpy(mine[i:i + args.batch_size].astype(np.int64)).to(dist.device)
        with engine.autocast:
            loss = engine.train_model(batch[:, :-1], batch[:, 1:])
        total += loss.float() * len(batch)
        count += len(batch)
    if dist.world_size > 1:
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
    engine.train_model.train()
    val_loss = (total / count.clamp(min=1)).item()
    return {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
            "val_bpb": val_loss * tokens_per_byte / math.log(2)}


class Log:
    """train.log (appended), TensorBoard and the console; rank 0 only."""

    def __init__(self, args, master):
        self.file = self.writer = None
        if master:
            from torch.utils.tensorboard import SummaryWriter

            args.log_file.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(args.log_file, "a", encoding="utf-8")
            self.writer = SummaryWriter(str(args.tensorboard_dir))

    def __call__(self, msg):
        if self.file:
            from tqdm import tqdm

            tqdm.write(msg)
            self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
            self.file.flush()

    def scalars(self, prefix, entry, step):
        if self.writer:
            for k, v in entry.items():
                if k != "step" and v is not None:
                    self.writer.add_scalar(f"{prefix}/{k.removeprefix('val_')}", v, step)

    def close(self):
        if self.file:
            self.writer.close()
            self.file.close()


def train(args, dist, engine, batches, val_rows, run, log, throughput, tokens_per_byte):
    """The loop: optimizer steps until --max-steps, logging every --log-interval steps, validating every
    --eval-interval and checkpointing every --checkpoint-interval steps (and at the end)."""
    from tqdm import tqdm

    fpt, peak = throughput
    tokens_per_step = run.rows_per_step * args.context_length
    bar = tqdm(total=args.max_steps, initial=run.step, desc="pretrain", disable=not dist.master, dynamic_ncols=True)
    while run.step < args.max_steps:
        t0 = time.perf_counter()
        loss, lr, grad_norm = optimizer_step(args, dist, engine, batches, run.step)
        if not math.isfinite(loss):
            last = latest_checkpoint(args.checkpoint_dir, engine.ds is not None)
            log(f"step {run.step}: loss is {loss}; stopping before the update. Last good checkpoint: "
                f"{args.checkpoint_dir / last if last else 'none'}. Lower --lr or check the data, then rerun.")
            bar.close()
            raise UserError(f"loss became {loss} at step {run.step}: training stopped, no output written "
                            f"(last good checkpoint: {last or 'none'})")
        dt = time.perf_counter() - t0
        run.step += 1
        step = run.step
        run.step_times.append(dt)
        bar.update(1)
        if step % args.log_interval == 0 or step == args.max_steps or step == 1:
            entry = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / dt,
                     "mfu": fpt * tokens_per_step / dt / (peak * dist.world_size) if peak else None,
                     "peak_mem_mb": peak_mem_mb(dist.device)}
            run.history.append(entry)
            mfu = f"{100 * entry['mfu']:.1f}%" if peak else "n/a"
            log(f"step {step:6d} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                f"{entry['tokens_per_s']:,.0f} tok/s | MFU {mfu} | peak mem {entry['peak_mem_mb']:,.0f} MB")
            log.scalars("train", {k: entry[k] for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu")}, step)
            bar.set_postfix(loss=f"{loss:.3f}")
        if step % args.eval_interval == 0 or step == args.max_steps:
            val = evaluate(args, dist, engine, val_rows, step, tokens_per_byte)
            run.history.append(val)
            log(f"step {step:6d} | val loss {val['val_loss']:.4f} | val ppl {val['val_ppl']:.2f} | "
                f"val bits/byte {val['val_bpb']:.4f}")
            log.scalars("val", val, step)
        if step % args.checkpoint_interval == 0 or step == args.max_steps:
            save_checkpoint(args, dist, engine, run)
        if step == args.debug_kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()


def export(args, dist, engine, run, tokenizer, summary):
    """Write output/ (rank 0) in one rename: the HF model in fp32, tokenizer, history, summary and lineage."""
    if engine.ds is not None:
        if not dist.master:
            return
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with quiet_stdout():  # the fp32 master weights, gathered from the final ZeRO checkpoint
            state_dict = get_fp32_state_dict_from_zero_checkpoint(str(args.checkpoint_dir), tag=f"step_{run.step:06d}")
        model = GPT(**run.model_config)
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state_dict.items()})
    else:
        model = engine.model
    if not dist.master:
        return
    with atomic_dir(args.output_dir) as tmp:
        save_hf(hf_state_dict(model), run.model_config, tokenizer, args.tokenizer_dir, tmp)
        (tmp / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in run.history))
        atomic_write_json(tmp / "pretrain_summary.json", summary)
        write_lineage(tmp, "pretrain", run.settings, tokenizer_dir=args.tokenizer_dir, chunks=args.chunks_dir,
                             tokenizer=args.tokenizer_dir)


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    dist = setup_distributed(args)
    try:
        manifest, tokenizer, vocab_size, padded_vocab_size, fingerprints = read_inputs(args)
        train_rows, val_rows = load_data(args, manifest, vocab_size, dist)
        schedule = resolve_schedule(args, train_rows, dist.world_size)
        settings = run_settings(args, vocab_size, padded_vocab_size)
        with nullcontext() if dist.master else contextlib.redirect_stdout(io.StringIO()):  # said once, by rank 0
            if not args.force and already_done(args.output_dir, "pretrain", settings, chunks=args.chunks_dir,
                                                      tokenizer=args.tokenizer_dir):
                return
        check_output_dir(args.output_dir, "pretrain", "pretraining")
        refuse_to_replace(args.output_dir, args.force, "pretrained model")
        if dist.master:
            check_writable_dir(args.output_dir.parent)
            check_writable_dir(args.checkpoint_dir)

        torch.manual_seed(args.seed)
        if dist.device.type == "cpu":  # compiled kernels otherwise add in a racing order: two runs of one command
            torch.use_deterministic_algorithms(True, warn_only=True)  # part by step 10 (same speed, measured)
        model = GPT(vocab_size, args.context_length, args.n_layer, args.n_embd, args.n_head, padded_vocab_size,
                    activation_checkpointing=args.activation_checkpointing).to(dist.device)
        run = Run(settings, fingerprints, model.config, settings["rows_per_step"])
        checkpoint = checkpoint_to_resume(args, run)
        engine = build_engine(args, dist, model)
        if checkpoint:
            resume(dist, engine, run, checkpoint)

        n_params = sum(p.numel() for p in model.parameters())
        fpt = flops_per_token(run.model_config, n_params)
        peak, device_name = device_peak_flops(args, dist)
        batches = Batches(train_rows, args.batch_size, args.grad_accum, dist.rank, dist.world_size, args.seed)
        val_split = manifest["splits"]["val"]
        tokens_per_byte = val_split["tokens"] / max(1, val_split["bytes"])

        log = Log(args, dist.master)
        log(f"pretrain: preset {args.preset}, {n_params / 1e6:.2f}M params ({run.model_config}), {engine.mode} "
            f"x{dist.world_size} on {device_name}, {args.dtype}, {len(train_rows)} train rows / {len(val_rows)} val "
            f"rows of {args.context_length + 1} tokens")
        log(schedule)
        if run.resumed_from:
            log(f"resumed at step {run.step} from {run.resumed_from}: lines for steps after {run.step} above this one "
                "are from the interrupted run and superseded by those below")

        train(args, dist, engine, batches, val_rows, run, log, (fpt, peak), tokens_per_byte)

        if not run.history or "val_loss" not in run.history[-1]:  # resumed after the end: still report validation
            run.history.append(evaluate(args, dist, engine, val_rows, run.step, tokens_per_byte))
        tokens_per_step = run.rows_per_step * args.context_length
        median_tps = tokens_per_step / float(np.median(run.step_times)) if run.step_times else None
        train_entries, val = [h for h in run.history if "loss" in h], run.history[-1]
        summary = {"preset": args.preset, "model_config": run.model_config, "params": n_params, "steps": run.step,
                   "tokens_seen": run.step * tokens_per_step, "global_batch_tokens": tokens_per_step,
                   "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                   "epochs": run.step * tokens_per_step / (len(train_rows) * args.context_length),
                   "world_size": dist.world_size, "mode": engine.mode,
                   "final_train_loss": train_entries[-1]["loss"] if train_entries else None,
                   "first_train_loss": train_entries[0]["loss"] if train_entries else None,
                   "final_val_loss": val["val_loss"], "val_ppl": val["val_ppl"], "val_bpb": val["val_bpb"],
                   "median_tokens_per_s": median_tps, "wall_seconds": time.time() - t_start, "device": device_name,
                   "dtype": args.dtype,
                   "mfu": fpt * median_tps / (peak * dist.world_size) if peak and median_tps else None}
        export(args, dist, engine, run, tokenizer, summary)
        log(f"done: {run.step} steps, final train loss {summary['final_train_loss']}, val loss {val['val_loss']:.4f}, "
            f"val bits/byte {val['val_bpb']:.4f}, wrote {args.output_dir} in {summary['wall_seconds']:.0f}s")
        log.close()
        end_distributed()  # the other ranks wait for rank 0's export
    except UserError:
        if not dist.master:  # every check runs alike on every rank: rank 0 says it, the others stop with its code
            sys.exit(2)
        raise
    finally:  # after an error too, so that a caller can start again (a no-op after the success path's)
        end_distributed(wait=False)


if __name__ == "__main__":
    run_main(main)
