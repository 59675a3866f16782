"""The summary of bench/gpu_check.sh: gpu_check.md + gpu_check.json + logs.tar.gz in RESULTS, from what the stages left
in WORK (logs/*.stage, logs/*.skipped, the runs' pretrain_summary.json and history.jsonl, the stage outputs of the
`make all` copy in WORK/repo). Written also after a failed or timed-out stage: a missing file is left out.

    python bench/gpu_check_summary.py WORK RESULTS NGPU
"""
import argparse
import functools
import json
import math
import statistics
import tarfile
from pathlib import Path

from llm_train import stage_files

# A stage that failed or ran out of time leaves a file missing or cut short: None / [] for it.
read_json = functools.partial(stage_files.read_json, lenient=True)
jsonl = functools.partial(stage_files.read_jsonl, lenient=True)


def text(path, default):
    return Path(path).read_text().strip() if Path(path).is_file() else default


def last_json_line(path):
    lines = [line for line in text(path, "").splitlines() if line.startswith("{")]
    try:
        return json.loads(lines[-1]) if lines else None
    except ValueError:
        return None


def pretrain_stats(out_dir):
    s = read_json(out_dir / "pretrain_summary.json")
    if not s:
        return None
    hist = [h for h in jsonl(out_dir / "history.jsonl") if "tokens_per_s" in h]
    steady = [h for h in hist if h["step"] > min(50, s["steps"] // 2)] or hist  # after compile and warm-up
    return {"device": s["device"], "params_m": round(s["params"] / 1e6, 1), "steps": s["steps"],
            "global_batch_tokens": s["global_batch_tokens"], "world_size": s["world_size"],
            "tokens_per_s": statistics.median(h["tokens_per_s"] for h in steady) if steady else None,
            "mfu": statistics.median(h["mfu"] for h in steady) if steady and steady[0].get("mfu") else None,
            "peak_mem_mb_rank0": max((h["peak_mem_mb"] for h in hist), default=None),
            "final_train_loss": s["final_train_loss"], "val_loss": s["final_val_loss"],
            "wall_s": s["wall_seconds"], "dtype": s["dtype"]}


def losses(out_dir):
    return {h["step"]: h["loss"] for h in jsonl(out_dir / "history.jsonl") if "loss" in h}


def resume_check(work, stages):
    """The killed-and-resumed run against the uninterrupted one: max abs difference of the exported weights and of
    the per-step losses."""
    full, resumed = work / "resume_full", work / "resume_killed"
    rerun_log = text(work / "logs" / "resume_rerun.log", "").splitlines()
    out = {"killed_exit": stages.get("resume_killed", {}).get("exit"),
           "resumed_from": next((line.split(":")[0].strip() for line in rerun_log if "resumed at step" in line), None)}
    a, b = losses(full), losses(resumed)
    common = sorted(set(a) & set(b))
    if common:
        out["steps_compared"] = len(common)
        out["loss_max_abs_diff"] = max(abs(a[k] - b[k]) for k in common)
    try:
        from safetensors.torch import load_file
        wa, wb = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    except Exception as e:  # noqa: BLE001 - a run that did not export: reported, not raised
        out["weights"] = f"not compared: {type(e).__name__}: {e}"[:300]
        return out
    if set(wa) != set(wb):
        out["weights"] = "not compared: the tensor names differ"
        return out
    diff = max(((wa[k].float() - wb[k].float()).abs().max().item() for k in wa), default=0.0)
    out["weights_max_abs_diff"] = diff
    out["bit_exact"] = diff == 0.0 and out.get("loss_max_abs_diff", 0.0) == 0.0
    return out


def fp16_check(out_dir):
    s = read_json(out_dir / "pretrain_summary.json")
    hist = [h["loss"] for h in jsonl(out_dir / "history.jsonl") if "loss" in h]
    if not s or not hist:
        return None
    k = max(1, min(5, len(hist) // 3))
    first, last = statistics.mean(hist[:k]), statistics.mean(hist[-k:])
    return {"dtype": s["dtype"], "device": s["device"], "steps": len(hist), "first_losses_mean": first,
            "last_losses_mean": last, "finite": all(math.isfinite(x) for x in hist), "falling": last < first}


def make_all(repo):
    report = repo / "report" / "report.md"
    out = {"report_md": report.is_file(), "report_lines": len(text(report, "").splitlines()),
           "timings": {p.stem: timing.get("seconds") for p in sorted((repo / "report" / "timings").glob("*.json"))
                       if (timing := read_json(p))}}
    ev = read_json(repo / "Eval" / "results.json")
    if ev:
        out["eval_models"] = sorted(ev.get("models", ev)) if isinstance(ev.get("models", ev), dict) else None
    return out


def main():
    ap = argparse.ArgumentParser(description="Write the summary of bench/gpu_check.sh from what its stages left.")
    ap.add_argument("work", type=Path, help="gpu_check.sh's WORK directory")
    ap.add_argument("results", type=Path, help="where gpu_check.md, gpu_check.json and logs.tar.gz go")
    ap.add_argument("ngpu", type=int, help="the number of GPUs (or CPU processes) the check ran on")
    args = ap.parse_args()
    work, results, ngpu = args.work, args.results, args.ngpu
    logs, repo = work / "logs", work / "repo"
    stages = {}
    for f in sorted(logs.glob("*.stage"), key=lambda f: f.stat().st_mtime):  # in the order they ran
        name, rc, wall, gpu_mb = f.read_text().split()
        stages[name] = {"exit": int(rc), "wall_s": float(wall),
                        "gpu_mem_peak_mb": float(gpu_mb) if gpu_mb != "-" else None}
    skipped = {f.stem: f.read_text().strip() for f in sorted(logs.glob("*.skipped"))}
    out = {"gpus": text(logs / "gpus.txt", "cpu"), "versions": text(logs / "versions.txt", "?"), "ngpu": ngpu,
           "stages": stages, "skipped": skipped}
    for key, out_dir in (("pretrain", "output"), ("pretrain_ddp", "output_ddp"), ("cap16", "cap16")):
        if stats := pretrain_stats(work / out_dir):
            out[key] = stats
    if reference := last_json_line(logs / "reference.log"):
        out["reference_tokens_per_s"] = reference["tokens_per_s"]
        for key in ("pretrain", "pretrain_ddp"):  # per GPU: the reference runs on one
            if out.get(key, {}).get("tokens_per_s"):
                out[key]["over_reference"] = round(out[key]["tokens_per_s"] / out[key]["world_size"]
                                                   / reference["tokens_per_s"], 3)
    if out.get("pretrain", {}).get("tokens_per_s") and out.get("pretrain_ddp", {}).get("tokens_per_s"):
        out["deepspeed_over_torchrun"] = round(out["pretrain"]["tokens_per_s"] / out["pretrain_ddp"]["tokens_per_s"], 3)
    if "resume_full" in stages or "resume_rerun" in stages:
        out["resume"] = resume_check(work, stages)
    if fp16 := fp16_check(work / "fp16"):
        out["fp16"] = fp16
    if inference := last_json_line(logs / "inference.log"):
        out["inference"] = inference
    sft_eval, rm = read_json(repo / "SFT" / "eval.json"), read_json(repo / "RLHF" / "reward_eval.json")
    grpo_eval = read_json(repo / "RLHF" / "eval.json")
    grpo_steps = [h["step_time"] for h in jsonl(repo / "RLHF" / "grpo_output" / "history.jsonl") if "step_time" in h]
    if sft_eval:
        out["sft"] = sft_eval
    if rm:
        out["reward"] = {k: rm.get(k) for k in ("steps", "train_seconds", "train_loss")} | \
                        {"accuracy": rm.get("heldout", {}).get("accuracy")}
    if grpo_steps:
        out["grpo"] = {"steps": len(grpo_steps), "median_step_time_s": statistics.median(grpo_steps)}
    if grpo_eval:
        out.setdefault("grpo", {})["eval"] = {k: grpo_eval.get(k) for k in ("sft", "grpo")}
    out["make_all"] = make_all(repo) | {"make_missing": (logs / "no_make.txt").is_file()}
    (results / "gpu_check.json").write_text(json.dumps(out, indent=1, default=str))

    lines = [f"# GPU check: {out['gpus']}", "", out["versions"], ""]
    for key, how in (("pretrain", "DeepSpeed ZeRO-2"), ("pretrain_ddp", "torchrun (DDP when several GPUs)")):
        if p := out.get(key):
            mfu = f"{100 * p['mfu']:.1f}%" if p["mfu"] else "n/a"
            ratio = f", {p['over_reference']:.2f}x the reference per GPU" if "over_reference" in p else ""
            accum = p["global_batch_tokens"] // (p["world_size"] * 1024)
            lines += [f"gpt2-100m ({p['params_m']}M params) {how} x{p['world_size']} {p['dtype']} on {p['device']}: "
                      f"{p['tokens_per_s']:,.0f} tokens/s{ratio}, MFU {mfu} of the dense bf16 peak, peak memory "
                      f"{p['peak_mem_mb_rank0']:,.0f} MB allocated (rank 0), {p['steps']} steps of "
                      f"{p['global_batch_tokens']:,} tokens (~{accum} rows of 1024 per rank), final train loss "
                      f"{p['final_train_loss']:.3f}, val loss {p['val_loss']:.3f}", ""]
    if "deepspeed_over_torchrun" in out:
        lines += [f"DeepSpeed / torchrun tokens/s: {out['deepspeed_over_torchrun']:.2f}", ""]
    if "reference_tokens_per_s" in out:
        lines += [f"the shared reference step (plain eager PyTorch, bf16 autocast, one GPU, the same micro batch): "
                  f"{out['reference_tokens_per_s']:,.0f} tokens/s", ""]
    if r := out.get("resume"):
        if "weights_max_abs_diff" in r:
            verdict = ("bit-exact" if r["bit_exact"] else
                       f"weights max abs diff {r['weights_max_abs_diff']:.3g}, losses max abs diff "
                       f"{r.get('loss_max_abs_diff', float('nan')):.3g}")
        else:
            verdict = r.get("weights", "not compared")
        lines += [f"kill and resume (SIGKILL exit {r['killed_exit']}; {r['resumed_from'] or 'no resume line'}): "
                  f"resumed vs uninterrupted: {verdict} over {r.get('steps_compared', 0)} logged steps", ""]
    if "cap16" in skipped:
        lines += [f"16 GiB cap: {skipped['cap16']}", ""]
    elif "cap16" in stages:
        c, st = out.get("cap16"), stages["cap16"]
        ok = "pass" if st["exit"] == 0 and c else f"FAIL (exit {st['exit']})"
        mem = (f", peak {c['peak_mem_mb_rank0']:,.0f} MB allocated, {c['tokens_per_s']:,.0f} tokens/s"
               if c and c["peak_mem_mb_rank0"] else "")
        lines += [f"16 GiB cap (set_per_process_memory_fraction), gpt2-100m micro batch 16 x 1024: {ok}{mem}", ""]
    if f := out.get("fp16"):
        lines += [f"fp16 + GradScaler on {f['device']} ({f['dtype']}), {f['steps']} steps: loss "
                  f"{f['first_losses_mean']:.3f} -> {f['last_losses_mean']:.3f} (means of the first / last steps): "
                  f"{'finite' if f['finite'] else 'NOT FINITE'}, {'falling' if f['falling'] else 'NOT FALLING'}", ""]
    elif "fp16" in skipped:
        lines += [f"fp16: {skipped['fp16']}", ""]
    if i := out.get("inference"):
        lines += [f"inference, merged SFT model ({i['params_m']}M params, {i['dtype']}, {i['device']}), batch 1, "
                  f"greedy: "
                  f"{i['new_tokens']} new tokens in {i['seconds']} s = {i['tokens_per_s']:,.1f} tokens/s", ""]
    m = out["make_all"]
    if no_make := text(logs / "no_make.txt", ""):
        lines += [no_make, ""]
    if "make_all" in stages:
        lines += [f"make all SCALE=gpu (short budgets, in {repo}): exit {stages['make_all']['exit']}, report.md "
                  f"{'written' if m['report_md'] else 'MISSING'} ({m['report_lines']} lines); stage times "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in m["timings"].items()), ""]
    lines += ["| stage | exit | wall | peak GPU memory (nvidia-smi, max over GPUs) |", "| --- | --- | --- | --- |"]
    for name, st in stages.items():
        mem = f"{st['gpu_mem_peak_mb']:,.0f} MB" if st["gpu_mem_peak_mb"] is not None else "-"
        lines.append(f"| {name} | {st['exit']} | {st['wall_s']:.0f} s | {mem} |")
    for name, why in skipped.items():
        lines.append(f"| {name} | - | - | {why} |")
    if "grpo" in out and "median_step_time_s" in out["grpo"]:
        lines += ["", f"GRPO: {out['grpo']['steps']} steps, median step {out['grpo']['median_step_time_s']:.2f} s"]
    if rm and out["reward"]["accuracy"] is not None:
        lines += [f"reward model: {rm.get('steps')} steps in {rm.get('train_seconds')} s, held-out accuracy "
                  f"{out['reward']['accuracy']:.3f}"]
    (results / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    with tarfile.open(results / "logs.tar.gz", "w:gz") as tar:  # every stage's log, for a failure's details
        for f in [*logs.glob("*"), work / "pretrain_train.log", work / "pretrain_ddp_train.log",
                  repo / "SFT" / "train.log", repo / "RLHF" / "train.log", repo / "SFT" / "eval.json",
                  repo / "RLHF" / "eval.json", repo / "report" / "report.md", repo / "Eval" / "results.json"]:
            if f.is_file():
                tar.add(f, arcname=str(f.relative_to(work)))
    print(f"summary in {results}/gpu_check.md, gpu_check.json, logs.tar.gz")


if __name__ == "__main__":
    main()
