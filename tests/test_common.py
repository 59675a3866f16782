"""llm_train: atomic directories, lineage fingerprints and the dtype switch; every script's --help."""
import json
import subprocess
import sys

from llm_train import paths
from llm_train.atomic import atomic_dir
from llm_train.errors import UserError
from llm_train.lineage import already_done, check_lineage, recorded_parents, write_lineage
from llm_train.paths import REPO
from llm_train.runtime import DTYPE_ENV, compute_dtype, cpu_has_fast_bf16, dtype_name

import pytest


def test_atomic_dir_replaces_whole_and_clears_a_killed_saves_leftovers(tmp_path):
    out = tmp_path / "output"
    left = tmp_path / ".output.tmpdeadbeef"  # what a save killed before its rename leaves behind
    left.mkdir()
    (left / "model.safetensors").write_text("half")
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (out / "a.txt").read_text() == "1" and not left.exists()
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("2")
        raise RuntimeError("killed")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]  # the old output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output"]  # and no temporary directory is left


def test_lineage_detects_a_replaced_parent(tmp_path):
    parent, child = tmp_path / "base", tmp_path / "adapter"
    parent.mkdir()
    child.mkdir()
    (parent / "model.safetensors").write_bytes(b"weights v1")
    write_lineage(child, "sft", {"lr": 1}, base=parent)
    check_lineage(child, "python SFT/qlora_fine_tune_trl.py", base=parent)  # belongs together: no error
    assert already_done(child, "sft", {"lr": 1}, base=parent)
    assert not already_done(child, "sft", {"lr": 2}, base=parent)
    (parent / "model.safetensors").write_bytes(b"weights v2")
    with pytest.raises(UserError, match=rf"{child} was built from a different base than the one in {parent}"):
        check_lineage(child, "python SFT/qlora_fine_tune_trl.py", base=parent)
    assert not already_done(child, "sft", {"lr": 1}, base=parent)
    assert json.loads((child / "lineage.json").read_text())["settings"] == {"lr": 1}


def test_lineage_of_a_moved_checkout_names_its_own_parents(tmp_path, monkeypatch):
    """Parents inside the repo are recorded relative to it: a copied checkout checks against its own outputs."""
    repo, outside = tmp_path / "repo", tmp_path / "elsewhere"
    for d in (repo / "output", repo / "SFT" / "sft_output", outside):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"weights of " + d.name.encode())
    monkeypatch.setattr(paths, "REPO", repo)
    write_lineage(repo / "SFT" / "sft_output", "sft", {}, base=repo / "output", data=outside)
    recorded = json.loads((repo / "SFT" / "sft_output" / "lineage.json").read_text())["parents"]
    assert {role: r["path"] for role, r in recorded.items()} == {"base": "output", "data": str(outside)}
    moved = tmp_path / "moved"
    repo.rename(moved)
    monkeypatch.setattr(paths, "REPO", moved)
    child = moved / "SFT" / "sft_output"
    assert recorded_parents(child) == {"base": str(moved / "output"), "data": str(outside)}
    (moved / "output" / "model.safetensors").write_bytes(b"another base")
    with pytest.raises(UserError, match="built from a different base"):
        check_lineage(child, "rerun", **recorded_parents(child))


def test_dtype_switch(monkeypatch):
    monkeypatch.setenv(DTYPE_ENV, "bf16")
    assert dtype_name() == "bf16" and dtype_name("auto") == "bf16"
    assert dtype_name("fp32") == "fp32"  # an explicit --dtype wins over the environment
    monkeypatch.setenv(DTYPE_ENV, "fp32")
    assert str(compute_dtype()) == "torch.float32"
    monkeypatch.setenv(DTYPE_ENV, "fp16x")
    with pytest.raises(UserError, match="LLM_TRAIN_DTYPE"):
        dtype_name()
    monkeypatch.delenv(DTYPE_ENV)
    import torch

    assert dtype_name() == ("bf16" if torch.cuda.is_available() or cpu_has_fast_bf16() else "fp32")


SCRIPTS = sorted(str(p.relative_to(REPO)) for d in REPO.iterdir()  # the stage folders, not .venv/
                 if d.is_dir() and not d.name.startswith(".") and d.name != "tests" for p in d.rglob("*.py")
                 if 'if __name__ == "__main__"' in p.read_text(encoding="utf-8"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_help_that_does_nothing_else(script):
    """--help prints the usage and exits 0 before any work (a data builder once downloaded and rewrote its output)."""
    proc = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), (proc.stdout[-500:], proc.stderr[-2000:])
    assert "Looking in indexes" not in proc.stdout + proc.stderr  # no pip download ran


def test_stage_protocol_noop_refuse_writable_and_output_with_lineage(tmp_path, capsys, monkeypatch):
    """Stage: an output written through it is a no-op rerun with the same settings (not with other settings or with
    its done_file missing), a file where a directory must be written is one UserError, and --force is needed to
    replace an output that a later stage was built from."""
    from llm_train.lineage import read_lineage
    from llm_train.stage import Stage

    parent = tmp_path / "base"
    parent.mkdir()
    (parent / "model.safetensors").write_bytes(b"weights")
    out = tmp_path / "out"
    stage = Stage("sft", "SFT model", out, {"lr": 1.0}, parents={"base": parent, "none": None})
    assert not stage.done()
    stage.prepare(writable=[tmp_path / "ckpt"])
    assert (tmp_path / "ckpt").is_dir()
    with stage.output() as tmp:
        (tmp / "adapter.safetensors").write_bytes(b"adapter")
    lineage = read_lineage(out)
    assert lineage["stage"] == "sft" and lineage["settings"] == {"lr": 1.0} and set(lineage["parents"]) == {"base"}
    assert stage.done() and "nothing to do" in capsys.readouterr().out
    assert not Stage("sft", "SFT model", out, {"lr": 2.0}, parents={"base": parent}).done()
    assert not Stage("sft", "SFT model", out, {"lr": 1.0}, parents={"base": parent}, done_file=out / "eval.json").done()
    assert not Stage("sft", "SFT model", out, {"lr": 1.0}, force=True, parents={"base": parent}).done()

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="a_file"):
        stage.prepare(writable=[tmp_path / "a_file" / "checkpoints"])
    # a later stage built on out: replacing out needs --force
    later = Stage("grpo", "GRPO model", tmp_path / "later", {}, parents={"policy": out})
    with later.output() as tmp:
        (tmp / "model.safetensors").write_bytes(b"grpo")
    monkeypatch.setattr(paths, "GRPO_OUTPUT_DIR", tmp_path / "later")  # one of the outputs refuse_to_replace knows
    with pytest.raises(UserError, match="--force"):
        stage.prepare()
    Stage("sft", "SFT model", out, {"lr": 1.0}, force=True, parents={"base": parent}).prepare()


def test_stale_extension_build_locks_are_removed_and_live_ones_kept(tmp_path, monkeypatch, capsys):
    """A build lock left by a run killed while compiling a DeepSpeed CPU op would hang every later run: one older
    than any build goes, one a build holds now stays."""
    import os
    import time

    from llm_train.distributed import STALE_LOCK_SECONDS, remove_stale_extension_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, live = tmp_path / "py311_cpu" / "cpu_adam" / "lock", tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir(parents=True)
        lock.touch()
    past = time.time() - STALE_LOCK_SECONDS - 60
    os.utime(stale, (past, past))
    remove_stale_extension_build_locks()
    assert not stale.exists() and live.exists()
    assert str(stale) in capsys.readouterr().err
