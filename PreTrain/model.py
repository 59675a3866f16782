"""Stage 3: pretrain GPT-2 (llm_train/gpt.py) from scratch on the tokenized chunks, plain PyTorch, DDP or ZeRO-2.

Reads:  pretrain_data_chunks/ (manifest.json + flat token files, from PreTrain/preprocess_dataset_for_pretrain_map.py)
        and tokenizer/ (its fingerprint must match the manifest's); rows are read from disk as batches need them.
Writes: output/ a Hugging Face GPT-2 checkpoint (config.json, model.safetensors in fp32, generation_config.json,
        tokenizer files with model_max_length = the context, history.jsonl, pretrain_summary.json, lineage.json) that
        AutoModelForCausalLM.from_pretrained("./output") loads; checkpoints/pretrain/step_NNNNNN/ (every
        --checkpoint-interval steps and at the end, the last --keep-checkpoints kept; `make all` passes
        --checkpoint-dir checkpoints/<SCALE>/pretrain), train.log, TensorBoard events in runs/pretrain/.

    python PreTrain/model.py                                   # CPU default: `cpu` preset, ~5 minutes on 2 cores
    python PreTrain/model.py --preset smoke                    # seconds
    cd PreTrain && torchrun --nproc_per_node=8 model.py        # DDP; gpt2-100m is the default preset on CUDA
    cd PreTrain && deepspeed --num_gpus=8 model.py --deepspeed ds_config.json   # ZeRO-2 (see ds_config.json)
    DS_ACCELERATOR=cpu deepspeed --num_gpus=2 --bind_cores_to_rank PreTrain/model.py --deepspeed PreTrain/ds_config.json
    python -m torch.distributed.launch --nproc_per_node=1 --use_env PreTrain/model.py    # the legacy launcher
    torchrun --nnodes 2 --nproc_per_node 8 --node_rank 0 --master_addr HOST0 --master_port 29500 PreTrain/model.py
    deepspeed --hostfile hosts --master_addr HOST0 PreTrain/model.py --deepspeed PreTrain/ds_config.json

Rerunning the same command resumes from the newest checkpoint of this run (model, optimizer, step, RNG; the data
order is a function of seed and step); a finished run is not redone (--force redoes its export); an output/ that later
stages were built from is replaced only with --force. --global-batch-tokens is the batch of an optimizer step over all
ranks; each rank accumulates it in micro batches of --batch-size rows (a preset's lowered, else the global batch moved
to the nearest that splits, as the log says; an explicit one that does not split is an error). The length is
--max-tokens capped at --max-epochs over the training tokens present, or --max-steps. --dtype (default
$LLM_TRAIN_DTYPE, else auto) is bf16 or fp16 (loss-scaled: T4, V100) autocast, or fp32. Several nodes need the
checkpoint, log and output directories on a shared filesystem; only global rank 0 writes them (DeepSpeed: each rank
its own ZeRO shard).
"""
import argparse
import contextlib
import functools
import io
import json
import math
import os
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from llm_train import pretrain_checkpoint as checkpoints
from llm_train.atomic import atomic_write_json
from llm_train.cli import apply_preset, nonnegative_float, nonnegative_int, positive_float, positive_int, settings_of
from llm_train.distributed import all_reduce_mean, deepspeed_config, quiet_stdout, setup_distributed
from llm_train.errors import UserError, run_main
from llm_train.gpt import GPT, flops_per_token, hf_state_dict, padded_vocab, param_groups, save_hf
from llm_train.paths import CHUNKS_DIR, OUTPUT_DIR, REPO, TOKENIZER_DIR
from llm_train.pretrain_data import Batches, chunks_fingerprint, load_splits, read_manifest, val_row_indices
from llm_train.pretrain_schedule import micro_batch, plan_from_flags, token_count
from llm_train.runtime import DTYPE_ENV, DTYPES, autocast, dtype_name, end_distributed
from llm_train.stage import Stage
from llm_train.throughput import device_peak_flops, largest_fitting_batch, peak_mem_mb
from llm_train.tokenizer import load_tokenizer
from llm_train.train_log import TrainLog, check_log_file

import numpy as np
import torch

