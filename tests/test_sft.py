"""QLoRA SFT stage on conftest's tiny GPT-2: 4-bit frozen base, adapter training, reload on the plain model (under
both compute dtypes), chat masking, exact resume, reruns and lineage, bad input, the 2-process run and the inference
script."""
import json
import os
import re
import shutil
import sys

from llm_train import paths
from llm_train.arithmetic import arithmetic_tasks, evaluation_tasks
from llm_train.errors import UserError
from llm_train.lineage import output_fingerprint, read_lineage, write_lineage
from llm_train.paths import REPO
from llm_train.runtime import DTYPE_ENV
from llm_train.tokenizer import EOT, IM_END, load_chat_tokenizer

import pytest
import torch

from conftest import BOTH_DTYPES, free_port, load_script, run_group, run_script

sft = load_script("SFT/qlora_fine_tune_trl.py")

MULTI_TURN = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Hi there"},
              {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "What is 2 plus 3?"},
              {"role": "assistant", "content": "The answer is 5."}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def training_rows():
    """Small, learnable data: arithmetic chats plus one multi-turn conversation with a system prompt."""
    rows = [{"messages": [{"role": "user", "content": t["prompt"]}, {"role": "assistant", "content": t["response"]}]}
            for t in arithmetic_tasks(60, "train")]
    return rows + [{"messages": MULTI_TURN}] * 4


def sft_args(model_dir, data, out, *extra):
    return [str(a) for a in [
        "--preset", "smoke", "--model-dir", model_dir, "--data", data, "--output-dir", out / "sft_output",
        "--run-dir", out,
        "--max-steps", 24, "--save-steps", 12, "--eval-steps", 12, "--lr", 2e-3, "--lora-r", 8, "--lora-alpha", 16,
        "--val-size", 8, "--eval-tasks", 4, "--eval-chats", 2, "--max-new-tokens", 8, "--max-length", 128, *extra]]


@pytest.fixture(scope="module")
def train_run(tiny_model_dir, tmp_path_factory):
    """train_run(dtype): a 24-step SFT run (checkpoints at 12 and 24, --merge) under that compute dtype, made once.

    It runs as on a CPU with AVX512-BF16, where bitsandbytes would repack the 4-bit weights on an eval forward and
    re-quantize them on a checkpoint save (see load_base): the tests below then see whether the base stayed frozen."""
    import bitsandbytes.nn.modules

    runs = {}

    def run(dtype):
        if dtype not in runs:
            out = tmp_path_factory.mktemp(f"sft_{dtype}")
            data = write_jsonl(out / "chats.jsonl", training_rows())
            args = sft_args(tiny_model_dir, data, out, "--merge")
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv(DTYPE_ENV, dtype)
                mp.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
                trainer, report = sft.main(args)
            runs[dtype] = {"trainer": trainer, "report": report, "out": out, "args": args, "model_dir": tiny_model_dir}
        return runs[dtype]
    return run


@pytest.fixture
def trained(train_run, monkeypatch):
    monkeypatch.setenv(DTYPE_ENV, "fp32")  # a rerun of this run must use its dtype, whatever the suite forces
    return train_run("fp32")


