"""RLHF stage: embedded preference data, reward model (TRL RewardTrainer), GRPO with TRL and in plain PyTorch.

Everything runs on the tiny random GPT-2 of conftest as the "SFT policy" (a full model dir is accepted as --sft-dir)."""
import contextlib
import json
import os
import random
import shutil
import sys

from llm_train import sampling
from llm_train.arithmetic import arithmetic_tasks, extract_answer, problem_split
from llm_train.atomic import atomic_write_json
from llm_train.corpus import read_jsonl_gz
from llm_train.engine import generate_completions, prompt_room, prompt_token_ids
from llm_train.errors import UserError
from llm_train.lineage import output_fingerprint, read_lineage, write_lineage
from llm_train.rl import REFERENCE_DIR, load_policy, load_reward_model, rlhf_prompts
from llm_train.runtime import DTYPE_ENV, autocast, dtype_name
from llm_train.sampling import completion_logps
from llm_train.tokenizer import IM_END, PAD, load_chat_tokenizer
from llm_train.trainer_runs import checkpoint_to_resume

import pytest
import torch

from conftest import BOTH_DTYPES, REPO, free_port, load_script, run_group, run_script

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
DATA = REPO / "RLHF" / "data"
KINDS = {"wrong_number", "wrong", "rambling", "off_format", "truncated", "wrong_language"}


def jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def test_embedded_preference_data_is_sound():
    splits = {s: list(read_jsonl_gz(DATA / f"preference_{s}.jsonl.gz")) for s in ("train", "heldout")}
    for split, rows in splits.items():
        assert {r["kind"] for r in rows} == KINDS
        for r in rows:
            chosen, rejected = r["chosen"][-1]["content"], r["rejected"][-1]["content"]
            assert chosen != rejected and r["prompt"][-1]["role"] == "user"
            if r["source"] == "arithmetic":  # chosen is exactly right, and held-out problems are really held out
                assert extract_answer(chosen) == r["answer"]
                split_of = problem_split(r["prompt"][0]["content"])  # held out: other problems, or other wordings
                assert split_of == split if split == "train" else split_of in ("heldout", "heldout_wordings")
                if r["kind"] in ("wrong_number", "off_format", "truncated", "rambling"):
                    assert extract_answer(rejected) != r["answer"] or r["kind"] == "rambling"
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
    with pytest.raises(UserError) as e:
        rm.load_pairs([bad])
    assert str(bad) in str(e.value) and message in str(e.value)


def test_bad_preference_file_exits_2_and_writes_nothing(tmp_path, tiny_model_dir):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    out = tmp_path / "rlhf"
    proc = run_script("RLHF/reward_model.py", "--sft-dir", tiny_model_dir, "--data", bad, "--out-dir", out, check=False)
    assert proc.returncode == 2 and f"{bad} row 2" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "reward_model").exists()


@pytest.mark.parametrize("script, args, message", [
    ("reward_model", ["--batch-size", "0"], "--batch-size: must be at least 1"),
    ("reward_model", ["--micro-batch", "0"], "--micro-batch: must be at least 1"),
    ("grpo_trl", ["--micro-batch", "0"], "--micro-batch: must be at least 1"),
    ("reward_model", ["--max-steps", "0"], "--max-steps: must be at least 1"),
    ("reward_model", ["--lr", "-0.001"], "--lr: must be a positive number"),
    ("grpo_trl", ["--rm-weight", "-1"], "--rm-weight: must be 0 or a positive number"),
    ("grpo_trl", ["--num-generations", "1"], "--num-generations must be at least 2"),
    ("grpo_trl", ["--batch-size", "6", "--num-generations", "4"], "must be a multiple of --num-generations 4"),
    ("grpo_trl", ["--rm-weight", "0", "--exact-weight", "0"], "nothing to reward"),
    ("grpo_trl", ["--mode", "eval", "--temperature", "0"], "--temperature must be above 0 for training and evaluation"),
    ("grpo_training", ["--prompts-per-step", "0"], "--prompts-per-step: must be at least 1"),
])
def test_bad_numbers_are_usage_errors_at_parse_time(script, args, message, monkeypatch, capsys):
    """Checked by argparse before anything is loaded: exit 2 with a usage line, no traceback."""
    module = load_script(f"RLHF/{script}.py")
    monkeypatch.setattr(sys, "argv", [script, *args])
    parse = {"reward_model": lambda: module.build_parser().parse_args(), "grpo_trl": lambda: module.parse_args(),
             "grpo_training": lambda: module.main()}[script]  # grpo_training's main parses first
    with pytest.raises(SystemExit) as e:
        parse()
    assert e.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Reward model
@pytest.fixture(scope="module")
def rlhf_dir(tmp_path_factory, tiny_model_dir):
    """A reward model trained on the embedded pairs, in the layout of RLHF/ (shared by the GRPO tests)."""
    out = tmp_path_factory.mktemp("rlhf")
    run_script("RLHF/reward_model.py", "--sft-dir", tiny_model_dir, "--out-dir", out, "--max-steps", 60,
               "--batch-size", 16, "--lr", 3e-3, "--max-length", 96, "--save-steps", 30)
    return out