# DeepSpeed's ZeRO code calls a torch collective that torch has deprecated: nothing a user of this script can act on.
warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated",
                        category=FutureWarning)

# Model size, batch and schedule of each preset; a flag given on the command line wins. The batch is global, in
# tokens per optimizer step (nanoGPT), so any number of GPUs trains the same schedule.
PRESETS = {
    # The real model of this project: GPT-2 small sizes with this project's tokenizer vocabulary, GPT-2's 0.5M-token
    # batch (1 GPU: 32 micro batches of 16 x 1024, 8 GPUs: 4) and the Chinchilla budget, ~20 tokens per parameter.
    "gpt2-100m": dict(n_layer=12, n_embd=768, n_head=12, context_length=1024, vocab_size=None,
                      batch_size=16, global_batch_tokens=524288, max_tokens=2_000_000_000, lr=6e-4, warmup_steps=200),
    # GPT-2 small exactly (vocab 50257 padded to 50304), for throughput comparable to published numbers.
    "gpt2-124m": dict(n_layer=12, n_embd=768, n_head=12, context_length=1024, vocab_size=50304,
                      batch_size=16, global_batch_tokens=524288, max_tokens=2_500_000_000, lr=6e-4, warmup_steps=200),
    # The CPU default run: 1500 steps of 8 x 256 tokens (3.1M tokens); context 256 so that a chat has room (and
    # generate(max_length=200) works); batch, lr and length: docs/experiments.md#pretraining.
    "cpu": dict(n_layer=4, n_embd=192, n_head=4, context_length=256, vocab_size=None, batch_size=8,
                global_batch_tokens=8 * 256, max_tokens=1500 * 8 * 256, lr=3e-3, warmup_steps=20),
    # Seconds: proves the pipeline end to end (30 steps of 8 rows).
    "smoke": dict(n_layer=2, n_embd=64, n_head=2, context_length=256, vocab_size=None,
                  batch_size=8, global_batch_tokens=8 * 256, max_tokens=30 * 8 * 256, lr=3e-3, warmup_steps=3),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--batch-size", type=micro_batch,
                   help="micro batch per rank, in rows (default: the preset's), or auto: on CUDA the largest dividing "
                        "the rows per rank that fits in GPU memory (halved until it does), on CPU the preset's")
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
    p.add_argument("--dtype", choices=(*DTYPES, "fp16"), default=None,
                   help=f"bf16 or fp16 (with a loss scaler) autocast, or fp32 (default: ${DTYPE_ENV}, else auto: bf16 "
                        "on CUDA, fp16 on GPUs without bf16, bf16 on CPUs with AMX/AVX512-BF16, else fp32)")
    p.add_argument("--chunked-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="LM head + loss by chunks of rows, never all logits at once (default: on with CUDA)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward: less memory")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on with CUDA, off on CPU; make all compiles the cpu run)")
    p.add_argument("--eval-interval", type=pos_int, default=250, help="validate every N steps (and at the end)")
    p.add_argument("--eval-rows", type=pos_int, default=320,
                   help="val rows per validation, spread evenly over the val split (all of them when it has fewer)")
    p.add_argument("--log-interval", type=pos_int, default=10)
    p.add_argument("--checkpoint-interval", type=pos_int, default=100)
    p.add_argument("--keep-checkpoints", type=pos_int, default=2)
    p.add_argument("--peak-flops", type=pos_float, default=None,
                   help="peak FLOP/s for MFU on CPU (default: a nominal peak from the CPU flags and threads)")
    p.add_argument("--chunks-dir", type=Path, default=CHUNKS_DIR)
    p.add_argument("--tokenizer-dir", type=Path, default=TOKENIZER_DIR)
    p.add_argument("--output-dir", type=Path, default=OUTPUT_DIR)
    p.add_argument("--checkpoint-dir", type=Path, default=REPO / "checkpoints" / "pretrain")
    p.add_argument("--log-file", type=Path, default=REPO / "train.log")
    p.add_argument("--tensorboard-dir", type=Path, default=REPO / "runs" / "pretrain")
    p.add_argument("--deepspeed", type=Path, default=None, metavar="DS_CONFIG",
                   help="train with DeepSpeed: PreTrain/ds_config.json (ZeRO-2), ds_config_zero3.json (ZeRO-3), "
                        "ds_config_offload.json (ZeRO-2, optimizer on the CPU)")
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
    args.warmup_from_preset = args.warmup_steps is None  # then shortened for a short run (plan_schedule)
    args.batch_auto, args.batch_from_preset = args.batch_size == "auto", args.batch_size in (None, "auto")
    args.batch_size = None if args.batch_auto else args.batch_size  # a preset's: lowered if it does not split
    apply_preset(args, PRESETS, "gpt2-100m" if torch.cuda.is_available() else "cpu")
    args.dtype = dtype_name(args.dtype, allow_fp16=True)
    return args