def four_bit_layers(model):
    import bitsandbytes as bnb

    return {name.replace("base_model.model.", "").replace(".base_layer", ""): m
            for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def losses_by_step(trainer):
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


@BOTH_DTYPES
def test_base_is_4bit_frozen_and_unchanged_adapter_learns(train_run, dtype, monkeypatch):
    import bitsandbytes as bnb

    monkeypatch.setenv(DTYPE_ENV, dtype)
    run = train_run(dtype)
    model = run["trainer"].model
    layers = four_bit_layers(model)
    # Every GPT-2 projection (Conv1D in the plain model) is a 4-bit layer: 4 per block, 2 blocks.
    assert len(layers) == 8 and all(name.split(".")[-1] in {"c_attn", "c_proj", "c_fc"} for name in layers)
    for layer in layers.values():
        assert isinstance(layer.weight, bnb.nn.Params4bit) and layer.weight.quant_state is not None
        assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.dtype == torch.uint8
        assert layer.weight.quant_state.nested  # double quantization (the absmax values are 8-bit too)
        assert not layer.weight.requires_grad
    # Only LoRA parameters are optimised, as fp32 master weights in both dtypes.
    optimised = {id(p) for group in run["trainer"].optimizer.param_groups for p in group["params"]}
    params = [(n, p) for n, p in model.named_parameters() if id(p) in optimised]
    assert params and all("lora_" in n and p.dtype == torch.float32 for n, p in params)
    # The frozen base is bit-identical to a fresh 4-bit load of the same checkpoint (quantization is deterministic),
    # after 2 evaluations and 2 checkpoint saves. With bitsandbytes' AVX512-BF16 repacking left on, the absmax of
    # every layer differed here by up to ~24 (of 255) after the first eval + save: a second, lossy quantization.
    fresh = four_bit_layers(sft.load_base(run["model_dir"], four_bit=True))
    for name, layer in layers.items():
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        assert torch.equal(layer.weight.data, fresh[name].weight.data)
        assert torch.equal(layer.weight.quant_state.absmax, fresh[name].weight.quant_state.absmax)
        assert torch.equal(layer.weight.quant_state.state2.absmax, fresh[name].weight.quant_state.state2.absmax)
    # LoRA B starts at zero; training moved it. Loss went down, and the SFT model beats the base on held-out chats.
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    history = [json.loads(line) for line in (run["out"] / "sft_output" / "history.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in history if r["loss"] is not None]
    assert len(losses) == 12 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1
    assert [r["step"] for r in history if r["eval_loss"] is not None] == [12, 24]
    report = json.loads((run["out"] / "eval.json").read_text())
    assert report["sft"]["val_loss_assistant_tokens"] < report["base"]["val_loss_assistant_tokens"] - 0.2
    assert report["n_heldout_tasks"] == 4 and report["n_chat_prompts"] == 2


@pytest.mark.parametrize("stop, clean", [(IM_END, 1.0), (EOT, 0.0)])
def test_clean_ending_metric(tiny_model_dir, stop, clean):
    """A GPT-2 that always says `stop` first: a reply ending at <|im_end|> is clean, one ending at <|endoftext|> not."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_chat_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), tie_word_embeddings=False).eval()
    with torch.no_grad():  # final hidden state = e_0 whatever the input; only `stop` scores on e_0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.convert_tokens_to_ids(stop), 0] = 10.0
    tasks = evaluation_tasks(2)  # 2 problems of each held-out split
    metrics = sft.measure(model, tokenizer, [MULTI_TURN], tasks, [MULTI_TURN[:2]], max_new_tokens=4)
    assert metrics["ends_with_im_end"] == clean and metrics["exact_match"] == 0.0
    assert metrics["exact_match_heldout_wordings"] == 0.0 and metrics["arithmetic"]["both"]["n"] == 4
    assert [e["reply"] for e in metrics["examples"]] == [""] * 5


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# Trained 4-bit model vs plain model holding the same (dequantized) weights + the saved adapter, max |logit diff|.
# fp32: the same weights and fp32 math, up to summation order (measured 1.5e-7). bf16: the 4-bit layers round their
# inputs and outputs to bf16 (8 significant bits, 2^-9 = 0.2% relative) in the 8 matmuls on the path, on logits of
# size ~0.9: measured 2.3e-3, 1.08e-2 with an adapter trained on the arithmetic of 2026-12-06 and 1.49e-2 on its 95
# trained wordings, so 1.6e-2. A real mismatch still fails in both: the adapter on the unquantized weights instead of
# the ones it was trained on moves the logits by more than 3.2e-2 (checked below, > 2x the bf16 tolerance), and
# with the adapter off by 1.2.
RELOAD_ATOL = {"fp32": 1e-4, "bf16": 1.6e-2}


@BOTH_DTYPES
def test_saved_adapter_reloads_on_plain_model(train_run, dtype, monkeypatch):
    """The adapter trained on Linear4bit layers applies to the plain Conv1D GPT-2 from output/.

    The plain model's weights are not the 4-bit ones, so its logits differ by the quantization error. To compare
    exactly, put the dequantized 4-bit weights into a plain (Conv1D) model: plain + adapter must then equal the
    trained 4-bit model; and merging (which uses fan_in_fan_out, the forward pass does not) must not change logits."""
    import bitsandbytes.functional as bnbf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    monkeypatch.setenv(DTYPE_ENV, dtype)
    run = train_run(dtype)
    out, model_dir = run["out"], run["model_dir"]
    adapter_dir = out / "sft_output"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and set(config["target_modules"]) == {"c_attn", "c_proj", "c_fc"}
    trained_model = run["trainer"].model.eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 64]])
    expected = logits(trained_model, ids)

    plain = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    for name, layer in four_bit_layers(trained_model).items():
        target = plain.get_submodule(name)
        assert isinstance(target, Conv1D)
        target.weight.data = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float().T.contiguous()
    reloaded = PeftModel.from_pretrained(plain, str(adapter_dir)).eval()
    got = logits(reloaded, ids)
    tolerance = RELOAD_ATOL[dtype]
    assert (got - expected).abs().max() < tolerance, (got - expected).abs().max()
    with reloaded.disable_adapter():
        assert (logits(reloaded, ids) - expected).abs().max() > 5 * tolerance  # the adapter matters
    merged = reloaded.merge_and_unload()
    assert torch.allclose(logits(merged, ids), got, atol=1e-4)

    # As a user loads it from disk: plain model + adapter == the merged model written by --merge. And the adapter
    # on the unquantized weights (not the ones it was trained on) is told apart by the tolerance above.
    user_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapter_dir))
    merged_on_disk = AutoModelForCausalLM.from_pretrained(str(adapter_dir / "merged"))
    user_logits = logits(user_model.eval(), ids)
    assert torch.allclose(user_logits, logits(merged_on_disk.eval(), ids), atol=1e-4)
    assert (user_logits - expected).abs().max() > 2 * RELOAD_ATOL["bf16"], (user_logits - expected).abs().max()
    im_end = run["trainer"].processing_class.convert_tokens_to_ids(IM_END)
    assert im_end in merged_on_disk.generation_config.eos_token_id
    gen_config = json.loads((adapter_dir / "generation_config.json").read_text())
    assert im_end in gen_config["eos_token_id"]
    for lineage_dir in (adapter_dir, adapter_dir / "merged"):
        lineage = read_lineage(lineage_dir)
        assert lineage["stage"] == "sft" and lineage["settings"]["dtype"] == dtype and lineage["settings"]["merge"]
        assert lineage["parents"]["base"]["fingerprint"] == output_fingerprint(model_dir)


def test_loss_covers_assistant_tokens_only(trained):
    trainer = trained["trainer"]
    tokenizer = trainer.processing_class
    rendered = tokenizer.apply_chat_template(MULTI_TURN, tokenize=False)
    rows = list(trainer.train_dataset) + list(trainer.eval_dataset)  # the hash split may hold it out
    row = next(r for r in rows if tokenizer.decode(r["input_ids"]) == rendered)
    batch = trainer.data_collator([row])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    trained_on = tokenizer.decode(ids[labels != -100])
    assert trained_on == "Hello!<|im_end|>The answer is 5.<|im_end|>"
    assert "Be brief" not in trained_on and "Hi there" not in trained_on and "<|im_start|>" not in trained_on


def test_the_loss_projects_only_the_label_positions_and_equals_trls(trained, monkeypatch):
    """Our SFTTrainer's loss sends only the positions with a label through TRL's fused LM head (TRL sends every
    position off CUDA): the same loss as TRL's own, on the rows it needs."""
    import trl.trainer.utils as trl_utils
    from trl import SFTTrainer

    trainer = trained["trainer"]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    projected = []
    apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply",
                        lambda hidden, *rest: projected.append(hidden.shape[0]) or apply(hidden, *rest))
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, dict(batch))
        trls = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch))
    shifted = batch["labels"][:, 1:]
    assert projected == [(shifted != -100).sum().item(), shifted.numel()] and projected[0] < projected[1] / 2
    torch.testing.assert_close(ours, trls, atol=1e-5, rtol=1e-5)


