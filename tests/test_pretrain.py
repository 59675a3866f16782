"""Pretraining stage (PreTrain/model.py, ds_config.json, inference.py): tiny models on tiny chunks, real code paths."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PY, REPO, load_script, run_script, sample_texts

import common

CTX = 32
TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--context-length", CTX, "--batch-size", "4",
        "--warmup-steps", "2", "--eval-interval", "4", "--eval-batches", "2", "--log-interval", "1"]


def write_chunks(tokenizer_dir, out_dir, context_length=CTX, texts=None):
    """Chunks in exactly the manifest/parquet format of PreTrain/preprocess_dataset_for_pretrain_map.py."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = common.load_tokenizer(tokenizer_dir)
    row_length = context_length + 1
    splits = {}
    texts = texts or sample_texts()
    for split, docs in (("train", texts[1:]), ("val", texts[:1] + texts[-20:])):
        ids, nbytes = [], 0
        for t in docs:
            ids += tok(t)["input_ids"] + [tok.eos_token_id]
            nbytes += len(t.encode())
        n = len(ids) // row_length
        rows = np.array(ids[: n * row_length], dtype=np.int32).reshape(n, row_length)
        shards = []
        for i, part in enumerate(np.array_split(rows, 2)):
            rel = f"{split}/shard_{i:05d}.parquet"
            (out_dir / split).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"input_ids": pa.array(part.tolist(), type=pa.list_(pa.int32()))}), out_dir / rel)
            shards.append(rel)
        splits[split] = {"shards": shards, "rows": n, "tokens": n * row_length, "bytes": nbytes, "documents": len(docs)}
    manifest = {"format": 1, "tokenizer_fingerprint": common.tokenizer_fingerprint(tokenizer_dir),
                "vocab_size": len(tok), "eot_id": tok.eos_token_id, "context_length": context_length,
                "row_length": row_length, "splits": splits, "sources": ["test"], "seconds": 0.0}
    (out_dir / "manifest.json").write_text(json.dumps(manifest))
    return out_dir


@pytest.fixture(scope="module")
def chunks_dir(tiny_tokenizer_dir, tmp_path_factory):
    return write_chunks(tiny_tokenizer_dir, tmp_path_factory.mktemp("chunks"))


@pytest.fixture(scope="module")
def model_module():
    return load_script("PreTrain/model.py")


def dirs(tmp_path, tokenizer_dir, chunks):
    return ["--tokenizer-dir", tokenizer_dir, "--chunks-dir", chunks, "--output-dir", tmp_path / "output",
            "--checkpoint-dir", tmp_path / "ckpt", "--log-file", tmp_path / "train.log",
            "--tensorboard-dir", tmp_path / "runs"]


def history(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "history.jsonl").read_text().splitlines()]


def losses(out_dir):
    return {h["step"]: h["loss"] for h in history(out_dir) if "loss" in h}


def test_hf_export_logits_match(model_module, tiny_tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tok = common.load_tokenizer(tiny_tokenizer_dir)
    model = model_module.GPT(len(tok), 48, 3, 48, 4).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorm params so a wrong mapping cannot hide
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1).add_(1.0 if name.endswith("ln_1.weight") else 0.0)
    model_module.save_hf(model_module.hf_state_dict(model), model.config, tok, tiny_tokenizer_dir, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    idx = torch.randint(0, len(tok), (2, 48))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-4)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied


def torchrun(launcher, args, port):
    cmd = [PY, "-m", *launcher, "--nproc_per_node=1", "--master_port", str(port), str(REPO / "PreTrain/model.py"),
           *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO / "PreTrain")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_train_writes_loadable_output_and_resumes_exactly(tiny_tokenizer_dir, chunks_dir, tmp_path):
    """Uninterrupted run under torchrun (DDP, 1 process): output/ loads in HF. A plain run SIGKILLed right after its
    step-4 checkpoint and rerun with the same command logs bit-identical losses for steps 5..8."""
    from transformers import AutoModelForCausalLM

    base = [*TINY, "--max-steps", 8, "--checkpoint-interval", 4]
    full = tmp_path / "full"
    torchrun(["torch.distributed.run"], [*base, *dirs(full, tiny_tokenizer_dir, chunks_dir)], 29511)
    out = full / "output"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "history.jsonl",
                 "pretrain_summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "pretrain_summary.json").read_text())
    assert summary["steps"] == 8 and summary["final_train_loss"] < summary["first_train_loss"]
    assert summary["val_bpb"] > 0 and summary["median_tokens_per_s"] > 0 and summary["mode"] == "ddp"
    assert any("val_bpb" in h for h in history(out))
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert hf.config.n_layer == 2 and hf.config.vocab_size == len(common.load_tokenizer(out))
    assert (full / "train.log").read_text().count("val bits/byte") >= 2
    assert (full / "ckpt" / "step_000008").is_dir() and (full / "ckpt" / "step_000004").is_dir()

    killed = tmp_path / "killed"
    proc = run_script("PreTrain/model.py", *base, *dirs(killed, tiny_tokenizer_dir, chunks_dir),
                      "--debug-kill-step", 4, check=False)
    assert proc.returncode == -9 and not (killed / "output").exists()
    run_script("PreTrain/model.py", *base, *dirs(killed, tiny_tokenizer_dir, chunks_dir))
    assert "resuming at step 4" in (killed / "train.log").read_text()
    assert losses(killed / "output") == losses(out)  # steps 5..8 bit-identical after the resume


def test_legacy_launcher(tiny_tokenizer_dir, chunks_dir, tmp_path):
    """torch.distributed.launch still exists in torch 2.13 (deprecated): --use_env works."""
    torchrun(["torch.distributed.launch", "--use_env"], [*TINY, "--max-steps", 2, *dirs(tmp_path, tiny_tokenizer_dir,
                                                                                      chunks_dir)], 29512)
    assert "ddp x1" in (tmp_path / "train.log").read_text()
    assert json.loads((tmp_path / "output" / "pretrain_summary.json").read_text())["steps"] == 2


def test_nan_loss_stops_and_keeps_checkpoint(tiny_tokenizer_dir, chunks_dir, tmp_path):
    proc = run_script("PreTrain/model.py", *TINY, "--max-steps", 8, "--checkpoint-interval", 2,
                      "--debug-nan-step", 5, *dirs(tmp_path, tiny_tokenizer_dir, chunks_dir), check=False)
    assert proc.returncode == 2 and "loss became nan at step 5" in proc.stderr
    assert not (tmp_path / "output").exists()
    assert (tmp_path / "ckpt" / "step_000004" / "state.json").is_file()
    assert not (tmp_path / "ckpt" / "step_000006").exists()