def test_reward_model_learns_the_pairs(rlhf_dir, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    report = json.loads((rlhf_dir / "reward_eval.json").read_text())
    held = report["heldout"]
    assert held["pairs"] > 300 and set(held["accuracy_by_kind"]) == KINDS
    # 60 steps on a random 2-layer model learn the surface kinds: pooled (~280 pairs, chance 0.5 +- 0.03), as one
    # kind alone (~70 pairs) swings by 0.1 between data draws (docs/experiments.md#reward-model)
    surface = ("off_format", "rambling", "truncated", "wrong_language")
    right = sum(held["accuracy_by_kind"][k] * held["pairs_by_kind"][k] for k in surface)
    assert right / sum(held["pairs_by_kind"][k] for k in surface) > 0.57, held
    model = AutoModelForSequenceClassification.from_pretrained(str(rlhf_dir / "reward_model"))
    tok = load_chat_tokenizer(rlhf_dir / "reward_model")
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id == tok.convert_tokens_to_ids(
        PAD)  # the score is read at the last token before padding
    # the reference is the policy the classifier started from, unchanged; the weight is the run's
    assert report["likelihood_weight"] == model.config.likelihood_weight >= 0
    reference = load_file(rlhf_dir / "reward_model" / REFERENCE_DIR / "model.safetensors")
    policy = load_file(tiny_model_dir / "model.safetensors")
    assert reference.keys() == policy.keys() and all(torch.equal(reference[k], policy[k]) for k in policy)
    assert any(json.loads(line).get("stage") == "reward_model" for line in open(rlhf_dir / "train.log"))
    assert list((rlhf_dir / "runs" / "reward_model").glob("events.out.tfevents.*"))
    lineage = read_lineage(rlhf_dir / "reward_model")
    assert lineage["stage"] == "reward_model" and lineage["settings"]["max_steps"] == 60
    assert lineage["parents"]["policy"]["fingerprint"] == output_fingerprint(tiny_model_dir)


def test_the_reward_is_the_classifier_score_plus_the_weighted_mean_log_likelihood_of_the_reply(rlhf_dir):
    """RewardModel.scores: the classifier's score + likelihood_weight x the mean log-probability under the reference
    of the reply's tokens only (its <|im_end|> included, the prompt's left out), whatever the batch's padding."""
    reward = load_reward_model(rlhf_dir / "reward_model")
    tok = reward.tokenizer
    prompts = [[{"role": "user", "content": "What is 47 + 38?"}], [{"role": "user", "content": "Hello there, how are you"}]]
    replies = ["47 + 38: 7 + 8 = 15, write 5 carry 1; 4 + 3 + 1 = 8. The answer is 85.", "Hi!"]
    weight = reward.likelihood_weight = 2.5
    for prompt, reply, score in zip(prompts, replies, reward.scores(prompts, replies)):
        asked = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=False)
        ids = tok(full, return_tensors="pt", add_special_tokens=False)["input_ids"]
        start = len(tok(asked, add_special_tokens=False)["input_ids"])
        assert tok.decode(ids[0, start:]).startswith(reply[:5]) and tok.decode(ids[0, -2:]).startswith(IM_END)
        with torch.no_grad():
            classifier = reward.classifier(input_ids=ids).logits[0, 0].item()
            log_probs = torch.log_softmax(reward.reference(input_ids=ids).logits[0, :-1], -1)
        reply_log_probs = log_probs[start - 1:].gather(1, ids[0, start:, None])
        assert score == pytest.approx(classifier + weight * reply_log_probs.mean().item(), abs=1e-4)


def test_the_classifier_trains_on_the_loss_of_the_whole_reward(rlhf_dir, tmp_path):
    """The reward model's training loss (TRL's, with our margin column) is -log sigmoid(classifier margin + weight x
    reference likelihood margin): the classifier learns what the weighted likelihood leaves, with the sign right."""
    rm = load_script("RLHF/reward_model.py")
    reward = load_reward_model(rlhf_dir / "reward_model")
    weight = reward.likelihood_weight = 2.0
    pairs = rm.load_pairs([DATA / "preference_heldout.jsonl.gz"])[::50]
    scores, likelihoods = rm.pair_margins(reward, pairs)
    assert min(map(abs, likelihoods)) > 0  # the term is there to be counted
    args = rm.apply_preset(rm.build_parser().parse_args(["--preset", "smoke", "--out-dir", str(tmp_path)]), rm.PRESETS,
                           "smoke")
    dataset = rm.pair_dataset(reward.tokenizer, pairs, 256, likelihoods, weight)
    trainer = rm.build_trainer(args, reward.classifier, reward.tokenizer, dataset, tmp_path / "checkpoints")
    batch = trainer.data_collator([dataset[i] for i in range(len(pairs))])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model.eval(), batch).item()
    expected = -torch.nn.functional.logsigmoid(torch.tensor(scores) + weight * torch.tensor(likelihoods)).mean()
    assert loss == pytest.approx(expected.item(), abs=1e-4)
    assert loss != pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(scores)).mean().item(), abs=1e-3)


def test_a_reward_model_without_its_reference_is_refused_with_what_to_run(rlhf_dir, tmp_path):
    old = tmp_path / "reward_model"
    shutil.copytree(rlhf_dir / "reward_model", old, ignore=shutil.ignore_patterns(REFERENCE_DIR))
    with pytest.raises(UserError, match="has no reference/.*RLHF/reward_model.py --force"):
        load_reward_model(old)


def test_length_slices_score_a_padded_batch_as_one_call_does_on_fewer_positions(tiny_model_dir):
    """The reward model's training scores each batch in slices of like length (RLHF/reward_model.py): the same
    scores, in the batch's order, as one call on the whole right-padded batch, for fewer token positions."""
    from transformers import AutoModelForSequenceClassification

    rm = load_script("RLHF/reward_model.py")
    tok = load_chat_tokenizer(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1).eval()
    model.config.pad_token_id = tok.pad_token_id
    rng = random.Random(0)
    lengths = [rng.choice([3, 5, 8, 40, 120]) for _ in range(13)]
    input_ids = torch.full((13, max(lengths)), tok.pad_token_id)
    mask = torch.zeros_like(input_ids)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = torch.randint(10, 200, (n,))
        mask[i, :n] = 1
    positions = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: positions.append(
        kwargs["input_ids"].numel()), with_kwargs=True)
    with torch.no_grad():
        whole = model(input_ids=input_ids, attention_mask=mask).logits
        sliced = rm.LengthSlices(model, 4)(input_ids=input_ids, attention_mask=mask).logits
    hook.remove()
    assert whole.shape == sliced.shape == (13, 1)
    torch.testing.assert_close(sliced, whole, atol=1e-5, rtol=1e-4)
    assert len(positions) == 1 + 4 and sum(positions[1:]) < 0.6 * positions[0]  # 792 of 1,560


def test_reward_model_trains_on_long_pairs_cut_as_scoring_cuts_them(tiny_model_dir, tmp_path):
    """Pairs longer than the model's context are trained on their last tokens, where the score is read and where
    scoring cuts them too (TRL itself drops them, so the model was judged on inputs it never saw). Every pair here is
    longer than the tiny model's 256 positions and differs from its partner only in the last words: learned."""
    rng = random.Random(0)
    words = "the cat sat on a mat while rain fell over hills and rivers".split()

    def pair(i):
        filler = " ".join(rng.choice(words) for _ in range(300))
        return {"prompt": [{"role": "user", "content": f"Tell me story number {i}."}],
                "chosen": [{"role": "assistant", "content": f"{filler}. The end, thank you."}],
                "rejected": [{"role": "assistant", "content": f"{filler} ?? ?? ?? ??"}]}

    for name, n in (("train.jsonl", 64), ("eval.jsonl", 32)):
        (tmp_path / name).write_text("".join(json.dumps(pair(i)) + "\n" for i in range(n)))
    out = tmp_path / "out"
    run_script("RLHF/reward_model.py", "--sft-dir", tiny_model_dir, "--out-dir", out, "--data", tmp_path / "train.jsonl",
               "--eval-data", tmp_path / "eval.jsonl", "--epochs", 2, "--batch-size", 8, "--lr", 3e-3,
               "--save-steps", 100)
    report = json.loads((out / "reward_eval.json").read_text())
    assert report["steps"] == 16  # every pair trained on: 64 pairs / 8 x 2 epochs
    assert report["heldout"]["accuracy"] > 0.9, report  # chance 0.5