@dataclass
class Engine:
    """The model as the chosen mode trains it: single process, DDP, or a DeepSpeed ZeRO-2 engine (`ds`)."""
    model: torch.nn.Module  # the GPT itself
    train_model: torch.nn.Module  # what forward/backward run through: model (compiled, DDP-wrapped) or `ds`
    optimizer: object
    autocast: object  # bf16/fp16 autocast; nullcontext under DeepSpeed, whose bf16/fp16 mode keeps its own weights
    ds: object = None
    mode: str = "single process"
    scaler: object = None  # fp16 (not DeepSpeed): the GradScaler; a step whose gradients overflow is skipped


def build_engine(model, dist, compile_model, dtype, optimizer, ds_config=None):
    """dtype: 'bf16', 'fp16' or 'fp32'; optimizer: AdamW's lr, betas and weight_decay. ds_config: DeepSpeed's
    filled-in config, or None."""
    if ds_config is not None:
        import deepspeed

        # the tied LM head uses wte.weight in GPT.forward, outside wte: ZeRO-3 (which partitions every parameter)
        # must gather it for GPT's forward and backward too (a no-op under ZeRO-2)
        deepspeed.zero.register_external_parameter(model, model.transformer.wte.weight)
        zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
        model = torch.compile(model) if compile_model and not zero3 else model
        with quiet_stdout():
            ds, opt, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                                 model_parameters=param_groups(model, optimizer["weight_decay"]))
        if compile_model and zero3:  # ZeRO-3's hooks need the eager module: DeepSpeed compiles it itself
            ds.compile()
        return Engine(model, ds, opt, nullcontext(), ds=ds, mode="deepspeed")
    # fused AdamW: one kernel over all parameters (CPU and CUDA), faster than the foreach default
    opt = torch.optim.AdamW(param_groups(model, optimizer["weight_decay"]), lr=optimizer["lr"],
                            betas=optimizer["betas"], eps=1e-8, fused=True)
    train_model = torch.compile(model) if compile_model else model
    if dist.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    autocast = torch.autocast(dist.device.type, dtype=low or torch.bfloat16, enabled=low is not None)
    scaler = torch.amp.GradScaler(dist.device.type) if dtype == "fp16" else None
    return Engine(model, train_model, opt, autocast, mode="ddp" if dist.distributed else "single process", scaler=scaler)


def forward_backward(engine, batches, step, grad_accum, device, poison=False):
    """Forward and backward over this rank's grad_accum micro batches of the step (DDP syncs the gradients on the
    last one only; DeepSpeed counts the micro steps itself); returns their mean loss. poison: make the loss NaN."""
    losses = []
    for micro in range(grad_accum):
        x, y = (t.to(device, non_blocking=True) for t in batches.get(step, micro))
        if engine.ds is not None:
            loss = engine.ds(x, y)
            if poison:
                loss = loss * float("nan")
            engine.ds.backward(loss)  # DeepSpeed scales by 1 / gradient_accumulation_steps itself
            if micro < grad_accum - 1:
                engine.ds.step()  # DeepSpeed updates only at the accumulation boundary
        else:
            last = micro == grad_accum - 1
            sync = nullcontext() if last or not hasattr(engine.train_model, "no_sync") else engine.train_model.no_sync()
            with sync, engine.autocast:
                loss = engine.train_model(x, y)
                if poison:
                    loss = loss * float("nan")
            (loss / grad_accum if engine.scaler is None else engine.scaler.scale(loss / grad_accum)).backward()
        losses.append(loss.detach().float())
    return torch.stack(losses).mean()


