"""RLHF stage: embedded preference data, reward model (TRL RewardTrainer), GRPO with TRL and in plain PyTorch.

Everything runs on the tiny random GPT-2 of conftest as the "SFT policy" (a full model dir is accepted as --sft-dir)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, load_script, run_script

import common

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
DATA = REPO / "RLHF" / "data"
KINDS = {"wrong", "rambling", "off_format", "truncated", "wrong_language"}


def test_embedded_preference_data_is_sound():
    splits = {s: list(common.read_jsonl_gz(DATA / f"preference_{s}.jsonl.gz")) for s in ("train", "heldout")}
    for split, rows in splits.items():
        assert {r["kind"] for r in rows} == KINDS
        for r in rows:
            chosen, rejected = r["chosen"][-1]["content"], r["rejected"][-1]["content"]
            assert chosen != rejected and r["prompt"][-1]["role"] == "user"
            if r["source"] == "arithmetic":  # chosen is exactly right, and held-out problems are really held out
                assert common.extract_answer(chosen) == r["answer"]
                assert common.arithmetic_split(r["prompt"][0]["content"]) == split
                if r["kind"] in ("wrong", "off_format", "truncated", "rambling"):
                    assert common.extract_answer(rejected) != r["answer"] or r["kind"] == "rambling"
    train_prompts = {json.dumps(r["prompt"]) for r in splits["train"]}
    assert not any(json.dumps(r["prompt"]) in train_prompts for r in splits["heldout"])
    assert len(splits["train"]) > 2000 and len(splits["heldout"]) > 300


def test_user_pair_formats_are_converted_to_our_chat_layout(tmp_path):
    rm = load_script("RLHF/reward_model.py")
    hh = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: 4.",
          "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: 5."}
    pair = rm.normalize_pair(hh, "x")
    assert pair["prompt"] == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                              {"role": "user", "content": "What is 2+2?"}]
    assert pair["chosen"] == [{"role": "assistant", "content": "4."}]
    assert pair["rejected"] == [{"role": "assistant", "content": "5."}]
    text = rm.normalize_pair({"prompt": "Q?", "chosen": "A", "rejected": "B", "kind": "wrong"}, "x")
    assert text["prompt"] == [{"role": "user", "content": "Q?"}] and text["kind"] == "wrong"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([hh, hh]), tmp_path / "p.parquet")
    assert rm.load_pairs([tmp_path / "p.parquet"]) == [pair, pair]


@pytest.mark.parametrize("content, message", [
    ('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: a\\n\\nAssistant: c"}\n{oops\n',
     "line 2: not valid JSON"),
    ('{"prompt": "q", "chosen": "a"}\n', "row 1: a preference row needs 'chosen' and 'rejected'"),
    ('{"chosen": "just text", "rejected": "other text"}\n', "row 1: text rows need a 'prompt'"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "bot", "content": "a"}], '
     '"rejected": [{"role": "assistant", "content": "b"}]}\n', "row 1: 'chosen' has a message"),
])
def test_bad_preference_rows_name_file_and_row(tmp_path, content, message):
    rm = load_script("RLHF/reward_model.py")
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(content)
    with pytest.raises(common.UserError) as e:
        rm.load_pairs([bad])
    assert str(bad) in str(e.value) and message in str(e.value)


def test_bad_preference_file_exits_2_and_writes_nothing(tmp_path, tiny_model_dir):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    out = tmp_path / "rlhf"
    proc = run_script("RLHF/reward_model.py", "--sft-dir", tiny_model_dir, "--data", bad, "--out-dir", out, check=False)
    assert proc.returncode == 2 and f"{bad} row 2" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "reward_model").exists()


@pytest.fixture(scope="module")
def rlhf_dir(tmp_path_factory, tiny_model_dir):
    """A reward model trained on the embedded pairs, in the layout of RLHF/ (shared by the GRPO tests)."""
    out = tmp_path_factory.mktemp("rlhf")
    run_script("RLHF/reward_model.py", "--sft-dir", tiny_model_dir, "--out-dir", out, "--max-steps", 60,
               "--batch-size", 16, "--lr", 3e-3, "--max-length", 96, "--save-steps", 30)
    return out


def test_reward_model_learns_the_pairs(rlhf_dir):
    from transformers import AutoModelForSequenceClassification

    report = json.loads((rlhf_dir / "reward_eval.json").read_text())
    held = report["heldout"]
    assert held["pairs"] > 300 and set(held["accuracy_by_kind"]) == KINDS
    assert held["accuracy"] > 0.62, held  # chance is 0.5; 60 steps on a random 2-layer model
    assert held["accuracy_by_kind"]["off_format"] > 0.7, held
    model = AutoModelForSequenceClassification.from_pretrained(str(rlhf_dir / "reward_model"))
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    assert any(json.loads(line).get("stage") == "reward_model" for line in open(rlhf_dir / "train.log"))
    assert list((rlhf_dir / "runs" / "reward_model").glob("events.out.tfevents.*"))


def test_grpo_loss_and_gradients_match_trl(tiny_model_dir):
    """The plain-PyTorch loss of grpo_training.py equals TRL's GRPOTrainer.compute_loss (loss_type dapo,
    beta 0.05, no reward scaling, as grpo_trl.py configures it) on the same batch, and so do the gradients."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    gt = load_script("RLHF/grpo_training.py")
    tok = common.load_chat_tokenizer(tiny_model_dir)
    temperature = 0.7
    config = GRPOConfig(output_dir="/tmp/unused", per_device_train_batch_size=4, num_generations=2, beta=0.05,
                        loss_type="dapo", scale_rewards="none", temperature=temperature, bf16=False, use_cpu=True,
                        report_to="none", disable_dropout=True, max_completion_length=8)
    trl_model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    trainer = GRPOTrainer(model=trl_model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=config, processing_class=tok,
                          train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}]}] * 4))
    our_model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    our_model.eval()  # no dropout on our side either

    torch.manual_seed(0)
    prompts = [[{"role": "user", "content": t}] for t in ["Hello", "Anna has 3 apples and gets 4 more.", "你好", "Hi!"]]
    prompt_ids = common.prompt_token_ids(tok, prompts)
    completion_ids = [torch.randint(0, len(tok), (n,)).tolist() for n in (5, 8, 3, 6)]
    with torch.no_grad():
        logps, mask = common.completion_logps(our_model, prompt_ids, completion_ids, temperature)
    old_logps = (logps + 0.3 * torch.randn_like(logps)) * mask  # off-policy enough that clipping kicks in
    ref_logps = (logps + 0.5 * torch.randn_like(logps)) * mask
    advantages = gt.group_advantages(torch.tensor([1.0, -0.5, 2.0, 0.5]), 2)
    assert torch.allclose(advantages, torch.tensor([0.75, -0.75, 0.75, -0.75]))

    pad = tok.pad_token_id
    wp, wc = max(map(len, prompt_ids)), max(map(len, completion_ids))
    inputs = {"prompt_ids": torch.tensor([[pad] * (wp - len(p)) + p for p in prompt_ids]),
              "prompt_mask": torch.tensor([[0] * (wp - len(p)) + [1] * len(p) for p in prompt_ids]),
              "completion_ids": torch.tensor([c + [pad] * (wc - len(c)) for c in completion_ids]),
              "completion_mask": mask.long(), "advantages": advantages, "old_per_token_logps": old_logps,
              "ref_per_token_logps": ref_logps, "num_items_in_batch": mask.sum()}
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()

    our_logps, _ = common.completion_logps(our_model, prompt_ids, completion_ids, temperature)
    our_loss = gt.grpo_loss(our_logps, old_logps, ref_logps, advantages, mask)
    our_loss.backward()
    assert abs(trl_loss.item() - our_loss.item()) < 1e-5, (trl_loss.item(), our_loss.item())
    assert trainer._metrics["train"]["clip_ratio/region_mean"][-1] > 0  # the clipped branch was exercised
    trl_grads = dict(trainer.model.named_parameters())
    for name, p in our_model.named_parameters():
        assert torch.allclose(p.grad, trl_grads[name].grad, atol=1e-6, rtol=1e-4), name


