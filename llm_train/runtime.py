"""Device and compute dtype, decided here only, and the end of a multi-process run.

LLM_TRAIN_DTYPE=bf16|fp32 forces the dtype for every stage (the tests run the precision-sensitive cases under
both); auto = bf16 on CUDA (fp16 on pre-Ampere GPUs where allowed) and on CPUs with bf16 matmul units
(AMX / AVX512-BF16), else fp32: on an AVX2-only CPU bf16 matmuls are far slower than fp32."""
import contextlib
import os
from pathlib import Path

from llm_train.errors import UserError

DTYPE_ENV = "LLM_TRAIN_DTYPE"
DTYPES = ("auto", "bf16", "fp32")


def cpu_has_fast_bf16():
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def dtype_name(requested=None, allow_fp16=False):
    """'bf16' or 'fp32' (or 'fp16' with allow_fp16: asked for, or auto on GPUs without bf16) for a --dtype value;
    None or 'auto' defers to $LLM_TRAIN_DTYPE, then to the hardware."""
    if requested in (None, "auto"):
        requested = os.environ.get(DTYPE_ENV) or "auto"
    allowed = (*DTYPES, "fp16") if allow_fp16 else DTYPES
    if requested not in allowed:
        raise UserError(f"dtype {requested!r} (from --dtype or ${DTYPE_ENV}) must be one of {', '.join(allowed)}")
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


def device():
    """This process's GPU (LOCAL_RANK under a launcher) when there is one, else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def autocast(dev, dtype=None):
    """What the Trainer's mixed precision does for bf16/fp16 (autocast over fp32 weights); nothing for fp32.

    dev: a torch.device or its type ('cuda', 'cpu'); dtype: 'bf16', 'fp16', 'fp32', a torch dtype, or None for the
    run's compute dtype (compute_dtype(allow_fp16=True)). The one autocast helper of every stage."""
    import torch

    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    name = names.get(dtype, dtype) if dtype is not None else dtype_name(allow_fp16=True)
    if name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(getattr(dev, "type", dev), dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[name])


def default_scale():
    """The post-training preset for this machine: the full-size one with a GPU."""
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def end_distributed(wait=True):
    """Wait for every rank (unless wait=False: after an error, when the others may never come), then destroy the
    process group, if any (each rank, after its last collective), so no rank leaves with collective work in flight
    while rank 0 goes on alone (see run_main for how the others exit)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()