def test_too_long_conversations_are_dropped_and_counted(tiny_model_dir, caplog):
    tokenizer = load_chat_tokenizer(tiny_model_dir)
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    long = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time " * 40}]
    n_short = len(tokenizer.apply_chat_template(short, tokenize=True, return_dict=True)["input_ids"])
    with caplog.at_level("INFO", logger="sft"):
        kept = sft.drop_too_long([short, long, short], tokenizer, 64, "training")
    assert n_short <= 64 and kept == [short, short]
    assert "training: kept 2, dropped 1 (longer than 64 tokens)" in caplog.text
    with pytest.raises(UserError, match="no training conversation fits in 64 tokens"):
        sft.drop_too_long([long], tokenizer, 64, "training")


@BOTH_DTYPES
def test_resume_after_kill_logs_the_uninterrupted_losses(train_run, dtype, monkeypatch, tmp_path):
    """Killed while saving checkpoint-24 (no trainer_state.json, no outputs yet) and rerun with the same command: it
    resumes from checkpoint-12 and steps 13..24 log bit-identical losses to the uninterrupted run; the reported mean
    train loss covers steps 1..24, not only the resumed half."""
    monkeypatch.setenv(DTYPE_ENV, dtype)
    run = train_run(dtype)
    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    args = [a.replace(str(run["out"]), str(out)) for a in run["args"]]
    (out / "checkpoints" / "checkpoint-24" / "trainer_state.json").unlink()
    shutil.rmtree(out / "sft_output")
    trainer, _ = sft.main(args)
    log = (out / "train.log").read_text()
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-12'}" in log
    assert trainer.state.global_step == 24
    assert losses_by_step(trainer) == losses_by_step(run["trainer"])  # steps 2..24, exactly
    reported = [line.split("mean train loss over steps 1-24: ")[1] for line in log.splitlines() if "mean train" in line]
    assert len(reported) == 2 and reported[0] == reported[1]  # the uninterrupted run's line, then the resumed one's
    history = (out / "sft_output" / "history.jsonl").read_text()
    assert history == (run["out"] / "sft_output" / "history.jsonl").read_text()