def grpo_args(tiny_model_dir, out, *extra):
    return ["--sft-dir", tiny_model_dir, "--out-dir", out, "--num-prompts", 8, "--num-generations", 4,
            "--batch-size", 8, "--max-completion-length", 12, "--lr", 5e-3, "--save-steps", 2,
            "--eval-arithmetic", 8, "--eval-conversation", 4, *extra]


def test_grpo_trl_trains_logs_saves_and_resumes(rlhf_dir, tiny_model_dir):
    from safetensors.torch import load_file

    first = run_script("RLHF/grpo_trl.py", *grpo_args(tiny_model_dir, rlhf_dir, "--epochs", 1))
    history = [json.loads(line) for line in open(rlhf_dir / "grpo_output" / "history.jsonl")]
    steps = [h for h in history if "reward" in h]
    assert len(steps) == 4, first.stdout[-2000:]  # 8 prompts x 4 completions / 8 per step
    for key in ("reward", "reward_std", "kl", "completions/mean_length", "step_time",
                "rewards/reward_model_score/mean", "rewards/exact_answer/mean"):
        assert all(key in h for h in steps), key
    assert steps[-1]["kl"] > 0
    assert list((rlhf_dir / "runs" / "grpo").glob("events.out.tfevents.*"))

    # The merged model is the SFT policy changed by GRPO; the adapter is saved next to it.
    merged, sft = load_file(rlhf_dir / "grpo_output" / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(merged[k], sft[k]) for k in sft)
    assert (rlhf_dir / "grpo_output" / "adapter" / "adapter_config.json").is_file()
    ev = json.loads((rlhf_dir / "eval.json").read_text())
    assert ev["prompts"] == 12 and ev["kl_k1_per_token"] != 0
    for policy in ("sft", "grpo"):
        assert 0 <= ev[policy]["exact_answer_accuracy"] <= 1 and "reward_model_score" in ev[policy]

    # Rerun with more epochs: continues from the last checkpoint instead of starting over.
    second = run_script("RLHF/grpo_trl.py", *grpo_args(tiny_model_dir, rlhf_dir, "--epochs", 2))
    assert "resuming from" in second.stdout and "checkpoint-4" in second.stdout
    history = [json.loads(line) for line in open(rlhf_dir / "grpo_output" / "history.jsonl")]
    assert [h["step"] for h in history if "reward" in h] == list(range(1, 9))


