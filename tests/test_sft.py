"""QLoRA SFT stage on conftest's tiny GPT-2: 4-bit frozen base, adapter training, reload on the plain model, chat
masking, resume, bad data, the 2-process run and the inference script."""
import json
import shutil

import pytest
import torch

import common
from conftest import load_script, run_script

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
            for t in common.arithmetic_tasks(60, "train")]
    return rows + [{"messages": MULTI_TURN}] * 4


def sft_args(model_dir, data, out, *extra):
    return ["--model-dir", model_dir, "--data", data, "--output-dir", out / "sft_output", "--run-dir", out,
            "--max-steps", 24, "--save-steps", 12, "--eval-steps", 12, "--lr", 2e-3, "--lora-r", 8, "--lora-alpha", 16,
            "--val-size", 8, "--eval-tasks", 4, "--eval-chats", 2, "--max-new-tokens", 8, "--max-length", 128, *extra]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    data = write_jsonl(out / "chats.jsonl", training_rows())
    args = [str(a) for a in sft_args(tiny_model_dir, data, out, "--merge")]
    trainer, report = sft.main(args)
    return {"trainer": trainer, "report": report, "out": out, "args": args, "model_dir": tiny_model_dir}


def four_bit_layers(model):
    import bitsandbytes as bnb

    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def test_base_is_4bit_frozen_and_unchanged_adapter_learns(trained):
    import bitsandbytes as bnb

    model = trained["trainer"].model
    layers = four_bit_layers(model)
    # Every GPT-2 projection (Conv1D in the plain model) is a 4-bit layer: 4 per block, 2 blocks.
    assert len(layers) == 8 and all(name.split(".")[-2] in {"c_attn", "c_proj", "c_fc"} for name in layers)
    for layer in layers.values():
        assert isinstance(layer.weight, bnb.nn.Params4bit) and layer.weight.quant_state is not None
        assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.dtype == torch.uint8
        assert not layer.weight.requires_grad
    # Only LoRA parameters are optimised.
    optimised = {id(p) for group in trained["trainer"].optimizer.param_groups for p in group["params"]}
    names = [n for n, p in model.named_parameters() if id(p) in optimised]
    assert names and all("lora_" in n for n in names)
    # The frozen base is bit-identical to a fresh 4-bit load of the same checkpoint (quantization is deterministic).
    fresh = four_bit_layers(sft.load_base(trained["model_dir"], four_bit=True))
    for name, layer in layers.items():
        fresh_layer = fresh[name.replace("base_model.model.", "").replace(".base_layer", "")]
        assert torch.equal(layer.weight.data, fresh_layer.weight.data)
        assert torch.equal(layer.weight.quant_state.absmax, fresh_layer.weight.quant_state.absmax)
    # LoRA B starts at zero; training moved it. Loss went down, and the SFT model beats the base on held-out chats.
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    history = [json.loads(line) for line in (trained["out"] / "sft_output" / "history.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in history if r["loss"] is not None]
    assert len(losses) >= 4 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
    assert any(r["eval_loss"] is not None for r in history)
    report = json.loads((trained["out"] / "eval.json").read_text())
    assert report["sft"]["val_loss_assistant_tokens"] < report["base"]["val_loss_assistant_tokens"] - 0.3
    assert 0 <= report["sft"]["exact_match"] <= 1 and 0 <= report["sft"]["ends_with_im_end"] <= 1


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_saved_adapter_reloads_on_plain_model(trained):
    """The adapter trained on Linear4bit layers applies to the plain Conv1D GPT-2 from output/.

    The plain model's weights are not the 4-bit ones, so its logits differ by the quantization error. To compare
    exactly, put the dequantized 4-bit weights into a plain (Conv1D) model: plain + adapter must then equal the
    trained 4-bit model; and merging (which uses fan_in_fan_out, the forward pass does not) must not change logits."""
    import bitsandbytes.functional as bnbf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    out, model_dir = trained["out"], trained["model_dir"]
    adapter_dir = out / "sft_output"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and set(config["target_modules"]) == {"c_attn", "c_proj", "c_fc"}
    trained_model = trained["trainer"].model.eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 64]])
    expected = logits(trained_model, ids)

    plain = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    for name, layer in four_bit_layers(trained_model).items():
        target = plain.get_submodule(name.replace("base_model.model.", "").replace(".base_layer", ""))
        assert isinstance(target, Conv1D)
        target.weight.data = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float().T.contiguous()
    reloaded = PeftModel.from_pretrained(plain, str(adapter_dir)).eval()
    got = logits(reloaded, ids)
    assert torch.allclose(got, expected, atol=2e-3), (got - expected).abs().max()
    with reloaded.disable_adapter():
        assert (logits(reloaded, ids) - expected).abs().max() > 1e-2  # the adapter matters
    merged = reloaded.merge_and_unload()
    assert torch.allclose(logits(merged, ids), got, atol=1e-4)

    # As a user loads it from disk: plain model + adapter == the merged model written by --merge.
    user_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapter_dir))
    merged_on_disk = AutoModelForCausalLM.from_pretrained(str(adapter_dir / "merged"))
    assert torch.allclose(logits(user_model.eval(), ids), logits(merged_on_disk.eval(), ids), atol=1e-4)
    im_end = trained["trainer"].processing_class.convert_tokens_to_ids(common.IM_END)
    assert im_end in merged_on_disk.generation_config.eos_token_id
    gen_config = json.loads((adapter_dir / "generation_config.json").read_text())
    assert im_end in gen_config["eos_token_id"]


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