def test_rerun_is_a_noop_other_settings_stop_force_redoes_outputs(trained, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained["out"], out)
    args = [a.replace(str(trained["out"]), str(out)) for a in trained["args"]]
    adapter = out / "sft_output" / "adapter_model.safetensors"
    mtime = adapter.stat().st_mtime_ns

    # The same command again: nothing to do, nothing touched (the merged model stays).
    assert sft.main(args) == (None, None)
    assert "already finished with these settings; nothing to do" in capsys.readouterr().out
    assert adapter.stat().st_mtime_ns == mtime and (out / "sft_output" / "merged" / "model.safetensors").is_file()

    # Another --max-steps (or lr, data, base, ...) than the checkpoints' run: a clear stop, not a run past its
    # schedule. The checkpoints' lineage.json records the run's settings and base (checkpoint_to_resume).
    ckpt_lineage = read_lineage(out / "checkpoints")
    assert ckpt_lineage["stage"] == "sft" and ckpt_lineage["settings"]["max_steps"] == 24
    assert ckpt_lineage["parents"]["base"]["fingerprint"] == output_fingerprint(trained["model_dir"])
    with pytest.raises(UserError, match=r"holds checkpoints of another run \(--max-steps 24 there, 30 now\)"
                                               r".*--force to discard them and start over"):
        sft.main(args + ["--max-steps", "30"])
    with pytest.raises(UserError, match=r"--lr 0.002 there, 0.001 now"):
        sft.main(args + ["--lr", "1e-3"])
    # A changed base (same path or another, other weights): not finished, and its checkpoints are not resumed.
    from safetensors.torch import load_file, save_file

    other_base = tmp_path / "other_base"
    shutil.copytree(trained["model_dir"], other_base)
    weights = {k: v + 0.01 for k, v in load_file(other_base / "model.safetensors").items()}
    save_file(weights, other_base / "model.safetensors", metadata={"format": "pt"})
    why = f"another run (its base was {trained['model_dir']}, now {other_base} (or it changed since))"
    with pytest.raises(UserError, match=re.escape(why)):
        sft.main([str(other_base) if a == str(trained["model_dir"]) else a for a in args])

    # A later stage built from this adapter: replacing it needs --force (the error names the stale output).
    later = tmp_path / "reward_model"
    write_lineage(later, "reward_model", {}, sft=out / "sft_output")
    monkeypatch.setattr(paths, "REWARD_MODEL_DIR", later)
    with pytest.raises(UserError, match=rf"{out / 'sft_output'} already holds .*{later}.*--force"):
        sft.main(args + ["--lr", "1e-3"])
    assert adapter.stat().st_mtime_ns == mtime

    # --force on the finished run redoes its outputs from the final checkpoint: no step past 24, same adapter.
    trainer, report = sft.main(args + ["--force"])
    assert trainer.state.global_step == 24 and report is not None
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-24'} (the run's last step: nothing left to train)" \
        in (out / "train.log").read_text()
    assert adapter.read_bytes() == (trained["out"] / "sft_output" / "adapter_model.safetensors").read_bytes()
    assert (out / "sft_output" / "history.jsonl").read_text() == \
        (trained["out"] / "sft_output" / "history.jsonl").read_text()

    # --eval-only re-measures without touching the adapter.
    mtime = adapter.stat().st_mtime_ns
    _, report = sft.main(args + ["--eval-only"])
    assert report["sft"]["val_loss_assistant_tokens"] < report["base"]["val_loss_assistant_tokens"]
    assert adapter.stat().st_mtime_ns == mtime

    # --force with other settings starts over: the old run's checkpoints go, the new run trains from step 0.
    trainer, _ = sft.main(args + ["--force", "--max-steps", "2"])
    assert trainer.state.global_step == 2 and sorted(losses_by_step(trainer)) == [2]
    assert "holds checkpoints of another run (--max-steps 24 there, 2 now): --force, so starting over" \
        in capsys.readouterr().out
    assert [p.name for p in (out / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]
    assert read_lineage(out / "checkpoints")["settings"]["max_steps"] == 2
    assert read_lineage(out / "sft_output")["settings"]["max_steps"] == 2


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "role in"),
    ('{"instruction": "", "output": "x"}', "Alpaca row"),
    ('{"text": "hello"}', "expected a 'messages' list"),
    ('{"messages": [', "invalid JSON"),
])
def test_malformed_rows_name_file_and_row(tiny_model_dir, tmp_path, line, message):
    good = json.dumps({"instruction": "Say hi", "input": "", "output": "hi"})
    data = tmp_path / "bad.jsonl"
    data.write_text(f"{good}\n{good}\n{line}\n")
    out = tmp_path / "out"
    with pytest.raises(UserError, match=rf"bad\.jsonl.*(row|line) 3.*{message}"):
        sft.main(sft_args(tiny_model_dir, data, out))
    assert not (out / "sft_output").exists()