def test_inference_uses_the_training_prompt_format(rlhf_dir, tiny_model_dir):
    if not (rlhf_dir / "grpo_output" / "config.json").is_file():
        run_script("RLHF/grpo_trl.py", *grpo_args(tiny_model_dir, rlhf_dir, "--epochs", 1))
    proc = run_script("RLHF/grpo_trl.py", "--mode", "inference", "--out-dir", rlhf_dir, "--prompt", "Hello",
                      "--prompt", "小明有3本书，又得到了4本书。小明现在一共有多少本书？", "--max-new-tokens", 16)
    assert proc.stdout.count("assistant:") == 2 and "user: Hello" in proc.stdout
    assert "<|" not in proc.stdout  # special tokens never leak into the printed answer
    tok = common.load_chat_tokenizer(rlhf_dir / "grpo_output")
    ids = common.prompt_token_ids(tok, [[{"role": "user", "content": "Hello"}]])[0]
    assert tok.decode(ids) == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"  # no extra BOS


def test_grpo_without_reward_model_fails_clearly(tmp_path, tiny_model_dir):
    proc = run_script("RLHF/grpo_trl.py", "--sft-dir", tiny_model_dir, "--out-dir", tmp_path, check=False)
    assert proc.returncode == 2 and "no reward model in" in proc.stderr and "reward_model.py" in proc.stderr


def test_grpo_trl_two_processes(rlhf_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    os.symlink(rlhf_dir / "reward_model", out / "reward_model")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           str(REPO / "RLHF" / "grpo_trl.py"),
                           *map(str, grpo_args(tiny_model_dir, out, "--epochs", 1, "--batch-size", 4))],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [json.loads(line) for line in open(out / "grpo_output" / "history.jsonl")]
    assert len([h for h in steps if "reward" in h]) == 4  # 32 completions / (4 per process x 2 processes)
    assert (out / "eval.json").is_file()


def test_plain_pytorch_grpo_trains(rlhf_dir, tiny_model_dir):
    proc = run_script("RLHF/grpo_training.py", "--sft-dir", tiny_model_dir, "--out-dir", rlhf_dir, "--num-prompts", 4,
                      "--prompts-per-step", 2, "--num-generations", 2, "--max-completion-length", 8, "--lr", 1e-3)
    logs = [json.loads(line) for line in open(rlhf_dir / "train.log") if '"grpo_training"' in line]
    assert len(logs) == 2 and all(log["kl"] >= 0 and "reward" in log for log in logs)
    assert (rlhf_dir / "checkpoints" / "grpo_training" / "config.json").is_file(), proc.stdout