def test_bad_inputs(model_module, tiny_tokenizer_dir, chunks_dir, tmp_path):
    """Each bad input is one clear UserError before anything is written (exit code 2 is checked in the NaN test)."""
    def fails(*args, match):
        with pytest.raises(common.UserError, match=match):
            model_module.main(list(map(str, [*TINY, "--max-steps", 2, *args])))

    d = dirs(tmp_path, tiny_tokenizer_dir, chunks_dir)
    fails(*d[:2], "--chunks-dir", tmp_path / "nothing", *d[4:], match="no chunks")
    # chunks made with another tokenizer
    other_tok = tmp_path / "other_tok"
    stage = load_script("PreTrain/train_byte_level_bpe_tokenizer.py")
    stage.save(stage.train(sample_texts()[:6], vocab_size=400), other_tok)
    fails("--tokenizer-dir", other_tok, *d[2:], match="another tokenizer")
    fails(*d, "--context-length", 64, match="larger than the chunks' context_length 32")
    # an output dir holding something else is left alone
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "precious.txt").write_text("keep me")
    fails(*d, match="not a previous pretraining output")
    assert (tmp_path / "output" / "precious.txt").read_text() == "keep me"
    # a shard whose rows do not have the manifest's row length is named, with the row
    broken = tmp_path / "broken"
    shutil.copytree(chunks_dir, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["row_length"] = CTX + 2
    (broken / "manifest.json").write_text(json.dumps(manifest))
    fails(*d[:2], "--chunks-dir", broken, "--output-dir", tmp_path / "o2", *d[6:], match="shard_00000.parquet, row 0")
    assert not (tmp_path / "o2").exists() and not list((tmp_path / "ckpt").glob("step_*"))


def test_smaller_context_uses_windows(model_module, tiny_tokenizer_dir, chunks_dir):
    manifest = model_module.read_manifest(chunks_dir, tiny_tokenizer_dir)
    full = model_module.load_rows(chunks_dir, manifest, "train", CTX, 10**6)
    half = model_module.load_rows(chunks_dir, manifest, "train", CTX // 2, 10**6)
    assert half.shape == (2 * len(full), CTX // 2 + 1)
    np.testing.assert_array_equal(half[: len(full)], full[:, : CTX // 2 + 1])
    np.testing.assert_array_equal(half[len(full):], full[:, CTX // 2:])


def test_batches_disjoint_across_ranks_and_deterministic(model_module):
    rows = np.arange(100, dtype=np.int32)[:, None].repeat(5, 1)
    per_rank = [model_module.Batches(rows, 3, 2, r, 2, seed=7) for r in range(2)]
    seen = [set(b.get(step, m)[0][:, 0].tolist()) for step in range(4) for m in range(2) for b in per_rank]
    assert sum(map(len, seen)) == len(set().union(*seen)) == 48  # 4 steps x 2 micro x 2 ranks x 3 rows, no repeats
    again = model_module.Batches(rows, 3, 2, 1, 2, seed=7)
    assert torch.equal(again.get(3, 1)[0], per_rank[1].get(3, 1)[0])


def test_deepspeed_two_ranks_writes_output_and_resumes(tiny_tokenizer_dir, chunks_dir, tmp_path):
    """ZeRO-2 on the CPU accelerator with 2 ranks; killed after the step-2 checkpoint, the rerun resumes."""
    pytest.importorskip("deepspeed")
    base = [*TINY, "--max-steps", 4, "--checkpoint-interval", 2, "--deepspeed", REPO / "PreTrain/ds_config.json",
            *dirs(tmp_path, tiny_tokenizer_dir, chunks_dir)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}

    def launch(*extra):
        cmd = [str(Path(PY).parent / "deepspeed"), "--num_gpus=2", "--master_port", "29561",
               str(REPO / "PreTrain/model.py"), *map(str, [*base, *extra])]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)

    proc = launch("--debug-kill-step", 2)
    assert proc.returncode != 0 and (tmp_path / "ckpt" / "latest").read_text() == "step_000002"
    assert not (tmp_path / "output").exists()
    proc = launch()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "train.log").read_text()
    assert "deepspeed x2" in log and "resuming at step 2" in log
    summary = json.loads((tmp_path / "output" / "pretrain_summary.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == 2
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "output"))
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(hf(ids).logits).all()


def test_inference_runs_on_output(tiny_model_dir):
    proc = run_script("PreTrain/inference.py", "--model-dir", tiny_model_dir, "--max-new-tokens", 5, "--seed", 0)
    assert proc.stdout.count("tokens/s") == 3  # the English, Chinese and code default prompts
    assert "床前明月光" in proc.stdout and "def fibonacci" in proc.stdout
    inference = load_script("PreTrain/inference.py")
    with pytest.raises(common.UserError, match="no model in"):
        inference.main(["--model-dir", str(tiny_model_dir.parent / "missing")])
    inference.main(["--model-dir", str(tiny_model_dir), "--prompt", "The answer is", "--max-new-tokens", "4",
                    "--temperature", "0"])  # greedy path, in-process
