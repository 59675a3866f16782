"""Load check of the web UI: N gradio_client sessions chat with the app at the same time for a bounded time.

Reads:  the stage outputs of a finished run (default: this repo's output/, SFT/sft_output/, RLHF/...; --root DIR for
        another copy of the repo after `make all`). Writes: bench/results/bench_webui.json

    .venv/bin/python bench/bench_webui.py                        # 4 clients for 60 s against the SFT model
    .venv/bin/python bench/bench_webui.py --clients 8 --seconds 120 --model GRPO

It starts WebUI/app.py on a free port (as `make chat` does: models loaded once, gradio's queue with
--concurrency requests generating at a time), then each client sends chat turns one after another (arithmetic
problems and small talk, the UI's default sampling) until the time is up. Reported: completed requests per second,
tokens per second over all clients, time to the first streamed token (p50 / p95, from sending the request to the
first update that carries reply text, as a browser would show it), whole-reply latency, and the app process's
resident memory after loading and at its peak (VmHWM). Any failed request fails the check (exit status 1).
"""
import argparse
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from llm_train.arithmetic import arithmetic_tasks
from llm_train.atomic import atomic_write_json
from llm_train.cli import positive_float, positive_int
from llm_train.errors import UserError, run_main

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "bench" / "results" / "bench_webui.json"
PROMPTS = [t["prompt"] for t in arithmetic_tasks(20, "heldout", seed=3)] + [
    "Hello, how are you?", "What is your favourite book?", "Tell me about the weather.", "你好", "What can you do?"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_mb(pid):
    """(resident, peak resident) memory of a process in MB, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    return tuple(int(re.search(rf"{key}:\s+(\d+) kB", status)[1]) / 1024 for key in ("VmRSS", "VmHWM"))


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))] if values else None


def start_app(root, port, concurrency, log):
    args = [sys.executable, str(REPO / "WebUI" / "app.py"), "--port", str(port), "--concurrency", str(concurrency),
            "--base-dir", root / "output", "--sft-dir", root / "SFT" / "sft_output",
            "--grpo-dir", root / "RLHF" / "grpo_output", "--reward-model", root / "RLHF" / "reward_model",
            "--tokenizer-dir", root / "tokenizer", "--report-dir", root / "report"]
    proc = subprocess.Popen(list(map(str, args)), stdout=log, stderr=subprocess.STDOUT)
    url, start = f"http://127.0.0.1:{port}", time.perf_counter()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.perf_counter() - start < 300:
        if proc.poll() is not None:
            sys.exit(f"the app exited with status {proc.returncode}; see {log.name}")
        try:
            if opener.open(url, timeout=5).status == 200:
                return proc, url, time.perf_counter() - start
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit(f"the app did not start in 300 s; see {log.name}")


def client_loop(client, model, max_new_tokens, deadline, seed, records, errors):
    """Chat turns (each a fresh conversation) until the deadline; one record per finished request."""
    rng = random.Random(seed)
    while time.perf_counter() < deadline:
        sent = time.perf_counter()
        first = None
        try:
            for history, _, note in client.submit(rng.choice(PROMPTS), [], model, 0.7, 50, 0.95, max_new_tokens,
                                                  api_name="/chat"):
                if first is None and history and history[-1]["role"] == "assistant":
                    first = time.perf_counter() - sent
            tokens = int(re.search(r"(\d+) tokens in", note)[1])
            records.append({"ttft_s": first, "latency_s": time.perf_counter() - sent, "tokens": tokens,
                            "finished_at": time.perf_counter()})
        except Exception as e:
            errors.append(repr(e))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=REPO, help="repo copy whose stage outputs to serve")
    ap.add_argument("--clients", type=positive_int, default=4)
    ap.add_argument("--seconds", type=positive_float, default=60.0)
    ap.add_argument("--model", choices=["SFT", "GRPO"], default="SFT")
    ap.add_argument("--max-new-tokens", type=positive_int, default=64)
    ap.add_argument("--concurrency", type=positive_int, default=4, help="the app's --concurrency")
    a = ap.parse_args()
    from gradio_client import Client

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS.with_suffix(".app.log"), "w") as log:
        proc, url, startup = start_app(a.root.resolve(), free_port(), a.concurrency, log)
    try:
        idle_rss, _ = memory_mb(proc.pid)
        print(f"app up in {startup:.1f} s at {url}, {idle_rss:.0f} MB resident", flush=True)
        clients = [Client(url, verbose=False) for _ in range(a.clients)]
        *_, (_, _, note) = clients[0].submit("Hello", [], a.model, 0.7, 50, 0.95, 8, api_name="/chat")
        if "not available" in note:  # e.g. no SFT model yet: the app says which command makes it
            raise UserError(f"{note.replace('**', '')} (in {a.root}: run `make all` there, or pass --root)")
        records, errors = [], []
        load_before = os.getloadavg()  # other processes on the same cores slow every number here
        start = time.perf_counter()
        deadline = start + a.seconds
        threads = [threading.Thread(target=client_loop,
                                    args=(c, a.model, a.max_new_tokens, deadline, i, records, errors))
                   for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start  # requests in flight at the deadline finish: counted over the whole time
        rss, peak = memory_mb(proc.pid)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)
    ttft = [r["ttft_s"] for r in records if r["ttft_s"] is not None]
    latency = [r["latency_s"] for r in records]
    result = {
        "machine": {"cpu_count": os.cpu_count(), "load_before": load_before},
        "root": str(a.root), "model": a.model, "clients": a.clients, "seconds": a.seconds,
        "max_new_tokens": a.max_new_tokens, "app_concurrency": a.concurrency, "app_startup_s": startup,
        "requests": len(records), "failed_requests": len(errors), "errors": errors[:10],
        "requests_per_s": len(records) / wall, "tokens_per_s": sum(r["tokens"] for r in records) / wall,
        "replies_without_text": len(records) - len(ttft),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
        "latency_p50_s": percentile(latency, 50), "latency_p95_s": percentile(latency, 95),
        "rss_after_load_mb": idle_rss, "rss_end_mb": rss, "rss_peak_mb": peak, "app_alive_at_end": alive,
    }
    atomic_write_json(RESULTS, result)
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"
    print(f"{a.clients} clients x {a.seconds:.0f} s, {a.model}: {len(records)} requests "
          f"({result['requests_per_s']:.2f}/s, "
          f"{result['tokens_per_s']:.0f} tokens/s), {len(errors)} failed; time to first token p50 "
          f"{fmt(result['ttft_p50_s'])} s, p95 {fmt(result['ttft_p95_s'])} s; latency p50 "
          f"{fmt(result['latency_p50_s'])} s, p95 {fmt(result['latency_p95_s'])} s; memory {idle_rss:.0f} MB after "
          f"load, peak {peak:.0f} MB; wrote {RESULTS}")
    if errors or not alive or not records:
        print(f"error: {len(errors)} failed requests (first: {errors[:1]}), app alive: {alive}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