def test_resume_from_latest_complete_checkpoint(trained, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained["out"], out)
    args = [a.replace(str(trained["out"]), str(out)) for a in trained["args"]]
    # Simulate a run killed while saving checkpoint-24: no trainer_state.json, so it must resume from 12.
    (out / "checkpoints" / "checkpoint-24" / "trainer_state.json").unlink()
    trainer, _ = sft.main(args)
    assert "resuming from" in (out / "train.log").read_text() and "checkpoint-12" in (out / "train.log").read_text()
    assert trainer.state.global_step == 24
    steps = [json.loads(line)["step"] for line in (out / "sft_output" / "history.jsonl").read_text().splitlines()]
    assert steps[0] == 2 and steps[-1] == 24  # logged every 2 steps; history from before the resume is kept
    # --eval-only re-measures without touching the adapter.
    mtime = (out / "sft_output" / "adapter_model.safetensors").stat().st_mtime
    _, report = sft.main(args + ["--eval-only"])
    assert report["sft"]["val_loss_assistant_tokens"] < report["base"]["val_loss_assistant_tokens"]
    assert (out / "sft_output" / "adapter_model.safetensors").stat().st_mtime == mtime


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
    with pytest.raises(common.UserError, match=rf"bad\.jsonl.*(row|line) 3.*{message}"):
        sft.main([str(a) for a in sft_args(tiny_model_dir, data, out)])
    assert not (out / "sft_output").exists()


def test_two_processes_hf_dataset_and_inference(tiny_model_dir, tmp_path):
    """accelerate launch --multi_gpu --num_processes=2 (torchrun underneath; gloo on CPU), reading an Alpaca-style dataset through datasets.load_dataset
    (a local directory stands in for a hub name), then the inference script on the result."""
    dataset_dir = tmp_path / "alpaca"
    dataset_dir.mkdir()
    write_jsonl(dataset_dir / "train.jsonl", [{"instruction": t["prompt"], "input": "", "output": t["response"]}
                                              for t in common.arithmetic_tasks(48, "train")])
    out = tmp_path / "out"
    args = [a for a in sft_args(tiny_model_dir, "x", out) if a not in ("--data", "x")]
    args = [str(a) for a in args] + ["--hf-dataset", str(dataset_dir), "--max-steps", "6", "--save-steps", "6"]
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
                           "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no",
                           str(common.REPO / "SFT" / "qlora_fine_tune_trl.py"), *args],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    log = (out / "train.log").read_text()
    assert "2 process(es)" in log and "trained 6 steps" in log
    assert (out / "sft_output" / "adapter_model.safetensors").is_file() and (out / "eval.json").is_file()

    chat = run_script("SFT/inference.py", "--model-dir", tiny_model_dir, "--adapter-dir", out / "sft_output",
                      "--prompt", "What is 2 plus 3?", "--max-new-tokens", "5")
    assert "assistant:" in chat.stdout and "tokens/s" in chat.stdout
    missing = run_script("SFT/inference.py", "--adapter-dir", tmp_path / "nowhere", "--merged", check=False)
    assert missing.returncode == 2 and "--merge" in missing.stderr
