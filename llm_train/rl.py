"""What post-training (reward model, GRPO) and the chat front ends share: the SFT policy and its prompts, the reward
model and its scores, and the exact-answer reward.

torch and transformers are imported inside the functions, so importing this stays cheap."""
import json
from pathlib import Path

from llm_train.arithmetic import arithmetic_tasks, cell, evaluation_tasks, extract_answer
from llm_train.corpus import read_jsonl_gz
from llm_train.engine import stop_token_ids
from llm_train.errors import UserError
from llm_train.lineage import check_lineage
from llm_train.paths import OUTPUT_DIR, PREFERENCE_FILES, SFT_OUTPUT_DIR
from llm_train.tokenizer import load_chat_tokenizer
from llm_train.trainer_runs import rerun_command


REFERENCE_DIR = "reference"  # in the reward model's dir: the SFT policy whose likelihoods the reward adds


class NoSFTModel(UserError):
    """--sft-dir exists but holds no model (the reward model then starts from the pretrained base)."""


def find_policy(sft_dir, base_dir):
    """Where the SFT policy is: ('full', dir) for a full model dir (SFT's merged/ or any HF causal LM),
    ('adapter', sft_dir) for a LoRA adapter on base_dir, or a UserError saying what to run first. SFT's outputs
    must have been trained on base_dir as it is now (their lineage.json says; a UserError otherwise), so that no
    later stage trains on an adapter whose base was replaced."""
    sft_dir, base_dir = Path(sft_dir), Path(base_dir)
    if not sft_dir.exists():
        raise UserError(f"SFT directory {sft_dir} does not exist: pass the --sft-dir that "
                        "`python SFT/qlora_fine_tune_trl.py` wrote (default SFT/sft_output)")
    if (sft_dir / "merged" / "config.json").is_file():
        kind, path = "full", sft_dir / "merged"
    elif (sft_dir / "adapter_config.json").is_file():
        if not (base_dir / "config.json").is_file():
            raise UserError(f"{sft_dir} holds a LoRA adapter but its base model {base_dir} is missing: "
                            "pretrain first or pass --base-dir")
        kind, path = "adapter", sft_dir
    elif (sft_dir / "config.json").is_file():
        kind, path = "full", sft_dir
    else:
        raise NoSFTModel(f"no SFT model in {sft_dir}: run `python SFT/qlora_fine_tune_trl.py` first "
                         "(or pass --sft-dir DIR with a Hugging Face causal LM)")
    rebuild = rerun_command("SFT/qlora_fine_tune_trl.py" + (" --merge" if path != sft_dir else ""),
                            model_dir=(base_dir, OUTPUT_DIR), output_dir=(sft_dir, SFT_OUTPUT_DIR))
    check_lineage(path, rebuild, base=base_dir)
    return kind, path


def policy_parents(sft_dir, base_dir):
    """The lineage parents of an output built on the SFT policy: {'policy': the dir find_policy picks, 'base': the
    base model an adapter sits on (None for a full model)}."""
    kind, path = find_policy(sft_dir, base_dir)
    return {"policy": path, "base": base_dir if kind == "adapter" else None}