def final_sentence_split(text):
    """(worked columns, final sentence) of a worked arithmetic answer."""
    at = max(text.rfind("The answer is"), text.rfind("答案是"))
    return text[:at], text[at:]


def test_wrong_worked_answers_get_the_number_wrong_and_the_embedded_data_has_a_contradiction_per_problem():
    """Every slip changes the final number; a "final" slip keeps the right columns and changes only the final
    sentence. The committed training pairs hold one such contradiction for every arithmetic problem (the reward
    model's weakest case), the held-out pairs none beyond the 1-in-5 mix."""
    build = load_script("RLHF/data/build_preference_data.py")
    rng = random.Random(0)
    for task in arithmetic_tasks(60, "train", seed=3):
        for slip in ("carry", "column", "final", None):
            wrong = build.wrong_worked_answer(rng, task, slip)
            assert extract_answer(wrong) not in (None, task["answer"]), (slip, wrong)
            if slip == "final":
                assert final_sentence_split(wrong)[0] == final_sentence_split(task["response"])[0]

    def contradictions(rows):
        return {json.dumps(r["prompt"], ensure_ascii=False) for r in rows if r["kind"] == "wrong_number" and
                final_sentence_split(r["rejected"][0]["content"])[0] ==
                final_sentence_split(r["chosen"][0]["content"])[0]}

    train = list(read_jsonl_gz(DATA / "preference_train.jsonl.gz"))
    problems = {json.dumps(r["prompt"], ensure_ascii=False) for r in train if r["source"] == "arithmetic"}
    assert len(problems) == 1200 and contradictions(train) == problems
    heldout = list(read_jsonl_gz(DATA / "preference_heldout.jsonl.gz"))
    assert len(contradictions(heldout)) < 20


def main_of(script, args):
    """Run a stage script's main() in this process with these command-line args; returns what it printed."""
    import contextlib
    import io

    module = load_script(script)
    out, argv = io.StringIO(), sys.argv
    sys.argv = [script, *map(str, args)]
    try:
        with contextlib.redirect_stdout(out):
            module.main()
    finally:
        sys.argv = argv
    return out.getvalue()