def test_non_utf8_data_is_a_clear_error(tiny_model_dir, tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(json.dumps({"instruction": "Café?", "input": "", "output": "Oui"}, ensure_ascii=False)
                     .encode("latin-1") + b"\n")
    with pytest.raises(UserError, match=r"latin1\.jsonl is not valid UTF-8"):
        sft.main(sft_args(tiny_model_dir, data, tmp_path / "out"))


@pytest.mark.parametrize("script, flag, value", [
    ("SFT/qlora_fine_tune_trl.py", "--batch-size", "0"), ("SFT/qlora_fine_tune_trl.py", "--batch-size", "-1"),
    ("SFT/qlora_fine_tune_trl.py", "--micro-batch", "0"), ("SFT/qlora_fine_tune_trl.py", "--max-steps", "0"),
    ("SFT/qlora_fine_tune_trl.py", "--max-steps", "-2"), ("SFT/qlora_fine_tune_trl.py", "--epochs", "0"),
    ("SFT/qlora_fine_tune_trl.py", "--lr", "nan"), ("SFT/qlora_fine_tune_trl.py", "--lora-r", "0"),
    ("SFT/qlora_fine_tune_trl.py", "--lora-alpha", "0"), ("SFT/qlora_fine_tune_trl.py", "--lora-dropout", "1"),
    ("SFT/qlora_fine_tune_trl.py", "--max-length", "0"), ("SFT/qlora_fine_tune_trl.py", "--save-steps", "0"),
    ("SFT/qlora_fine_tune_trl.py", "--eval-steps", "0"), ("SFT/qlora_fine_tune_trl.py", "--val-size", "0"),
    ("SFT/qlora_fine_tune_trl.py", "--arith-tasks", "-5"), ("SFT/qlora_fine_tune_trl.py", "--seed", "x"),
    ("SFT/qlora_fine_tune_trl.py", "--max-new-tokens", "0"), ("SFT/inference.py", "--max-new-tokens", "0"),
    ("SFT/inference.py", "--temperature", "-1"), ("SFT/inference.py", "--top-p", "1.5"),
])
def test_bad_numbers_are_usage_errors_at_parse_time(script, flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).parse_args([flag, value])
    assert exit_info.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err


def test_max_length_past_the_context_is_refused(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", training_rows())
    with pytest.raises(UserError, match=r"--max-length 512 is longer than the context .* \(256 positions\)"):
        sft.main(sft_args(tiny_model_dir, data, tmp_path / "out") + ["--max-length", "512"])


def test_accelerate_launch_without_multi_gpu_stops_with_the_working_command(tiny_model_dir, tmp_path):
    """accelerate launch --num_processes=2 without --multi_gpu starts one process on CPUs: refused before any work."""
    proc = run_group([sys.executable, "-m", "accelerate.commands.launch", "--num_processes=2", "--num_machines=1",
                      "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={free_port()}",
                      str(REPO / "SFT" / "qlora_fine_tune_trl.py"), "--model-dir", str(tiny_model_dir),
                      "--run-dir", str(tmp_path / "run"), "--output-dir", str(tmp_path / "out"), "--max-steps", "1"],
                     timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert "error: accelerate launch started 1 process, not the 2 asked for" in proc.stderr
    assert "`accelerate launch --multi_gpu --num_processes=2 " in proc.stderr
    assert not (tmp_path / "run").exists()


def test_two_processes_hf_dataset_and_inference(tiny_model_dir, tmp_path, trained):
    """accelerate launch --multi_gpu --num_processes=2 (torchrun underneath; gloo on CPU), reading an Alpaca-style
    dataset through datasets.load_dataset (a local directory stands in for a hub name), then the inference script on
    the result; once the base is retrained, the inference script refuses the adapter. The two processes train the
    preset's global batch per optimizer step, as the one process of `trained` does (the Trainer's own numbers)."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    dataset_dir = tmp_path / "alpaca"
    dataset_dir.mkdir()
    write_jsonl(dataset_dir / "train.jsonl", [{"instruction": t["prompt"], "input": "", "output": t["response"]}
                                              for t in arithmetic_tasks(48, "train")])
    out = tmp_path / "out"
    args = [a for a in sft_args(base, "x", out) if a not in ("--data", "x")]
    args += ["--hf-dataset", str(dataset_dir), "--max-steps", "6", "--save-steps", "6"]
    proc = run_group([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
                      "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no",
                      f"--main_process_port={free_port()}", str(REPO / "SFT" / "qlora_fine_tune_trl.py"), *args],
                     timeout=600, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    log = (out / "train.log").read_text()
    assert "2 process(es)" in log and "trained to step 6" in log
    assert "4 conversations per optimizer step = 2 processes x 2 per device x 1 accumulation step" in log
    assert "4 conversations per optimizer step = 1 process x 4 per device x 1 accumulation step" in \
        (trained["out"] / "train.log").read_text()
    one = trained["trainer"].args
    assert one.per_device_train_batch_size * one.gradient_accumulation_steps * one.world_size == 4
    assert (out / "sft_output" / "adapter_model.safetensors").is_file() and (out / "eval.json").is_file()
    assert read_lineage(out / "sft_output")["settings"]["processes"] == 2
    assert "FutureWarning" not in proc.stderr and "Setting accelerator to CPU" not in proc.stdout + proc.stderr

    chat = run_script("SFT/inference.py", "--model-dir", base, "--adapter-dir", out / "sft_output",
                      "--prompt", "What is 2 plus 3?", "--max-new-tokens", "5")
    assert "assistant:" in chat.stdout and "tokens/s" in chat.stdout
    inference = load_script("SFT/inference.py")
    with pytest.raises(UserError, match=r"no merged model in .*nowhere.*--merge"):
        inference.main(["--adapter-dir", str(tmp_path / "nowhere"), "--merged"])

    # The base is retrained after SFT: the adapter no longer belongs to it.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.add_(0.01)
    model.save_pretrained(str(base))
    stale = run_script("SFT/inference.py", "--model-dir", base, "--adapter-dir", out / "sft_output", check=False)
    assert stale.returncode == 2 and "Traceback" not in stale.stderr
    assert f"error: {out / 'sft_output'} was built from a different base than the one in {base}" in stale.stderr
    assert "python SFT/qlora_fine_tune_trl.py --model-dir" in stale.stderr
    with pytest.raises(UserError, match="was built from a different base"):
        sft.main([*args, "--eval-only"])


def test_an_unwritable_checkpoint_dir_or_a_run_dir_that_is_a_file_is_one_clear_error(tiny_model_dir, tmp_path):
    """Both used to end in a traceback (the first checkpoint write, the log file); now the stage's directories are
    checked before any work (Stage.prepare) and nothing is written. Tests run as root: a directory under a regular
    file is what cannot be written."""
    data = write_jsonl(tmp_path / "chats.jsonl", training_rows())
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(UserError, match=f"cannot write to output directory {a_file / 'checkpoints'}"):
        sft.main(sft_args(tiny_model_dir, data, tmp_path / "out", "--checkpoint-dir", a_file / "checkpoints"))
    with pytest.raises(UserError, match=f"cannot write to output directory {a_file} "):
        sft.main(sft_args(tiny_model_dir, data, tmp_path / "out", "--run-dir", a_file))
    assert not (tmp_path / "out" / "sft_output").exists() and a_file.read_text() == ""


def test_a_resume_between_two_logging_steps_logs_the_uninterrupted_losses(tiny_model_dir, tmp_path, monkeypatch):
    """The loss is logged every 2 steps as the mean since the last log; a run resumed from checkpoint-3 used to log at
    step 4 the loss of step 4 alone instead of the mean over steps 3-4: the logging window is kept (train_or_finish)."""
    monkeypatch.setenv(DTYPE_ENV, "fp32")
    data = write_jsonl(tmp_path / "chats.jsonl", training_rows())
    args = sft_args(tiny_model_dir, data, tmp_path / "full", "--max-steps", 6, "--save-steps", 3, "--eval-steps", 10)
    full, _ = sft.main(args)
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "full" / "checkpoints", killed / "checkpoints")
    shutil.rmtree(killed / "checkpoints" / "checkpoint-6")
    resumed, _ = sft.main([a.replace(str(tmp_path / "full"), str(killed)) for a in args])
    assert f"resuming from {killed / 'checkpoints' / 'checkpoint-3'}" in (killed / "train.log").read_text()
    assert sorted(losses_by_step(full)) == [2, 4, 6] and losses_by_step(resumed) == losses_by_step(full)
