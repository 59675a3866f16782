"""The recipe a GPU user gets from SFT, the reward model and GRPO: each preset fixes the global batch (examples per
optimizer step over all processes), split per process by split_global_batch, so 1 or 8 processes train the same
steps (the 2-process runs of test_sft.py and test_rlhf.py check the Trainer's batch against the 1-process runs);
--gradient-checkpointing trains to the same losses as without it; make's launch line per GPU count."""
import json
import subprocess

from llm_train.arithmetic import arithmetic_tasks
from llm_train.corpus import read_jsonl_gz
from llm_train.runtime import DTYPE_ENV
from llm_train.trainer_runs import split_global_batch

import pytest

from conftest import REPO, load_script, run_script

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
SCRIPTS = {"sft": "SFT/qlora_fine_tune_trl.py", "reward_model": "RLHF/reward_model.py", "grpo": "RLHF/grpo_trl.py"}
# (per device, accumulation) of each preset in one process, as the presets said before they fixed the global batch
ONE_PROCESS = {("sft", "gpu"): (4, 4), ("sft", "cpu"): (16, 1), ("sft", "smoke"): (4, 1),
               ("reward_model", "gpu"): (32, 1), ("reward_model", "cpu"): (16, 1), ("reward_model", "smoke"): (16, 1),
               ("grpo", "gpu"): (64, 1), ("grpo", "cpu"): (128, 1), ("grpo", "smoke"): (8, 1)}


def preset_split(stage, preset, processes):
    p = load_script(SCRIPTS[stage]).PRESETS[preset]
    return split_global_batch(p["batch_size"], p.get("micro_batch"), processes,
                              multiple_of=p["num_generations"] if stage == "grpo" else 1)


@pytest.mark.parametrize("stage, preset", sorted(ONE_PROCESS))
def test_every_preset_trains_its_global_batch_on_1_2_or_8_processes(stage, preset):
    one = preset_split(stage, preset, 1)
    assert (one.per_device, one.accum) == ONE_PROCESS[stage, preset]  # one process: the recipe as it was
    for processes in (2, 8):
        split = preset_split(stage, preset, processes)
        if preset != "smoke":  # smoke's 4 conversations cannot be split 8 ways: 8 x 1 is the nearest
            assert split.total == one.total, (processes, split)
        assert split.per_device * split.accum * processes == split.total and split.per_device <= one.per_device


def test_the_gpu_sft_preset_splits_as_its_comment_says():
    assert preset_split("sft", "gpu", 8)[:3] == (2, 1, 8)
    assert preset_split("sft", "gpu", 2)[:3] == (4, 2, 2)
    assert "16 conversations per optimizer step = 8 processes x 2 per device x 1 accumulation step" == \
        preset_split("sft", "gpu", 8).describe("conversations")


def test_an_indivisible_global_batch_gets_the_nearest_split_and_says_so():
    split = split_global_batch(16, 4, processes=3)
    assert (split.per_device, split.accum, split.total) == (1, 5, 15)  # 15 is nearer to 16 than 12 or 18
    assert split.describe("conversations") == ("15 conversations per optimizer step = 3 processes x 1 per device x "
                                               "5 accumulation steps (the nearest to the 16 asked for that 3 "
                                               "processes can split)")
    assert split_global_batch(5, 4, processes=2).total == 4  # a tie (4 or 6): the smaller
    assert split_global_batch(4, 4, processes=8)[:4] == (1, 1, 8, 8)  # fewer examples than processes
    grpo = split_global_batch(8, None, processes=3, multiple_of=4)  # whole groups of 4 on 3 processes
    assert grpo.total == 12 and grpo.total % 4 == 0


def test_grpo_splits_under_world_size_and_keeps_whole_groups(monkeypatch):
    grpo = load_script("RLHF/grpo_trl.py")
    monkeypatch.setenv("WORLD_SIZE", "3")
    args = grpo.parse_args(["--preset", "gpu", "--batch-size", "16", "--num-generations", "8"])
    assert grpo.batch_split(args).total == 24  # the nearest multiple of 8 that 3 processes share evenly
    args = grpo.parse_args(["--preset", "gpu", "--batch-size", "64", "--micro-batch", "8"])
    assert grpo.batch_split(args)[:4] == (8, 3, 3, 72)  # 64 / 3 processes: 72 (8 x 3 x 3) or 48; 72 is a group nearer


def test_make_launches_post_training_under_accelerate_with_several_gpus():
    def commands(ngpu):
        out = subprocess.run(["make", "-n", "-B", "all", "SCALE=smoke", f"NGPU={ngpu}"], cwd=REPO, text=True,
                             capture_output=True, check=True).stdout
        return {stage: next(line for line in out.splitlines() if script in line) for stage, script in SCRIPTS.items()}

    for line in commands(8).values():
        assert "accelerate launch --multi_gpu --num_processes 8 --num_machines 1" in line
    for ngpu in (0, 1):
        for stage, line in commands(ngpu).items():
            assert "accelerate" not in line and f".venv/bin/python {SCRIPTS[stage]}" in line


