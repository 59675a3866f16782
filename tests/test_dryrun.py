"""bench/dryrun_full_size.sh (`make dryrun`) on tiny sizes: the same command path as the full-size dry run (50k
tokenizer -> chunks at context 1024 -> gpt2-100m under DeepSpeed ZeRO-2 on 2 CPU ranks -> QLoRA SFT -> reward model
-> GRPO -> reload), with a 2,000-token vocabulary and a 2-layer model instead. ~1.5-2.5 minutes on 2 cores."""
import json
import os
import re

import pytest

from conftest import REPO, run_group

TINY = {"VOCAB": "2000", "TOKENIZER_EXTRA": "--max-chars 1e6", "CHUNK_TOKENS": "2e5",
        "PRETRAIN_EXTRA": "--n-layer 2 --n-embd 64 --n-head 2", "SFT_EXTRA": "--arith-tasks 50", "RM_EVAL_PAIRS": "4"}
STAGES = ("tokenizer", "chunks", "pretrain", "sft", "reward", "grpo", "reload")


def test_dryrun_tiny(tmp_path):
    pytest.importorskip("deepspeed")
    work, results = tmp_path / "work", tmp_path / "dryrun.md"
    proc = run_group(["bash", str(REPO / "bench" / "dryrun_full_size.sh")], cwd=tmp_path, timeout=900,
                     env={**os.environ, **TINY, "WORK": str(work), "RESULTS": str(results)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # Pretraining ran the gpt2-100m preset's path under DeepSpeed on 2 ranks, with the padded embedding, and the
    # export keeps the tokenizer's rows (what AutoModelForCausalLM and the reload stage rely on).
    summary = json.loads((work / "output" / "pretrain_summary.json").read_text())
    assert (summary["preset"], summary["mode"], summary["world_size"], summary["steps"]) == ("gpt2-100m", "deepspeed",
                                                                                            2, 3)
    assert summary["model_config"]["context_length"] == 1024 and summary["global_batch_tokens"] == 2048
    assert (summary["model_config"]["vocab_size"], summary["model_config"]["padded_vocab_size"]) == (2000, 2048)
    assert json.loads((work / "output" / "config.json").read_text())["vocab_size"] == 2000
    assert json.loads((work / "sft" / "sft_output" / "adapter_config.json").read_text())["r"] == 64  # gpu preset
    assert json.loads((work / "rlhf" / "reward_eval.json").read_text())["heldout"]["pairs"] == 4
    grpo = [json.loads(line) for line in (work / "rlhf" / "grpo_output" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in grpo if "step_time" in h] == [1]
    reload_log = (work / "logs" / "reload.log").read_text()
    assert "base + SFT adapter: '" in reload_log and "GRPO: '" in reload_log

    # The table: one row per stage with its peak RSS (a python process with torch is > 100 MB) and wall time, and a
    # step time for each training stage.
    table = results.read_text()
    assert table in proc.stdout
    for stage in STAGES:
        row = re.search(rf"^\| {stage} \| ([\d.]+) GB \| (-|[\d.]+ s) \| (\d+) s \|", table, re.M)
        assert row, (stage, table)
        assert float(row[1]) > 0.1 and int(row[3]) >= 0
        assert (row[2] != "-") == (stage in ("pretrain", "sft", "reward", "grpo")), (stage, row[2])