def small_pairs(tmp_path):
    """28 training and 8 held-out pairs from the embedded data: 7 steps per epoch at batch size 4."""
    rows = list(read_jsonl_gz(DATA / "preference_train.jsonl.gz"))[:36]
    for name, part in (("train.jsonl", rows[:28]), ("eval.jsonl", rows[28:])):
        (tmp_path / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    return ["--data", tmp_path / "train.jsonl", "--eval-data", tmp_path / "eval.jsonl"]


def test_reward_model_reruns_resumes_exactly_and_refuses_other_steps(tiny_model_dir, tmp_path):
    """A finished run rerun is a no-op; a different --max-steps than the checkpoints' run is a clear error (the
    cosine schedule of every step depends on it); a run killed after checkpoint-5 (simulated: a copy of its
    checkpoints without checkpoint-10) and rerun reproduces the uninterrupted run bit for bit (the loss logged at
    step 10 over steps 6-10, across the epoch boundary at step 7; the final weights; the whole run's train loss)."""
    def cmd(out, *extra):
        return ["--sft-dir", tiny_model_dir, "--out-dir", out, *small_pairs(tmp_path), "--max-steps", 10,
                "--save-steps", 5, "--batch-size", 4, "--lr", 1e-3, "--max-length", 96, *extra]

    def losses(out):
        return {r["step"]: r["loss"] for r in jsonl(out / "train.log") if "loss" in r}

    full = tmp_path / "full"
    run_script("RLHF/reward_model.py", *cmd(full))
    weights = (full / "reward_model" / "model.safetensors").read_bytes()
    report = json.loads((full / "reward_eval.json").read_text())
    assert report["steps"] == 10 and sorted(losses(full)) == [5, 10]

    # The same command again, in this process (the fast paths need no subprocess): nothing trained or rewritten.
    log_before, mtime = (full / "train.log").read_text(), (full / "reward_model" / "model.safetensors").stat().st_mtime
    assert "already finished with these settings; nothing to do" in main_of("RLHF/reward_model.py", cmd(full))
    assert (full / "train.log").read_text() == log_before
    assert (full / "reward_model" / "model.safetensors").stat().st_mtime == mtime
    with pytest.raises(UserError, match=r"--max-steps 10 there, 12 now\).*--force"):
        main_of("RLHF/reward_model.py", cmd(full, "--max-steps", 12))
    assert (full / "reward_model" / "model.safetensors").read_bytes() == weights

    killed = tmp_path / "killed"
    shutil.copytree(full / "checkpoints", killed / "checkpoints")
    shutil.rmtree(killed / "checkpoints" / "reward_model" / "checkpoint-10")
    resumed = run_script("RLHF/reward_model.py", *cmd(killed))
    assert "resuming from" in resumed.stdout and "checkpoint-5" in resumed.stdout
    assert losses(killed)[10] == losses(full)[10]
    assert (killed / "reward_model" / "model.safetensors").read_bytes() == weights
    assert json.loads((killed / "reward_eval.json").read_text())["train_loss"] == report["train_loss"]


def test_checkpoints_of_another_run_are_resumed_never_or_discarded_with_force(tmp_path, tiny_model_dir):
    ckpt = tmp_path / "ckpt"
    (ckpt / "checkpoint-3").mkdir(parents=True)
    (ckpt / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({"global_step": 3, "max_steps": 6}))
    write_lineage(ckpt, "grpo", {"epochs": 1, "lr": 1e-3}, policy=tiny_model_dir)

    def resume(settings, force=False, policy=tiny_model_dir):
        return checkpoint_to_resume(ckpt, "grpo", settings, force, ("epochs",), policy=policy)

    assert resume({"epochs": 1, "lr": 1e-3}) == (str(ckpt / "checkpoint-3"), False)  # the same run: resume
    assert resume({"epochs": 2, "lr": 1e-3}) == (str(ckpt / "checkpoint-3"), False)  # more epochs: continue
    for settings, why in (({"epochs": 1, "lr": 1e-3}, "--epochs 2 there, 1 now"),
                          ({"epochs": 2, "lr": 2e-3}, "--lr 0.001 there, 0.002 now")):
        with pytest.raises(UserError, match=f"holds checkpoints of another run \\({why}\\).*--force"):
            resume(settings)
    with pytest.raises(UserError, match="its policy was"):
        resume({"epochs": 2, "lr": 1e-3}, policy=tmp_path)
    assert resume({"epochs": 2, "lr": 2e-3}, force=True) == (None, False)
    assert not (ckpt / "checkpoint-3").exists() and read_lineage(ckpt)["settings"]["lr"] == 2e-3
    # A checkpoint at the run's last step is only loaded by the same run (the Trainer would train one step more).
    (ckpt / "checkpoint-6").mkdir()
    (ckpt / "checkpoint-6" / "trainer_state.json").write_text(json.dumps({"global_step": 6, "max_steps": 6}))
    assert resume({"epochs": 2, "lr": 2e-3}) == (str(ckpt / "checkpoint-6"), True)
    assert resume({"epochs": 3, "lr": 2e-3}) == (str(ckpt / "checkpoint-6"), False)


# ---------------------------------------------------------------------------------------------------------------
# GRPO: the loss equals TRL's, and is computed on the log-probabilities of the sampling pass.
def trl_trainer(tiny_model_dir, dtype, *flags):
    """GRPOTrainerFixed of grpo_trl.py with its GRPOConfig, on the tiny model (LoRA as in grpo_trl.py if asked)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    trl_script = load_script("RLHF/grpo_trl.py")
    args = trl_script.parse_args(["--sft-dir", str(tiny_model_dir), "--batch-size", "4", "--num-generations", "2",
                                  "--temperature", "0.7", "--max-completion-length", "8", *flags])
    tok = load_chat_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    trainer = trl_script.grpo_trainer_class()(
        model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=trl_script.grpo_config(args, "/tmp/unused", [1.0], dtype), processing_class=tok,
        train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}]}] * 4))
    return trainer, tok


@BOTH_DTYPES
def test_grpo_loss_and_gradients_match_trl(tiny_model_dir, dtype, monkeypatch):
    """The plain-PyTorch loss of grpo_training.py equals the compute_loss of grpo_trl.py's trainer (loss_type dapo,
    beta 0.05, no reward scaling) on the same left-padded batch, and so do the gradients; in bf16 both sides run
    under the same bf16 autocast over fp32 weights, as the Trainer's mixed precision does."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv(DTYPE_ENV, dtype)
    gt = load_script("RLHF/grpo_training.py")
    temperature = 0.7
    trainer, tok = trl_trainer(tiny_model_dir, dtype_name())
    our_model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()  # no dropout, as TRL
    cpu = torch.device("cpu")

    torch.manual_seed(0)
    prompts = [[{"role": "user", "content": t}] for t in ["Hello", "Anna has 3 apples and gets 4 more.", "你好", "Hi!"]]
    prompt_ids = prompt_token_ids(tok, prompts)
    completion_ids = [torch.randint(0, len(tok), (n,)).tolist() for n in (5, 8, 3, 6)]
    with torch.no_grad(), autocast(cpu, dtype):
        logps, mask = completion_logps(our_model, prompt_ids, completion_ids, temperature)
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
    assert trainer._metrics["train"]["clip_ratio/region_mean"][-1] > 0  # the clipped branch was exercised
    trl_grads = {n: p.grad for n, p in trainer.model.named_parameters()}

    def ours(adv=advantages, beta=gt.BETA):
        our_model.zero_grad()
        with autocast(cpu, dtype):
            our_logps, _ = completion_logps(our_model, prompt_ids, completion_ids, temperature)
        loss = gt.grpo_loss(our_logps, old_logps, ref_logps, adv, mask, beta=beta)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in our_model.named_parameters()}

    def grad_error(grads):  # the worst relative difference of any parameter's gradient
        return max(((g - trl_grads[n]).norm() / trl_grads[n].norm().clamp(min=1e-12)).item() for n, g in grads.items())

    # fp32: the same sums in another order (TRL's chunked log-softmax): measured loss difference 0, gradients 4e-7
    # relative. bf16: both sides round the logits to bf16 alike (measured loss difference 3e-8), but TRL's fused head
    # accumulates its backward in fp32 where autograd runs the matmul backward in bf16 (8-bit mantissa): measured
    # 5.5e-3 relative on the worst parameter, so 1.2e-2 leaves 2x room.
    loss_tol, grad_tol = (1e-5, 1e-5) if dtype == "fp32" else (1e-4, 1.2e-2)
    loss, grads = ours()
    assert abs(trl_loss.item() - loss) < loss_tol, (trl_loss.item(), loss)
    assert grad_error(grads) < grad_tol, grad_error(grads)
    # The mistakes this test exists to catch fail it in both dtypes, on the loss and on the gradients: measured
    # 0.46 / 170% for a flipped advantage sign, 4.4e-3 / 3.5% for a missing KL term (beta 0.05 makes it small).
    for wrong in (ours(adv=-advantages), ours(beta=0.0)):
        assert abs(trl_loss.item() - wrong[0]) > 10 * loss_tol and grad_error(wrong[1]) > 2 * grad_tol, wrong[0]


@contextlib.contextmanager
def recorded_sampling_logits():
    """Within it, every step of llm_train.engine's batch loop appends the logits it returned (what the next token was
    sampled from), one row per batch row."""
    from llm_train.engine import GPT2Decoder

    steps, originals = [], {name: getattr(GPT2Decoder, name) for name in ("prefill", "step")}

    def recording(method):
        def run(self, *args):
            logits = method(self, *args)
            steps.append(logits.float())
            return logits
        return run

    for name, method in originals.items():
        setattr(GPT2Decoder, name, recording(method))
    try:
        yield steps
    finally:
        for name, method in originals.items():
            setattr(GPT2Decoder, name, method)