# ---------------------------------------------------------------------------------------------------------------
# --gradient-checkpointing: the same losses, a few steps of each stage
def write_chats(path):
    rows = [{"messages": [{"role": "user", "content": t["prompt"]}, {"role": "assistant", "content": t["response"]}]}
            for t in arithmetic_tasks(40, "train")]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_sft_with_gradient_checkpointing_trains_to_the_same_losses(tiny_model_dir, tmp_path, monkeypatch):
    """QLoRA (4-bit base, peft): the inputs must require grads for the checkpointed blocks; non-reentrant."""
    monkeypatch.setenv(DTYPE_ENV, "fp32")
    sft = load_script("SFT/qlora_fine_tune_trl.py")
    data = write_chats(tmp_path / "chats.jsonl")

    def losses(name, *extra):
        out = tmp_path / name
        trainer, _ = sft.main([str(a) for a in [
            "--preset", "smoke", "--model-dir", tiny_model_dir, "--data", data, "--output-dir", out / "sft_output",
            "--run-dir", out, "--max-steps", 4, "--save-steps", 10, "--eval-steps", 5, "--lr", 2e-3, "--val-size", 4,
            "--eval-tasks", 2, "--eval-chats", 1, "--max-new-tokens", 4, "--max-length", 128, *extra]])
        assert trainer.args.activation_checkpointing == bool(extra)
        return [e["loss"] for e in trainer.state.log_history if "loss" in e]

    plain, checkpointed = losses("plain"), losses("checkpointed", "--gradient-checkpointing")
    assert len(plain) == 4 and checkpointed == pytest.approx(plain, abs=1e-5)
    assert ("4 conversations per optimizer step = 1 process x 4 per device x 1 accumulation step; gradient "
            "checkpointing on") in (tmp_path / "checkpointed" / "train.log").read_text()
    assert "gradient checkpointing off" in (tmp_path / "plain" / "train.log").read_text()


def test_reward_model_with_gradient_checkpointing_trains_to_the_same_losses(tiny_model_dir, tmp_path):
    rows = list(read_jsonl_gz(REPO / "RLHF" / "data" / "preference_train.jsonl.gz"))[:28]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:20]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[20:]))

    def losses(name, *extra):
        out = tmp_path / name
        proc = run_script("RLHF/reward_model.py", "--sft-dir", tiny_model_dir, "--out-dir", out, "--data",
                          tmp_path / "train.jsonl", "--eval-data", tmp_path / "eval.jsonl", "--max-steps", 5,
                          "--batch-size", 4, "--lr", 1e-3, "--max-length", 96, "--save-steps", 10, *extra,
                          env={DTYPE_ENV: "fp32"})
        assert ("4 pairs per optimizer step = 1 process x 4 per device x 1 accumulation step; gradient checkpointing "
                + ("on" if extra else "off")) in proc.stdout
        return [r["loss"] for r in map(json.loads, (out / "train.log").read_text().splitlines()) if "loss" in r]

    plain, checkpointed = losses("plain"), losses("checkpointed", "--gradient-checkpointing")
    assert len(plain) == 1 and checkpointed == pytest.approx(plain, abs=1e-5)


def test_grpo_with_gradient_checkpointing_trains_to_the_same_losses(tiny_model_dir, tmp_path):
    """LoRA policy (peft) under TRL's GRPOTrainer, exact-answer reward only (no reward model needed)."""
    def history(name, *extra):
        out = tmp_path / name
        proc = run_script("RLHF/grpo_trl.py", "--preset", "smoke", "--sft-dir", tiny_model_dir, "--out-dir", out,
                          "--rm-weight", 0, "--num-prompts", 8, "--num-generations", 4, "--batch-size", 8,
                          "--max-completion-length", 8, "--lr", 5e-3, "--warmup-steps", 0, "--save-steps", 10,
                          "--eval-arithmetic", 2, "--eval-conversation", 0, *extra, env={DTYPE_ENV: "fp32"})
        assert ("8 completions per optimizer step = 1 process x 8 per device x 1 accumulation step; gradient "
                "checkpointing " + ("on" if extra else "off")) in proc.stdout
        return [h for h in map(json.loads, (out / "grpo_output" / "history.jsonl").read_text().splitlines())
                if "loss" in h]

    plain, checkpointed = history("plain"), history("checkpointed", "--gradient-checkpointing")
    assert len(plain) == 4
    for key in ("loss", "kl", "reward"):
        assert [h[key] for h in checkpointed] == pytest.approx([h[key] for h in plain], abs=1e-5), key
