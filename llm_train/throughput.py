"""Peak FLOP/s for MFU, and peak memory, of the device a training process runs on."""
import resource
from pathlib import Path

import torch

# Dense bf16 peak FLOP/s by GPU name (no sparsity).
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
                  "4090": 165e12, "3090": 71e12, "V100": 125e12}


def gpu_peak_flops(device):
    """(dense bf16 peak of the GPU, or None when its name is not known; its name)."""
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_PEAK_FLOPS.items():
        if key in name:
            return flops, name
    return None, name


def cpu_peak_flops(dtype):
    """Nominal peak of the cores torch uses: per core 0.335e12 bf16 with AMX (see docs/experiments.md#pretraining),
    else fp32 FMA: 64 FLOP/cycle with AVX-512, 32 with AVX2, at ~3 GHz. The vector width is the one torch's kernels
    use, so ATEN_CPU_CAPABILITY=avx2 (emulating an AVX2-only CPU) counts AVX2's peak."""
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    if dtype == "bf16" and "amx_bf16" in flags:
        per_core = 0.335e12
    else:
        per_core = (64 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 32) * 3e9
    return torch.get_num_threads() * per_core


def device_peak_flops(device, dtype, cpu_peak=None):
    """(peak FLOP/s of one process on device for MFU, or None for an unknown GPU; the device in words). On CPU:
    cpu_peak if given, else cpu_peak_flops(dtype)."""
    if device.type == "cuda":
        return gpu_peak_flops(device)
    peak = cpu_peak or cpu_peak_flops(dtype)
    return peak, f"cpu ({torch.get_num_threads()} threads, {dtype} peak {peak / 1e9:.0f} GFLOP/s)"


def peak_mem_mb(device):
    """Peak memory of this process so far: allocated on the GPU, resident on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def largest_fitting_batch(model, autocast, rows_per_rank, context_length, dist, margin=0.9):
    """--batch-size auto on CUDA: the largest micro batch dividing rows_per_rank (rows_per_rank first, then the
    largest divisor of at most half the last tried: powers of two for a power of two) whose forward and backward
    on random tokens fit in margin of the GPU's memory with AdamW's states and DDP's buckets (12 bytes a parameter)
    reserved; a torch.cuda.OutOfMemoryError halves it. The ranks take the smallest of their answers."""
    device = dist.device
    total = torch.cuda.get_device_properties(device).total_memory
    reserve = 12 * sum(p.numel() for p in model.parameters())
    vocab = model.config["vocab_size"]
    rows = rows_per_rank
    while True:
        fits = False
        try:
            torch.cuda.reset_peak_memory_stats(device)
            x = torch.randint(0, vocab, (rows, context_length + 1), device=device)
            with autocast:
                loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            fits = torch.cuda.max_memory_allocated(device) + reserve <= margin * total
        except torch.cuda.OutOfMemoryError:
            pass
        x = loss = None
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        if fits or rows == 1:
            break
        rows = max(d for d in range(1, rows // 2 + 1) if rows_per_rank % d == 0)
    if dist.world_size > 1:
        agreed = torch.tensor(rows, device=device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
        rows = int(agreed)
    return rows