def test_logps_of_the_loss_are_those_of_the_sampling_pass(tiny_model_dir):
    """For left-padded prompts of different lengths, the per-token log-probabilities that enter the loss equal those
    the tokens were sampled with, in grpo_training.py (completion_logps) and in grpo_trl.py's trainer. Scored at
    arange positions (what TRL does without the fix), the padded rows differ. grpo_trl.py's plain log-softmax of the
    completion positions (in chunks of rows) gives TRL's chunked kernel's log-probs and entropies."""
    from trl import GRPOTrainer

    temperature = 0.7
    texts = ["Hi", "Anna has 31 apples and gets 47 more. How many apples does Anna have now?", "你好吗？", "Hello there"]
    prompts = [[{"role": "user", "content": t}] for t in texts]
    tok = load_chat_tokenizer(tiny_model_dir)
    widths = [len(p) for p in prompt_token_ids(tok, prompts)]
    assert max(widths) - min(widths) > 10  # rows with lots of padding

    def sampled(steps, ids):  # log-prob of each sampled token under the logits it was sampled from
        return [[torch.log_softmax(steps[j][b] / temperature, -1)[t].item() for j, t in enumerate(row)]
                for b, row in enumerate(ids)]

    # grpo_training.py: generate_completions samples, completion_logps scores.
    model = load_policy(tiny_model_dir, tiny_model_dir)[0].eval()
    torch.manual_seed(0)
    with recorded_sampling_logits() as steps:
        ids, _ = generate_completions(model, tok, prompts, 8, do_sample=True, temperature=temperature)
    with torch.no_grad():
        logps, mask = completion_logps(model, prompt_token_ids(tok, prompts), ids, temperature)
    expected = sampled(steps, ids)
    for b, row in enumerate(ids):
        assert torch.allclose(logps[b, :len(row)], torch.tensor(expected[b]), atol=1e-4), b

    # grpo_trl.py: TRL's own generation and the log-probabilities its loss uses (policy; reference = SFT weights).
    trainer, _ = trl_trainer(tiny_model_dir, "fp32")
    trainer.model.train()  # groups of num_generations, as in training (dropout is off)
    with recorded_sampling_logits() as steps:
        batch = trainer._generate_and_score_completions([{"prompt": p} for p in prompts for _ in range(2)])
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    n = batch["completion_ids"].size(1)
    cmask = batch["completion_mask"].bool()
    ids = [row[m].tolist() for row, m in zip(batch["completion_ids"], cmask)]
    expected = torch.zeros_like(cmask, dtype=torch.float32)
    expected[cmask] = torch.tensor([x for row in sampled(steps, ids) for x in row])
    with torch.no_grad():
        policy, entropy, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention, n,
                                                                        batch_size=3, compute_entropy=True)
        unfixed = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, input_ids, attention, n)[0]

        def at_sampling_positions(**inputs):  # TRL's own (chunked) log-probs and entropies at the right positions
            return trainer.model(**inputs, position_ids=sampling.position_ids(inputs["attention_mask"]))

        trl_logps, trl_entropy, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, at_sampling_positions, input_ids, attention, n, compute_entropy=True)
    assert torch.allclose(policy[cmask], expected[cmask], atol=1e-4)
    assert torch.allclose(batch["ref_per_token_logps"][cmask], expected[cmask], atol=1e-4)
    assert (unfixed[cmask] - expected[cmask]).abs().max() > 0.05  # the bug the fix removes
    assert torch.allclose(policy, trl_logps, atol=1e-4) and torch.allclose(entropy, trl_entropy, atol=1e-4)
    assert entropy[cmask].min() > 0


def test_grpo_groups_are_drawn_by_our_engine_and_cut_after_the_first_stop(tiny_model_dir):
    """The trainer samples its groups with llm_train.engine's draw (generate()'s multinomial is slow on CPU): from the
    same seed, the same tokens as Engine.generate at the training temperature, each completion cut after its first
    stop token (which it keeps), as TRL cuts them."""
    from llm_train.engine import Engine, Sampling

    trainer, tok = trl_trainer(tiny_model_dir, "fp32", "--max-completion-length", "24")
    prompts = prompt_token_ids(tok, [[{"role": "user", "content": t}] for t in ("Hi", "What is 29 + 82?", "你好")])
    width = max(map(len, prompts))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in prompts])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompts])

    def both(stops):  # the trainer's groups and the engine's tokens, each from seed 3
        trainer.eos_token_ids = stops
        torch.manual_seed(3)
        completions = trainer._generate_single_turn(prompts, None, {}, 2)[0]
        torch.manual_seed(3)
        new = Engine(trainer.model, tok, stops=stops).generate(input_ids, 24, Sampling(temperature=0.7),
                                                                attention_mask=mask)
        return completions, new.tolist()

    completions, new = both(trainer.eos_token_ids)
    assert completions == new  # the tiny random model never says <|im_end|> here: 24 tokens each
    completions, new = both([new[0][5]])  # a token the first row samples: it stops there (the others where they may)
    for got, row in zip(completions, new):
        ends = [i for i, t in enumerate(row) if t == new[0][5]]
        assert got == (row[:ends[0] + 1] if ends else row)
    assert len(completions[0]) <= 6 and completions[0][-1] == new[0][5]
    torch.manual_seed(4)
    assert trainer._generate_single_turn(prompts, None, {}, 2)[0] != completions  # sampled, not greedy


# ---------------------------------------------------------------------------------------------------------------
# GRPO runs
def grpo_args(tiny_model_dir, out, *extra):
    return ["--preset", "smoke", "--sft-dir", tiny_model_dir, "--out-dir", out, "--num-prompts", 8,
            "--num-generations", 4, "--batch-size", 8, "--max-completion-length", 12, "--lr", 5e-3, "--warmup-steps", 3,
            "--save-steps", 2, "--eval-arithmetic", 8, "--eval-conversation", 4, *extra]


def test_reward_functions_score_known_completions(rlhf_dir, tiny_model_dir):
    """The rewards GRPO optimises: 1 for a completion with the exact answer, 0 for a wrong one, none for a chat
    prompt; the reward-model reward is the reward model's score of the conversation."""
    trl_script = load_script("RLHF/grpo_trl.py")
    args = trl_script.parse_args(["--preset", "smoke", "--sft-dir", str(tiny_model_dir), "--out-dir", str(rlhf_dir)])
    (rm_reward, exact), weights = trl_script.reward_functions(args, torch.device("cpu"))
    assert weights == [1.0, 1.0]
    task = arithmetic_tasks(1, "train")[0]
    prompts = [[{"role": "user", "content": task["prompt"]}]] * 2 + [[{"role": "user", "content": "Hello"}]]
    completions = [[{"role": "assistant", "content": c}] for c in
                   (task["response"], f"The answer is {task['answer'] + 1}.", "Hi!")]
    assert exact(prompts, completions, answer=[task["answer"], task["answer"], None]) == [1.0, 0.0, None]
    # the reward model scores only the prompts without a checkable answer
    rewards = rm_reward(prompts, completions, answer=[task["answer"], task["answer"], None])
    chat_score = load_reward_model(rlhf_dir / "reward_model").scores(prompts[2:], ["Hi!"])[0]
    assert rewards[:2] == [None, None] and rewards[2] == pytest.approx(chat_score, abs=1e-5)