def load_policy(sft_dir, base_dir, dtype=None):
    """(model, tokenizer) of the SFT policy: merged dir if present, else base + adapter merged in memory."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    kind, path = find_policy(sft_dir, base_dir)
    if kind == "full":
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
        model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    tok = load_chat_tokenizer(path if (Path(path) / "tokenizer.json").is_file() else base_dir)
    # Generation stops at the end of the assistant turn (and, as a fallback, at the end of a document).
    model.generation_config.eos_token_id = stop_token_ids(tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def rlhf_prompts(split, n_arithmetic, n_conversation, seed=0):
    """Prompts for GRPO and its evaluation: arithmetic problems (with their exact answer, split and cell) and
    chatterbot conversation prompts from the embedded preference data (answer None), of one split: 'train', or
    'heldout' (n_arithmetic // 2 held-out problems in the trained wordings, as many in held-out wordings)."""
    tasks = (arithmetic_tasks(n_arithmetic, "train", seed=seed) if split == "train" else
             evaluation_tasks(n_arithmetic // 2))  # held out: the same problems whatever the seed
    prompts = [{"prompt": [{"role": "user", "content": t["prompt"]}], "answer": t["answer"],
                "split": t.get("split", "train"), "cell": cell(t)} for t in tasks]
    seen = set()
    for row in read_jsonl_gz(PREFERENCE_FILES[split]):
        key = json.dumps(row["prompt"], ensure_ascii=False)
        if row["source"] == "chatterbot" and key not in seen and len(seen) < n_conversation:
            seen.add(key)
            prompts.append({"prompt": row["prompt"], "answer": None, "split": "chat", "cell": None})
    return prompts


def render_chat(tokenizer, prompt, completion=None):
    """Chat-template text of prompt messages (+ the assistant's completion, or the generation prompt if None)."""
    messages = list(prompt) + ([] if completion is None else [{"role": "assistant", "content": completion}])
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=completion is None)


def reward_model_input_ids(tokenizer, prompts, completions, max_len):
    """Token ids the reward model reads for each (prompt messages, completion text): the chat template (no extra
    special tokens), cut from the left to max_len tokens, since the score is read at the last one. Training
    (reward_model.py) and scoring use this one function, so a long pair is judged as it was trained on."""
    texts = [render_chat(tokenizer, p, c) for p, c in zip(prompts, completions)]
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]  # verbose: no "too long" warning
    return [x[-max_len:] for x in ids]                                              # for what is cut right here


def padded_batches(ids, pad_id, batch_size, dev):
    """(row indices, right-padded input_ids, attention mask) of batches of rows of like length (less padding)."""
    import torch

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(ids[i]) for i in rows)
        input_ids = torch.tensor([ids[i] + [pad_id] * (width - len(ids[i])) for i in rows], device=dev)
        mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in rows], device=dev)
        yield rows, input_ids, mask


def classifier_scores(classifier, tokenizer, prompts, completions, batch_size=32):
    """The preference classifier's score of each (prompt messages, completion text): reward_model_input_ids at the
    model's context (the score is read at the last real token)."""
    import torch

    ids = reward_model_input_ids(tokenizer, prompts, completions, classifier.config.max_position_embeddings)
    scores = [0.0] * len(ids)
    for rows, input_ids, mask in padded_batches(ids, tokenizer.pad_token_id, batch_size,
                                                next(classifier.parameters()).device):
        with torch.no_grad():
            for i, score in zip(rows, classifier(input_ids=input_ids, attention_mask=mask).logits[:, 0].tolist()):
                scores[i] = score
    return scores


def reply_log_likelihoods(lm, tokenizer, prompts, completions, batch_size=32):
    """The mean log-probability per token, under the causal LM lm, of each completion's tokens (its <|im_end|>
    included) after its prompt messages, in the chat template; a pair longer than the context is cut from the left
    as reward_model_input_ids cuts it."""
    import torch

    full = tokenizer([render_chat(tokenizer, p, c) for p, c in zip(prompts, completions)], add_special_tokens=False,
                     verbose=False)["input_ids"]
    asked = tokenizer([render_chat(tokenizer, p) for p in prompts], add_special_tokens=False,
                      verbose=False)["input_ids"]
    ids = [x[-lm.config.max_position_embeddings:] for x in full]
    means = [0.0] * len(ids)
    for rows, input_ids, mask in padded_batches(ids, tokenizer.pad_token_id, batch_size, next(lm.parameters()).device):
        targets = torch.zeros_like(mask, dtype=torch.bool)  # the positions whose next token is the reply's
        for row, i in enumerate(rows):
            targets[row, max(0, len(ids[i]) - (len(full[i]) - len(asked[i])) - 1):len(ids[i]) - 1] = True
        with torch.no_grad():  # the LM head only where a reply token is predicted: half the FLOPs of the small models
            hidden = lm.base_model(input_ids=input_ids, attention_mask=mask).last_hidden_state[targets]
            log_probs = -torch.nn.functional.cross_entropy(lm.get_output_embeddings()(hidden).float(),
                                                           input_ids[:, 1:][targets[:, :-1]], reduction="none")
        sums = torch.zeros(len(rows), device=log_probs.device).index_add_(0, targets.nonzero()[:, 0], log_probs)
        for i, total, n in zip(rows, sums.tolist(), targets.sum(1).tolist()):
            means[i] = total / max(n, 1)
    return means