def update(engine, apply, grad_clip):
    """Clip the accumulated gradients and step the optimizer (unless not apply: a non-finite loss); returns the
    gradient norm before clipping. fp16: the gradients are unscaled first, and the scaler skips the update of a step
    whose gradients overflowed (and lowers its scale): the step still counts, it is no NaN stop."""
    if engine.ds is not None:
        if apply:
            engine.ds.step()
        grad_norm = engine.ds.get_global_grad_norm()
    else:
        if engine.scaler is not None:
            engine.scaler.unscale_(engine.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(engine.train_model.parameters(), grad_clip)
        if apply and engine.scaler is not None:
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        elif apply:
            engine.optimizer.step()
        engine.optimizer.zero_grad(set_to_none=True)
    return float(grad_norm) if grad_norm is not None else float("nan")


@torch.no_grad()
def evaluate(model, autocast, val_rows, eval_rows, batch_size, dist, tokens_per_byte):
    """Mean loss per token over the eval_rows rows of val_row_indices, shared out over the ranks."""
    model.eval()
    rows = val_row_indices(len(val_rows), eval_rows)
    mine = val_rows[rows[dist.rank::dist.world_size]]  # only this rank's rows are read
    total, count = torch.zeros((), device=dist.device), torch.zeros((), device=dist.device)
    for i in range(0, len(mine), batch_size):
        batch = torch.from_numpy(mine[i:i + batch_size].astype(np.int64)).to(dist.device)
        with autocast:
            loss = model(batch[:, :-1], batch[:, 1:])
        total += loss.float() * len(batch)
        count += len(batch)
    if dist.world_size > 1:
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
    model.train()
    val_loss = (total / count.clamp(min=1)).item()
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
            "val_bpb": val_loss * tokens_per_byte / math.log(2)}


@dataclass
class Run:
    """A run's fixed facts and where it stands: the step done and the history (train and val entries, restored on
    resume, so each step is in it once). flags: the command's flags as strings, recorded in its checkpoints."""
    settings: dict
    fingerprints: dict
    model_config: dict
    rows_per_step: int
    flags: dict
    step: int = 0
    history: list = field(default_factory=list)
    step_times: list = field(default_factory=list)
    resumed_from: Path = None
    grad_scaler: dict = None  # fp16: the GradScaler's state (scale, growth tracker), saved in and restored from state

    def state(self):
        """What a checkpoint records next to the weights (state.json, DeepSpeed: trainer_state.json)."""
        return {"step": self.step, "rows_per_step": self.rows_per_step,
                "data_rows_consumed": self.step * self.rows_per_step, "model_config": self.model_config,
                "settings": self.settings, "history": self.history,
                **{f"{k}_fingerprint": v for k, v in self.fingerprints.items()}, "args": self.flags,
                **({"grad_scaler": self.grad_scaler} if self.grad_scaler else {})}

    def summary(self, facts, train_tokens, mfu_per_token_per_s, seconds):
        """pretrain_summary.json: the run's fixed facts (global_batch_tokens among them), then what it did."""
        tokens_per_step = facts["global_batch_tokens"]
        median_tps = tokens_per_step / float(np.median(self.step_times)) if self.step_times else None
        train_entries, val = [h for h in self.history if "loss" in h], self.history[-1]
        return {**facts, "steps": self.step, "tokens_seen": self.step * tokens_per_step,
                "epochs": self.step * tokens_per_step / train_tokens,
                "final_train_loss": train_entries[-1]["loss"] if train_entries else None,
                "first_train_loss": train_entries[0]["loss"] if train_entries else None,
                "final_val_loss": val["val_loss"], "val_ppl": val["val_ppl"], "val_bpb": val["val_bpb"],
                "median_tokens_per_s": median_tps, "wall_seconds": seconds,
                "mfu": median_tps * mfu_per_token_per_s if mfu_per_token_per_s and median_tps else None}