def test_grpo_trl_trains_logs_saves_and_resumes_exactly(rlhf_dir, tiny_model_dir, tmp_path):
    """Two epochs (4 steps each) uninterrupted, against the same run killed after checkpoint-6 (simulated: its
    checkpoints without checkpoint-8) and rerun: the rerun logs the same rewards, losses and KL at steps 7-8 (the
    second epoch's prompt order, the sampling RNG and the optimizer restored) and saves the same model."""
    from safetensors.torch import load_file

    proc = run_script("RLHF/grpo_trl.py", *grpo_args(tiny_model_dir, rlhf_dir, "--epochs", 2, "--eval-every", 4))
    assert "8 completions per optimizer step = 1 process x 8 per device x 1 accumulation step" in proc.stdout
    history = jsonl(rlhf_dir / "grpo_output" / "history.jsonl")
    steps = [h for h in history if "reward" in h]
    assert [h["step"] for h in steps] == list(range(1, 9))  # 8 prompts x 4 completions / 8 per step, 2 epochs
    heldout = [h for h in history if "heldout/exact_answer" in h]  # before the first step, then every 4th
    assert [h["step"] for h in heldout] == [0, 4, 8]
    assert all(0 <= h[k] <= 1 for h in heldout for k in ("heldout/exact_answer", "heldout/sampled_exact_answer"))
    for key in ("reward", "reward_std", "kl", "completions/mean_length", "step_time",
                "rewards/reward_model_score/mean", "rewards/exact_answer/mean"):
        assert all(key in h for h in steps), key
    # Step 1 measures the untrained policy against itself (the LoRA update starts at zero); then it moves away.
    assert abs(steps[0]["kl"]) < 1e-6 and steps[-1]["kl"] > 1e-4, [h["kl"] for h in steps]
    lrs = [h["learning_rate"] for h in steps]  # 3 warm-up steps (the first at lr 0), then constant
    assert lrs == pytest.approx([0, 5e-3 / 3, 1e-2 / 3] + [5e-3] * 5), lrs
    assert list((rlhf_dir / "runs" / "grpo").glob("events.out.tfevents.*"))

    # The merged model is the SFT policy changed by GRPO; the adapter is saved next to it.
    merged, sft = load_file(rlhf_dir / "grpo_output" / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(merged[k], sft[k]) for k in sft)
    assert (rlhf_dir / "grpo_output" / "adapter" / "adapter_config.json").is_file()
    # The smoke preset trains the logits' scale too: the merged final norm is the SFT one times the learned scale.
    ev = json.loads((rlhf_dir / "eval.json").read_text())
    scale = ev["logit_scale"]
    assert abs(scale - 1) > 1e-3, scale
    for key in ("transformer.ln_f.weight", "transformer.ln_f.bias"):
        assert torch.allclose(merged[key], sft[key] * scale, rtol=1e-5, atol=1e-7), key
    lineage = read_lineage(rlhf_dir / "grpo_output")
    assert set(lineage["parents"]) == {"policy", "reward_model"}
    assert ev["prompts"] == 12 and ev["arithmetic_prompts"] == 8
    assert ev["kl_k3_per_token"] > 1e-4 and "reward_model_score" in ev["grpo"]
    # The same evaluation of the SFT policy against itself: KL 0.
    trl_script = load_script("RLHF/grpo_trl.py")
    assert ev["sampling"] == {"temperature": 1.0, "samples_per_problem": trl_script.SAMPLES}  # the smoke preset's
    assert all(0 <= ev[m]["sampled_exact_answer_accuracy"] <= 1 for m in ("sft", "grpo"))
    args = trl_script.parse_args(list(map(str, grpo_args(tiny_model_dir, tmp_path))))
    sft_model, tok = load_policy(tiny_model_dir, tiny_model_dir)
    itself = trl_script.evaluate(args, sft_model, tok)
    assert abs(itself["kl_k1_per_token"]) < 1e-6 and abs(itself["kl_k3_per_token"]) < 1e-6
    assert itself["sft"] == itself["grpo"] and itself["logit_scale"] == 1.0  # same answers, scores and logits

    again = main_of("RLHF/grpo_trl.py", grpo_args(tiny_model_dir, rlhf_dir, "--epochs", 2))
    assert "already finished with these settings; nothing to do" in again

    killed = tmp_path / "killed"
    killed.mkdir()
    os.symlink(rlhf_dir / "reward_model", killed / "reward_model")
    shutil.copytree(rlhf_dir / "checkpoints" / "grpo", killed / "checkpoints" / "grpo")
    shutil.rmtree(killed / "checkpoints" / "grpo" / "checkpoint-8")
    # resumed with a held-out evaluation after every step: it samples too, and leaves training's samples as they were
    resumed = run_script("RLHF/grpo_trl.py", *grpo_args(tiny_model_dir, killed, "--epochs", 2, "--eval-every", 1))
    assert "resuming from" in resumed.stdout and "checkpoint-6" in resumed.stdout
    resumed_history = jsonl(killed / "grpo_output" / "history.jsonl")
    assert [h["step"] for h in resumed_history if "heldout/exact_answer" in h] == [0, 4, 7, 8]  # 0, 4: copied
    mine = [h for h in resumed_history if "reward" in h]
    for key in ("reward", "loss", "kl", "completions/mean_length"):
        assert [h[key] for h in mine] == [h[key] for h in steps], key
    assert (killed / "grpo_output" / "model.safetensors").read_bytes() == \
        (rlhf_dir / "grpo_output" / "model.safetensors").read_bytes()
    assert '"event": "resume"' in (killed / "train.log").read_text()