class RewardModel:
    """The reward of a reply: a preference classifier's score (GPT2ForSequenceClassification, trained on chosen /
    rejected pairs) plus likelihood_weight x the reply's mean log-probability per token under the reference policy,
    the SFT policy the classifier was trained from. The classifier does not learn to check a column sum from pairs;
    the policy predicts the right one (docs/experiments.md#reward-model). reward_model.py trains the classifier on
    the loss of this whole reward, the weight given (--likelihood-weight)."""

    def __init__(self, classifier, reference, tokenizer, likelihood_weight):
        self.classifier, self.reference, self.tokenizer = classifier, reference, tokenizer
        self.likelihood_weight = likelihood_weight

    def scores(self, prompts, completions, batch_size=32):
        """The reward of each (prompt messages, completion text)."""
        if not prompts:
            return []
        scores = classifier_scores(self.classifier, self.tokenizer, prompts, completions, batch_size)
        if not self.likelihood_weight:
            return scores
        likelihoods = reply_log_likelihoods(self.reference, self.tokenizer, prompts, completions, batch_size)
        return [s + self.likelihood_weight * l for s, l in zip(scores, likelihoods)]


def chat_reward_model_scores(reward_model, prompts, completions, answers):
    """GRPO's reward-model reward: the score of each completion whose prompt has no checkable answer (answer None),
    None where the exact answer judges it (there the reward model's scores would only add noise to the 0/1)."""
    judged = [i for i, a in enumerate(answers) if a is None]
    scores = iter(reward_model.scores([prompts[i] for i in judged], [completions[i] for i in judged]))
    return [next(scores) if a is None else None for a in answers]


def exact_answer_reward(completions, answers):
    """1.0 where a completion states the task's exact answer ("The answer is N." / "答案是N。"), else 0.0;
    None for prompts without a verifiable answer (TRL then leaves this reward out for them)."""
    return [None if a is None else float(extract_answer(c) == a) for c, a in zip(completions, answers)]


def load_reward_model(path, dev=None):
    """The RewardModel in path (RLHF/reward_model/: the classifier, its tokenizer, reference/ and the weight in
    config.json), in eval mode on dev."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"no reward model in {path}: run `python RLHF/reward_model.py` first "
                        "(or pass --rm-weight 0 to train on exact answers alone)")
    if not (path / REFERENCE_DIR / "config.json").is_file():
        raise UserError(f"{path} has no {REFERENCE_DIR}/ (the policy it scores likelihoods with; an older "
                        "llm_train wrote it): rerun `python RLHF/reward_model.py --force`")
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    classifier = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(str(path / REFERENCE_DIR), dtype=torch.float32).eval()
    return RewardModel(classifier.to(dev or "cpu"), reference.to(dev or "cpu"), load_chat_tokenizer(path),
                       classifier.config.likelihood_weight)


def paired_bootstrap_error_reduction(before, after, samples=2000, seed=0):
    """How much lower the error rate is after than before, relative (0.25: a quarter of the errors gone), from
    per-problem fractions right of the same problems, with a 95% interval from resampling the problems (paired: a
    problem's two numbers stay together). {"relative", "ci95": [low, high], "error_before", "error_after"}."""
    import numpy as np

    err_before, err_after = 1 - np.asarray(before, float), 1 - np.asarray(after, float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(err_before), size=(samples, len(err_before)))
    b, a = err_before[picks].sum(1), err_after[picks].sum(1)
    boot = 1 - a / np.maximum(b, 1e-12)
    relative = 1 - err_after.sum() / max(err_before.sum(), 1e-12)
    return {"relative": round(float(relative), 4),
            "ci95": [round(float(np.percentile(boot, 2.5)), 4), round(float(np.percentile(boot, 97.5)), 4)],
            "error_before": round(float(err_before.mean()), 4), "error_after": round(float(err_after.mean()), 4)}