def save_checkpoint(engine, dist, run, ckpt_dir, keep):
    """checkpoint_dir/step_NNNNNN/ of the step done (llm_train/pretrain_checkpoint.py), the last `keep` kept."""
    tag = f"step_{run.step:06d}"
    run.grad_scaler = engine.scaler.state_dict() if engine.scaler is not None else None
    if engine.ds is not None:
        engine.ds.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
        if dist.master:  # every rank has written its part (save_checkpoint ends in a barrier): now point at it
            checkpoints.mark_deepspeed_checkpoint(ckpt_dir, tag, dist.device, run.state(), keep)
        torch.distributed.barrier()
        return
    if dist.master:
        checkpoints.save_plain(ckpt_dir, tag, engine.model, engine.optimizer, dist.device, run.state(), keep)
    if dist.world_size > 1:
        torch.distributed.barrier()


def resume(engine, dist, run, checkpoint):
    """Load the weights, optimizer and RNG states of a checked checkpoint; the run continues after its step."""
    ckpt_path, state = checkpoint
    if engine.ds is not None:
        checkpoints.check_deepspeed_stage(ckpt_path, engine.ds.zero_optimization_stage() == 3)
        with quiet_stdout():
            path, _ = engine.ds.load_checkpoint(str(ckpt_path.parent), tag=ckpt_path.name)
        if path is None:
            raise UserError(f"could not load DeepSpeed checkpoint {ckpt_path}: delete it to start over")
        checkpoints.restore_deepspeed_rng(ckpt_path, dist.device)
    else:
        checkpoints.load_plain(ckpt_path, engine.model, engine.optimizer, dist.device)
        if engine.scaler is not None and state.get("grad_scaler"):
            engine.scaler.load_state_dict(state["grad_scaler"])
    run.step, run.history, run.resumed_from = state["step"], state["history"], ckpt_path


def export(engine, dist, run, stage, tokenizer, tokenizer_dir, ckpt_dir, summary):
    """Write output/ (rank 0) in one rename: the HF model in fp32, tokenizer, history, summary and lineage."""
    if not dist.master:
        return
    model = engine.model
    if engine.ds is not None:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with quiet_stdout():  # the fp32 master weights, gathered from the final ZeRO checkpoint
            state_dict = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=f"step_{run.step:06d}")
        model = GPT(**run.model_config)
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state_dict.items()})
    with stage.output() as tmp:
        save_hf(hf_state_dict(model), run.model_config, tokenizer, tokenizer_dir, tmp)
        (tmp / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in run.history))
        atomic_write_json(tmp / "pretrain_summary.json", summary)


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    dist = setup_distributed(args.local_rank, args.deepspeed)
    try:
        pretrain(args, dist, t_start)
        end_distributed()  # the other ranks wait for rank 0's export
    except UserError:
        if not dist.master:  # every check runs alike on every rank: rank 0 says it, the others stop with its code
            sys.exit(2)
        raise
    finally:  # after an error too, so that a caller can start again (a no-op after the success path's)
        end_distributed(wait=False)


def new_model(args, dist, vocab_size, padded_vocab_size, schedule, n_train_rows):
    """(the seeded GPT to train, on dist.device; the schedule, replanned with --batch-size auto on CUDA at the largest
    micro batch that fits: the same steps)."""
    torch.manual_seed(args.seed)
    if dist.device.type == "cpu":  # else compiled kernels add up in a racing order: runs of one command part
        torch.use_deterministic_algorithms(True, warn_only=True)  # (docs/experiments.md#pretraining)
    chunked = args.chunked_loss if args.chunked_loss is not None else dist.device.type == "cuda"
    model = GPT(vocab_size, args.context_length, args.n_layer, args.n_embd, args.n_head, padded_vocab_size,
                activation_checkpointing=args.activation_checkpointing, chunked_loss=chunked).to(dist.device)
    if args.batch_auto and dist.device.type == "cuda":
        rows = args.global_batch_tokens // (args.context_length * dist.world_size)  # per rank
        fits = largest_fitting_batch(model, autocast(dist.device, args.dtype), rows, args.context_length, dist)
        schedule = plan_from_flags(args, dist.world_size, n_train_rows, batch_size=fits)
    return model, schedule


