"""`make all SCALE=smoke` runs every stage end to end in a copy of the repo, the report card's numbers are the ones
the stages wrote, and a second `make all` skips every stage."""
import json
import shutil
import subprocess

from llm_train.tokenizer import tokenizer_fingerprint

from conftest import checkout_env


def read(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_stage_ran_and_was_timed(smoke_repo):
    root, log = smoke_repo
    stages = ["tokenizer", "chunks", "pretrain", "sft", "reward_model", "grpo", "eval", "report"]
    for stage in stages:
        assert f"== stage {stage} took" in log
        assert read(root / "report" / "timings" / f"{stage}.json")["seconds"] > 0
    for made in ["tokenizer/tokenizer.json", "pretrain_data_chunks/manifest.json", "output/model.safetensors",
                 "SFT/sft_output/adapter_model.safetensors", "SFT/sft_output/merged/config.json",
                 "RLHF/reward_model/config.json", "RLHF/grpo_output/config.json", "Eval/results.json",
                 "report/report.md"]:
        assert (root / made).is_file(), made


def test_report_numbers_come_from_the_stage_outputs(smoke_repo):
    root, _ = smoke_repo
    metrics = read(root / "report" / "metrics.json")
    assert metrics["tokenizer"] == read(root / "tokenizer" / "report.json")
    assert metrics["pretrain"] == read(root / "output" / "pretrain_summary.json")
    assert metrics["sft"] == read(root / "SFT" / "eval.json")
    assert metrics["reward_model"] == read(root / "RLHF" / "reward_eval.json")
    assert metrics["grpo"] == read(root / "RLHF" / "eval.json")
    assert metrics["eval"] == read(root / "Eval" / "results.json")
    report = (root / "report" / "report.md").read_text(encoding="utf-8")
    val_bpb = metrics["pretrain"]["val_bpb"]
    assert f"{val_bpb:.3f}" in report
    bpb = {m: r["results"]["llm_train_bpb_en"]["bits_per_byte"]["value"] for m, r in metrics["eval"]["models"].items()}
    assert set(bpb) == {"base", "sft", "grpo"}
    assert "| llm_train_bpb_en | bits_per_byte | " + " | ".join(f"{v:.3f}" for v in bpb.values()) + " |" in report
    for png in metrics["plots"].values():
        assert png and (root / "report" / png).read_bytes()[:4] == b"\x89PNG" and f"({png})" in report
    assert set(metrics["samples"]) == {"pretrained", "pretrained, chat template", "sft", "grpo"}


def test_second_run_skips_every_stage(smoke_repo):
    root, _ = smoke_repo
    proc = subprocess.run(["make", "all", "SCALE=smoke"], cwd=root, env=checkout_env(root), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "== stage" not in proc.stdout, proc.stdout


def test_replacing_an_upstream_output_is_refused_or_detected(smoke_repo, tmp_path):
    """After `make all`: the README's tokenizer command would replace tokenizer/ under everything built on it, so it
    stops and names what would go stale; a base model replaced with --force makes the SFT adapter's loaders stop."""
    # on a copy: other tests (web UI, eval) share the session's smoke run
    root = tmp_path / "llm_train"
    shutil.copytree(smoke_repo[0], root, symlinks=True)
    py = str(root / ".venv" / "bin" / "python")
    before = (root / "tokenizer" / "tokenizer.json").read_bytes()
    proc = subprocess.run([py, "train_byte_level_bpe_tokenizer.py"], cwd=root / "PreTrain",
                          env=checkout_env(root), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--force" in proc.stderr, proc.stderr
    # names what would go stale, or (another tokenizer's settings) refuses to replace the one that is there
    assert ("pretrain_data_chunks" in proc.stderr and "output" in proc.stderr) or "already holds" in proc.stderr
    assert (root / "tokenizer" / "tokenizer.json").read_bytes() == before

    # a new base over the one SFT was trained on: needs --force, and then the adapter no longer loads on it
    pretrain = [py, "PreTrain/model.py", "--preset", "smoke", "--context-length", "128", "--max-steps", "3",
                "--checkpoint-dir", str(tmp_path / "ckpt"), "--log-file", str(tmp_path / "log")]
    proc = subprocess.run(pretrain, cwd=root, env=checkout_env(root), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "SFT/sft_output" in proc.stderr and "--force" in proc.stderr, proc.stderr
    proc = subprocess.run(pretrain + ["--force"], cwd=root, env=checkout_env(root), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([py, "SFT/inference.py", "--prompt", "hi", "--max-new-tokens", "4"], cwd=root, env=checkout_env(root),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "sft_output" in proc.stderr and "output" in proc.stderr and "qlora_fine_tune_trl.py" in proc.stderr


def retrain_tokenizer(root, other_tokenizer_dir):
    """Make root/tokenizer/ look retrained after the models: another tokenizer.json, with its own report.json."""
    shutil.copy(other_tokenizer_dir / "tokenizer.json", root / "tokenizer" / "tokenizer.json")
    report = read(root / "tokenizer" / "report.json")
    report.update(vocab_size=600, fingerprint=tokenizer_fingerprint(root / "tokenizer"))
    (root / "tokenizer" / "report.json").write_text(json.dumps(report))


def test_a_retrained_tokenizer_is_not_reported_as_the_models(smoke_repo, tmp_path, tiny_tokenizer_dir):
    """The report card used to show tokenizer/'s vocabulary beside models trained on another tokenizer."""
    root = tmp_path / "llm_train"
    shutil.copytree(smoke_repo[0], root, symlinks=True)
    models_vocab = read(root / "tokenizer" / "report.json")["vocab_size"]
    retrain_tokenizer(root, tiny_tokenizer_dir)
    proc = subprocess.run([str(root / ".venv" / "bin" / "python"), "report/build_report.py", "--no-samples"],
                          cwd=root, env=checkout_env(root), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (root / "report" / "report.md").read_text(encoding="utf-8")
    section = report.split("## Tokenizer")[1].split("##")[0]
    assert "holds another tokenizer (vocabulary 600)" in section and "Vocabulary 600" not in section
    assert f"vocabulary {models_vocab:,}, the copy saved in output/" in section
    metrics = read(root / "report" / "metrics.json")
    assert metrics["tokenizer"] is None and "another tokenizer" in metrics["tokenizer_mismatch"]