def other_policy(tiny_model_dir, path):
    """A model dir like tiny_model_dir with other weights: a retrained SFT policy."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny_model_dir, path)
    model = AutoModelForCausalLM.from_pretrained(str(path))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1.5)
    model.save_pretrained(str(path))
    return path


def test_grpo_checks_that_policy_reward_model_and_output_belong_together(rlhf_dir, tiny_model_dir, tmp_path):
    if not (rlhf_dir / "grpo_output" / "config.json").is_file():
        run_script("RLHF/grpo_trl.py", *grpo_args(tiny_model_dir, rlhf_dir, "--epochs", 1))
    other = other_policy(tiny_model_dir, tmp_path / "other_sft")
    # Training on another policy with the reward model built on the first one: a clear error, exit 2.
    proc = run_script("RLHF/grpo_trl.py", "--sft-dir", other, "--out-dir", rlhf_dir, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    message = f"{rlhf_dir / 'reward_model'} was built from a different policy than the one in {other}"
    assert message in proc.stderr and f"python RLHF/reward_model.py --sft-dir {other}" in proc.stderr
    with pytest.raises(UserError, match=message):  # the same check in the plain-PyTorch twin
        main_of("RLHF/grpo_training.py", ["--sft-dir", other, "--out-dir", rlhf_dir])
    # Evaluating grpo_output against another SFT policy than its own.
    with pytest.raises(UserError, match=f"{rlhf_dir / 'grpo_output'} was built from a different policy"):
        main_of("RLHF/grpo_trl.py", ["--mode", "eval", "--sft-dir", other, "--out-dir", rlhf_dir])
    # Inference with a grpo_output whose policy was replaced since (its lineage now points at the other one).
    copy = tmp_path / "copy"
    shutil.copytree(rlhf_dir / "grpo_output", copy / "grpo_output")
    lineage = read_lineage(copy / "grpo_output")
    lineage["parents"]["policy"]["path"] = str(other)
    atomic_write_json(copy / "grpo_output" / "lineage.json", lineage)
    with pytest.raises(UserError, match=f"than the one in {other}"):
        main_of("RLHF/grpo_trl.py", ["--mode", "inference", "--out-dir", copy, "--prompt", "Hi"])


def test_inference_uses_the_training_prompt_format(rlhf_dir, tiny_model_dir):
    if not (rlhf_dir / "grpo_output" / "config.json").is_file():
        run_script("RLHF/grpo_trl.py", *grpo_args(tiny_model_dir, rlhf_dir, "--epochs", 1))
    proc = run_script("RLHF/grpo_trl.py", "--mode", "inference", "--out-dir", rlhf_dir, "--prompt", "Hello",
                      "--prompt", "小明有3本书，又得到了4本书。小明现在一共有多少本书？", "--max-new-tokens", 16)
    assert proc.stdout.count("assistant:") == 2 and "user: Hello" in proc.stdout
    assert "<|" not in proc.stdout  # special tokens never leak into the printed answer
    tok = load_chat_tokenizer(rlhf_dir / "grpo_output")
    ids = prompt_token_ids(tok, [[{"role": "user", "content": "Hello"}]])[0]
    assert tok.decode(ids) == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"  # no extra BOS


def test_grpo_without_reward_model_fails_clearly(tmp_path, tiny_model_dir):
    proc = run_script("RLHF/grpo_trl.py", "--sft-dir", tiny_model_dir, "--out-dir", tmp_path, check=False)
    assert proc.returncode == 2 and "no reward model in" in proc.stderr and "reward_model.py" in proc.stderr


def test_grpo_trl_two_processes(rlhf_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    os.symlink(rlhf_dir / "reward_model", out / "reward_model")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_group([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                      f"--master_port={free_port()}", str(REPO / "RLHF" / "grpo_trl.py"),
                      *map(str, grpo_args(tiny_model_dir, out, "--epochs", 1, "--eval-every", 2))],
                     timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # --batch-size 8 is the global batch: the 1-process run of test_grpo_trl_trains_logs_saves_and_resumes_exactly
    # takes 8 completions per step on its own
    assert "8 completions per optimizer step = 2 processes x 4 per device x 1 accumulation step" in proc.stdout
    steps = jsonl(out / "grpo_output" / "history.jsonl")
    assert len([h for h in steps if "reward" in h]) == 4  # 32 completions / (4 per process x 2 processes)
    assert [h["step"] for h in steps if "heldout/exact_answer" in h] == [0, 2, 4]  # by rank 0 alone
    assert read_lineage(out / "grpo_output")["settings"]["processes"] == 2
    assert (out / "eval.json").is_file()


def test_grpo_qlora_trains_the_logit_scale_over_4bit_weights(rlhf_dir, tiny_model_dir, tmp_path):
    """--qlora: the policy's weights in 4-bit NF4 (bitsandbytes) under LoRA; TRL casts the trained copy of the final
    norm to bf16 there, which the scaled norm must take. The merged model is the full-precision SFT policy with the
    LoRA merged in and the final norm times the learned scale."""
    from safetensors.torch import load_file

    out = tmp_path / "qlora"
    out.mkdir()
    os.symlink(rlhf_dir / "reward_model", out / "reward_model")
    run_script("RLHF/grpo_trl.py", *grpo_args(tiny_model_dir, out, "--epochs", 1, "--qlora", "--eval-arithmetic", 4,
                                              "--eval-conversation", 0))
    scale = json.loads((out / "eval.json").read_text())["logit_scale"]
    merged, sft = load_file(out / "grpo_output" / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert abs(scale - 1) > 1e-3, scale
    assert torch.allclose(merged["transformer.ln_f.weight"], sft["transformer.ln_f.weight"] * scale, rtol=1e-2)


def test_grpo_trl_leaves_out_prompts_that_leave_no_room_for_the_completion(rlhf_dir, tiny_model_dir, tmp_path):
    """TRL generates from the whole prompt: a prompt longer than the context minus --max-completion-length is left
    out (and counted) instead of generating past GPT-2's last position (IndexError in the position table)."""
    tok = load_chat_tokenizer(tiny_model_dir)
    prompts = rlhf_prompts("train", 6, 2, seed=0)  # what --num-prompts 8 trains on
    lengths = [len(x) for x in prompt_token_ids(tok, [p["prompt"] for p in prompts])]
    room = max(n for n in lengths if sum(m > n for m in lengths) >= 2)  # at least two prompts are longer
    out = tmp_path / "long"
    out.mkdir()
    os.symlink(rlhf_dir / "reward_model", out / "reward_model")
    proc = run_script("RLHF/grpo_trl.py", *grpo_args(tiny_model_dir, out, "--epochs", 1, "--max-completion-length",
                                                     256 - room, "--eval-arithmetic", 4, "--eval-conversation", 0,
                                                     "--logit-scale-lr", 0))
    left_out = sum(n > room for n in lengths)
    assert left_out >= 2 and f"{8 - left_out} prompts ({left_out} left out: longer than {room} tokens)" in proc.stdout
    assert json.loads((out / "eval.json").read_text())["logit_scale"] == 1.0  # the final norm stayed frozen


def test_plain_pytorch_grpo_trains(rlhf_dir, tiny_model_dir):
    run_script("RLHF/grpo_training.py", "--sft-dir", tiny_model_dir, "--out-dir", rlhf_dir, "--num-prompts", 4,
               "--prompts-per-step", 2, "--num-generations", 2, "--max-completion-length", 8, "--lr", 1e-3,
               "--epochs", 2)
    logs = [r for r in jsonl(rlhf_dir / "train.log") if r.get("stage") == "grpo_training"]
    assert [r["step"] for r in logs] == [1, 2, 3, 4]
    # Before the first update the policy is its own reference (dropout off, as TRL): KL 0; after an update, KL > 0
    # (the untrained policy never answers exactly: only the chat prompt's reward-model scores move it).
    assert abs(logs[0]["kl"]) < 1e-6 and logs[-1]["kl"] > 1e-4, logs
    out = rlhf_dir / "checkpoints" / "grpo_training"
    assert read_lineage(out)["parents"]["policy"]["fingerprint"] == output_fingerprint(tiny_model_dir)