def pretrain(args, dist, t_start):
    # The inputs, checked against each other and the flags before anything is written.
    manifest = read_manifest(args.chunks_dir, args.tokenizer_dir)
    tokenizer = load_tokenizer(args.tokenizer_dir)
    vocab_size = len(tokenizer)
    padded_vocab_size = args.vocab_size or padded_vocab(vocab_size)
    if padded_vocab_size < vocab_size:
        raise UserError(f"--vocab-size {padded_vocab_size} is smaller than the tokenizer's {vocab_size}")
    train_rows, val_rows = load_splits(args.chunks_dir, manifest, args.context_length, vocab_size, args.batch_size,
                                       dist.world_size)
    schedule = plan_from_flags(args, dist.world_size, len(train_rows))  # sets the batch flags to those it trains

    # What decides the trained model, compared with a checkpoint's before resuming it and recorded in lineage.json:
    # not paths or logging, nor how a step's rows split into ranks and micro batches (any split trains the same).
    settings = {**settings_of(args, "n_layer", "n_embd", "n_head", "context_length"), "max_steps": schedule.max_steps,
                "lr": args.lr, "warmup_steps": schedule.warmup_steps,
                **settings_of(args, "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip", "seed", "dtype"),
                "vocab_size": vocab_size, "padded_vocab_size": padded_vocab_size,
                "rows_per_step": args.global_batch_tokens // args.context_length}
    stage = Stage("pretrain", "pretrained model", args.output_dir, settings, force=args.force,
                  parents={"chunks": args.chunks_dir, "tokenizer": args.tokenizer_dir},
                  tokenizer_dir=args.tokenizer_dir)
    with nullcontext() if dist.master else contextlib.redirect_stdout(io.StringIO()):  # said once, by rank 0
        if stage.done():
            return
    check_log_file(args.log_file)
    stage.prepare(writable=[args.checkpoint_dir, args.log_file.parent, args.tensorboard_dir] if dist.master else [])

    # The model, the engine that trains it (plain, DDP or DeepSpeed), and the checkpoint of this run it resumes.
    model, schedule = new_model(args, dist, vocab_size, padded_vocab_size, schedule, len(train_rows))
    fingerprints = {"tokenizer": manifest["tokenizer_fingerprint"], "chunks": chunks_fingerprint(manifest)}
    flags = {**vars(args), "grad_accum": schedule.grad_accum, "max_steps": schedule.max_steps,
             "warmup_steps": schedule.warmup_steps}  # as run, recorded in its checkpoints
    run = Run(settings, fingerprints, model.config, settings["rows_per_step"], {k: str(v) for k, v in flags.items()})
    checkpoint = checkpoints.checkpoint_to_resume(args.checkpoint_dir, args.deepspeed is not None, settings,
                                                  fingerprints)
    optimizer = {"lr": args.lr, "betas": (args.beta1, args.beta2), "weight_decay": args.weight_decay}
    ds_config = None if args.deepspeed is None else deepspeed_config(
        args.deepspeed, args.batch_size, schedule.grad_accum, dist.world_size, args.global_batch_tokens,
        args.grad_clip, args.dtype == "bf16", optimizer)
    if ds_config is not None:  # DeepSpeed's own fp16 mode (dynamic loss scaling) in place of the GradScaler
        ds_config.setdefault("fp16", {})["enabled"] = args.dtype == "fp16"
    compile_model = args.compile if args.compile is not None else dist.device.type == "cuda"
    engine = build_engine(model, dist, compile_model, args.dtype, optimizer, ds_config)
    if checkpoint:
        resume(engine, dist, run, checkpoint)

    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: p is a partition
    peak, device_name = device_peak_flops(dist.device, args.dtype, args.peak_flops)
    facts = {"preset": args.preset, "model_config": run.model_config, "params": n_params,
             "global_batch_tokens": run.rows_per_step * args.context_length, "batch_size": args.batch_size,
             "grad_accum": schedule.grad_accum, "world_size": dist.world_size, "mode": engine.mode,
             "device": device_name, "dtype": args.dtype}
    log = TrainLog(args.log_file, args.tensorboard_dir, dist.master)
    log(f"pretrain: preset {args.preset}, {n_params / 1e6:.2f}M params ({run.model_config}), {engine.mode} "
        f"x{dist.world_size} on {device_name}, {args.dtype}, {len(train_rows)} train rows / {len(val_rows)} val "
        f"rows of {args.context_length + 1} tokens")
    if schedule.adjusted:
        log(schedule.adjusted)
    log(schedule.description)
    if run.resumed_from:
        log(f"resumed at step {run.step} from {run.resumed_from}: lines for steps after {run.step} above this one "
            "are from the interrupted run and superseded by those below")

    batches = Batches(train_rows, args.batch_size, schedule.grad_accum, dist.rank, dist.world_size, args.seed)
    val_split = manifest["splits"]["val"]
    validate = functools.partial(evaluate, engine.train_model, engine.autocast, val_rows, args.eval_rows,
                                 args.batch_size, dist, val_split["tokens"] / max(1, val_split["bytes"]))
    mfu_per_token_per_s = flops_per_token(run.model_config, n_params) / (peak * dist.world_size) if peak else None
    train(args, dist, engine, schedule, batches, validate, run, log, mfu_per_token_per_s)

    if not run.history or "val_loss" not in run.history[-1]:  # resumed after the end: still report validation
        run.history.append({"step": run.step, **validate()})
    summary = run.summary(facts, len(train_rows) * args.context_length, mfu_per_token_per_s, time.time() - t_start)
    export(engine, dist, run, stage, tokenizer, args.tokenizer_dir, args.checkpoint_dir, summary)
    log(f"done: {run.step} steps, final train loss {summary['final_train_loss']}, val loss "
        f"{summary['final_val_loss']:.4f}, val bits/byte {summary['val_bpb']:.4f}, wrote {args.output_dir} in "
        f"{summary['wall_seconds']:.0f}s")
    log.close()


def train(args, dist, engine, schedule, batches, validate, run, log, mfu_per_token_per_s):
    """The loop: optimizer steps until the schedule's last, logging every --log-interval steps, validating every
    --eval-interval and checkpointing every --checkpoint-interval steps (and at the end). A loss that is not finite
    (mean over the ranks) stops the run before its update is applied."""
    from tqdm import tqdm

    tokens_per_step = run.rows_per_step * args.context_length
    bar = tqdm(total=schedule.max_steps, initial=run.step, desc="pretrain", disable=not dist.master,
               dynamic_ncols=True)
    while run.step < schedule.max_steps:
        t0 = time.perf_counter()
        lr = schedule.lr_at(run.step)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        loss = forward_backward(engine, batches, run.step, schedule.grad_accum, dist.device,
                                poison=run.step == args.debug_nan_step)
        loss = all_reduce_mean(loss, dist).item()
        grad_norm = update(engine, math.isfinite(loss), args.grad_clip)
        if not math.isfinite(loss):
            last = checkpoints.latest_checkpoint(args.checkpoint_dir, engine.ds is not None)
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
        if step % args.log_interval == 0 or step == schedule.max_steps or step == 1:
            entry = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / dt,
                     "mfu": tokens_per_step / dt * mfu_per_token_per_s if mfu_per_token_per_s else None,
                     "peak_mem_mb": peak_mem_mb(dist.device),
                     **({"loss_scale": engine.scaler.get_scale()} if engine.scaler is not None else {})}
            run.history.append(entry)
            mfu = f"{100 * entry['mfu']:.1f}%" if entry["mfu"] is not None else "n/a"
            log(f"step {step:6d} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                f"{entry['tokens_per_s']:,.0f} tok/s | MFU {mfu} | peak mem {entry['peak_mem_mb']:,.0f} MB")
            log.scalars("train", {k: entry[k] for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu")}, step)
            bar.set_postfix(loss=f"{loss:.3f}")
        if step % args.eval_interval == 0 or step == schedule.max_steps:
            val = {"step": step, **validate()}
            run.history.append(val)
            log(f"step {step:6d} | val loss {val['val_loss']:.4f} | val ppl {val['val_ppl']:.2f} | "
                f"val bits/byte {val['val_bpb']:.4f}")
            log.scalars("val", val, step)
        if step % args.checkpoint_interval == 0 or step == schedule.max_steps:
            save_checkpoint(engine, dist, run, args.checkpoint_dir, args.keep_checkpoints)
        if step == args.debug_kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()


if __name__ == "__main__":
    run_main(main)
