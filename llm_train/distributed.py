"""A training script's processes: rank, world size and device from the launcher's environment (torchrun,
torch.distributed.launch, the deepspeed launcher), the process group, and the DeepSpeed config filled from flags.

Under several nodes each node's first process has LOCAL_RANK 0 too: the local rank picks the GPU, only the global
rank decides who writes (Dist.master)."""
import contextlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from llm_train.errors import UserError

import torch


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


def setup_distributed(local_rank_flag=-1, ds_config=None):
    """This process's Dist, and the process group when launched as several (RANK set) or under DeepSpeed: gloo on
    CPU, nccl on CUDA, DeepSpeed's own choice. local_rank_flag: --local_rank of launchers that pass it; ds_config:
    the --deepspeed config path (checked to exist)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", max(local_rank_flag, 0)))
    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (those outside bf16 autocast) in TF32
        torch.backends.cudnn.allow_tf32 = True
    else:  # DeepSpeed (imported by transformers too) would warn that it found no GPU: the script knows
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not use_cuda and world_size > 1 and "OMP_NUM_THREADS" not in os.environ:  # share the cores between local ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    dist = Dist(rank, local_rank, world_size, "RANK" in os.environ or ds_config is not None, device)
    if ds_config is not None:
        if not ds_config.is_file():
            raise UserError(f"DeepSpeed config {ds_config} not found (PreTrain/ ships ds_config.json: ZeRO-2, "
                            "ds_config_zero3.json: ZeRO-3, ds_config_offload.json: ZeRO-2 with CPU offload)")
        remove_stale_extension_build_locks()
        with quiet_stdout():
            import deepspeed

            deepspeed.init_distributed()
        dist.rank, dist.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if not use_cuda:
            unlink_deepspeed_shm(dist.rank)
    elif dist.distributed:
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return dist


# DeepSpeed's CPU ops (shm all-reduce, CPU Adam) compile in about a minute on 2 cores: an older lock is a leftover.
STALE_LOCK_SECONDS = 600


def remove_stale_extension_build_locks():
    """Every load of a DeepSpeed CPU op takes torch's build lock, ~/.cache/torch_extensions/<py>/<op>/lock, and waits
    for it forever: a run killed while compiling leaves it behind and every later run hangs at start-up. Remove locks
    older than any build takes."""
    from torch.utils.cpp_extension import get_default_build_root

    for lock in Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()).glob("**/lock"):
        with contextlib.suppress(FileNotFoundError):  # another rank removed it first
            if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
                lock.unlink()
                print(f"removed {lock}: a stale build lock (left by a run killed while compiling)", file=sys.stderr)


def unlink_deepspeed_shm(rank):
    """DeepSpeed never unlinks its CPU all-reduce buffers (one 69 MB /dev/shm file per rank, RAM until a reboot).
    Once every rank has mapped every buffer, which init_distributed waits for, the names can go: the mappings stay
    valid and the memory is freed when the ranks exit, even killed. The name is the one DeepSpeed's shm.cpp builds."""
    torch.distributed.barrier()
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    (Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}").unlink(missing_ok=True)


def all_reduce_mean(t, dist):
    """The mean of tensor t over the ranks (t itself with one rank)."""
    if dist.world_size > 1:
        torch.distributed.all_reduce(t)
        t = t / dist.world_size
    return t


def deepspeed_config(path, batch_size, grad_accum, world_size, global_batch_tokens, grad_clip, bf16, optimizer):
    """The DeepSpeed config file at path with its "auto" values filled from the flags: the batch keys, gradient
    clipping, bf16 and the optimizer's (optimizer: {lr, betas, weight_decay}). A batch size there that contradicts
    the flags is one UserError: the flags are the one source of truth for the batch."""
    config = json.loads(Path(path).read_text())
    config.pop("_comment", None)
    auto = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": grad_accum,
            "train_batch_size": batch_size * grad_accum * world_size, "gradient_clipping": grad_clip}
    for key, value in auto.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif key != "gradient_clipping" and config[key] != value:
            raise UserError(f"{path}: {key} is {config[key]}, but --global-batch-tokens {global_batch_tokens} and "
                            f"--batch-size {batch_size} on {world_size} ranks make it {value}: set it to \"auto\" "
                            "and choose the batch with those flags")
    opt_params = config.get("optimizer", {}).get("params", {})
    for key, value in optimizer.items():
        if opt_params.get(key) == "auto":
            opt_params[key] = list(value) if isinstance(value, tuple) else value
    config.setdefault("bf16", {})["enabled"] = bf16  # the one dtype switch decides
    return config