def test_prompts_longer_than_the_context_are_cut_the_same_for_sampling_and_scoring(tiny_model_dir):
    """A chat prompt longer than the context keeps its end in generation, and the log-probs of the completion are
    computed on that same cut prompt (the evaluation's KL used to index past the position table)."""
    from transformers import AutoModelForCausalLM

    tok = load_chat_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids(IM_END), tok.eos_token_id]
    long_prompt = [[{"role": "user", "content": "Tell me more. " * 200}], [{"role": "user", "content": "Hi"}]]
    torch.manual_seed(0)
    ids, _ = generate_completions(model, tok, long_prompt, 8, do_sample=True)
    room = prompt_room(model, 8)
    cut = prompt_token_ids(tok, long_prompt, room)
    assert len(cut[0]) == room == model.config.n_positions - 8 and len(cut[1]) < room
    with torch.no_grad():
        logps, mask = completion_logps(model, cut, ids)
    assert mask.sum().item() == sum(map(len, ids)) and (logps[mask.bool()] < 0).all()


# ---------------------------------------------------------------------------------------------------------------
# The stage protocol's holes, closed: each is one clear error, or a no-op rerun.
def lora_adapter(base_dir, path):
    """A LoRA adapter on base_dir saved like SFT's sft_output (lineage.json names its base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)), LoraConfig(
        r=4, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"))
    model.save_pretrained(str(path))
    write_lineage(path, "sft", {}, base=base_dir)
    return path


def test_a_missing_sft_dir_is_one_clear_error(tiny_model_dir, tmp_path):
    """The reward model used to train from the pretrained base when --sft-dir did not exist, and exit 0."""
    missing = tmp_path / "no_such_sft_output"
    proc = run_script("RLHF/reward_model.py", "--sft-dir", missing, "--base-dir", tiny_model_dir, "--out-dir",
                      tmp_path / "rm", *small_pairs(tmp_path), "--max-steps", 1, "--batch-size", 4, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"error: SFT directory {missing} does not exist" in proc.stderr
    assert not (tmp_path / "rm" / "reward_model").exists()
    with pytest.raises(UserError, match=f"SFT directory {missing} does not exist"):
        main_of("RLHF/grpo_trl.py", grpo_args(missing, tmp_path / "grpo", "--rm-weight", 0))


def test_an_adapter_on_a_replaced_base_is_refused_by_every_loader_of_the_policy(tiny_model_dir, tmp_path):
    """The reward model and GRPO (without a reward model) trained on an SFT adapter whose base was replaced since:
    the lineage check of SFT inference is in load_policy/find_policy now, so every stage that loads the policy has it."""
    adapter = lora_adapter(tiny_model_dir, tmp_path / "sft_output")
    assert load_policy(adapter, tiny_model_dir)[0] is not None  # its own base: fine
    other_base = other_policy(tiny_model_dir, tmp_path / "other_base")
    message = f"{adapter} was built from a different base than the one in {other_base}"
    with pytest.raises(UserError, match=message) as error:
        load_policy(adapter, other_base)
    assert "Rebuild it with `python SFT/qlora_fine_tune_trl.py --model-dir" in str(error.value)
    with pytest.raises(UserError, match=message):
        main_of("RLHF/reward_model.py", ["--sft-dir", adapter, "--base-dir", other_base, "--out-dir", tmp_path / "rm",
                                         *small_pairs(tmp_path), "--max-steps", 1, "--batch-size", 4])
    with pytest.raises(UserError, match=message):
        main_of("RLHF/grpo_trl.py", grpo_args(adapter, tmp_path / "grpo", "--base-dir", other_base,
                                              "--rm-weight", 0))
    assert not (tmp_path / "rm").exists() and not (tmp_path / "grpo").exists()


def test_an_unwritable_checkpoint_dir_is_one_clear_error(rlhf_dir, tiny_model_dir, tmp_path):
    """A --checkpoint-dir under a regular file (tests run as root: chmod would not stop them) used to end in a
    traceback from the first checkpoint write."""
    (tmp_path / "a_file").write_text("")
    ckpt = tmp_path / "a_file" / "checkpoints"
    proc = run_script("RLHF/reward_model.py", "--sft-dir", tiny_model_dir, "--out-dir", tmp_path / "rm",
                      "--checkpoint-dir", ckpt, *small_pairs(tmp_path), "--max-steps", 1, "--batch-size", 4,
                      check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"error: cannot write to output directory {ckpt}" in proc.stderr
    with pytest.raises(UserError, match=f"cannot write to output directory {ckpt}"):
        main_of("RLHF/grpo_trl.py", grpo_args(tiny_model_dir, tmp_path / "grpo", "--rm-weight", 0,
                                              "--checkpoint-dir", ckpt))


def test_plain_pytorch_grpo_rerun_is_a_noop(rlhf_dir, tiny_model_dir):
    args = ["--sft-dir", tiny_model_dir, "--out-dir", rlhf_dir, "--num-prompts", 4, "--prompts-per-step", 4,
            "--num-generations", 2, "--max-completion-length", 4, "--rm-weight", 0, "--seed", 7]
    run_script("RLHF/grpo_training.py", *args)
    weights = rlhf_dir / "checkpoints" / "grpo_training" / "model.safetensors"
    log, mtime = (rlhf_dir / "train.log").read_text(), weights.stat().st_mtime_ns
    assert "already finished with these settings; nothing to do" in main_of("RLHF/grpo_training.py", args)
    assert (rlhf_dir / "train.log").read_text() == log and weights.stat().st_mtime_ns == mtime


def test_a_resume_between_two_logging_steps_logs_the_uninterrupted_losses(tiny_model_dir, tmp_path):
    """The loss is logged every 5 steps as the mean since the last log; a run resumed from checkpoint-9 used to log
    at step 10 the loss of step 10 alone instead of the mean over steps 6-10 (the checkpoint did not hold the loss
    summed since step 5): the Trainer's logging window is kept across the resume (train_or_finish)."""
    def cmd(out):
        return ["--sft-dir", tiny_model_dir, "--out-dir", out, *small_pairs(tmp_path), "--max-steps", 10,
                "--save-steps", 3, "--batch-size", 4, "--lr", 1e-3, "--max-length", 96]

    def losses(out):
        return {r["step"]: r["loss"] for r in jsonl(out / "train.log") if "loss" in r}

    full, killed = tmp_path / "full", tmp_path / "killed"
    run_script("RLHF/reward_model.py", *cmd(full))
    shutil.copytree(full / "checkpoints", killed / "checkpoints")
    shutil.rmtree(killed / "checkpoints" / "reward_model" / "checkpoint-10")
    resumed = run_script("RLHF/reward_model.py", *cmd(killed))
    assert "checkpoint-9" in resumed.stdout
    assert sorted(losses(full)) == [5, 10] and losses(killed) == {10: losses(full)[10]}
    assert (killed / "reward_model" / "model.safetensors").read_bytes() == \
        (full / "reward_model" / "model.safetensors").read_bytes()
