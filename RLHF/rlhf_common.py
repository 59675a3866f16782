"""What the three RLHF scripts share and no other stage needs: the SFT policy and its prompts, chat rendering,
reward-model scores and the exact-answer reward, sampling completions and scoring their log-probabilities, and small
Trainer-run helpers (the rebuild command for error messages, the epoch a resumed run continues in, means over its
log). Resuming only a run's own checkpoints is common.checkpoint_to_resume / train_or_finish, which SFT uses too.

The scripts (and tests) import it after putting the repo root (for common) and RLHF/ on sys.path:

    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
    import common
    import rlhf_common

torch and transformers are imported inside the functions, so importing this stays cheap.
"""
import contextlib
import json
import os
from pathlib import Path

import common
from common import UserError

PREFERENCE_FILES = {"train": common.REPO / "RLHF" / "data" / "preference_train.jsonl.gz",
                    "heldout": common.REPO / "RLHF" / "data" / "preference_heldout.jsonl.gz"}


# ---------------------------------------------------------------------------------------------------------------
# Devices and precision.
def device():
    """This process's GPU (LOCAL_RANK under a launcher) when there is one, else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def autocast(dev, dtype_name):
    """What the Trainer's mixed precision does for bf16/fp16 (autocast over fp32 weights); nothing for fp32."""
    import torch

    if dtype_name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name])


# ---------------------------------------------------------------------------------------------------------------
# The SFT policy.
def find_policy(sft_dir, base_dir):
    """Where the SFT policy is: ('full', dir) for a full model dir (SFT's merged/ or any HF causal LM),
    ('adapter', sft_dir) for a LoRA adapter on base_dir, or a UserError saying what to run first."""
    sft_dir, base_dir = Path(sft_dir), Path(base_dir)
    if (sft_dir / "merged" / "config.json").is_file():
        return "full", sft_dir / "merged"
    if (sft_dir / "adapter_config.json").is_file():
        if not (base_dir / "config.json").is_file():
            raise UserError(f"{sft_dir} holds a LoRA adapter but its base model {base_dir} is missing: "
                            "pretrain first or pass --base-dir")
        return "adapter", sft_dir
    if (sft_dir / "config.json").is_file():
        return "full", sft_dir
    raise UserError(f"no SFT model in {sft_dir}: run `python SFT/qlora_fine_tune_trl.py` first "
                    "(or pass --sft-dir DIR with a Hugging Face causal LM)")


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
    tok = common.load_chat_tokenizer(path if (Path(path) / "tokenizer.json").is_file() else base_dir)
    # Generation stops at the end of the assistant turn (and, as a fallback, at the end of a document).
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids(common.IM_END), tok.convert_tokens_to_ids(common.EOT)]
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def rlhf_prompts(split, n_arithmetic, n_conversation, seed=0):
    """Prompts for GRPO and its evaluation: arithmetic problems (with their exact answer) and chatterbot
    conversation prompts from the embedded preference data (answer None), of one split ('train'/'heldout')."""
    prompts = [{"prompt": [{"role": "user", "content": t["prompt"]}], "answer": t["answer"],
                "kind": f"{t['op']}_{t['lang']}"} for t in common.arithmetic_tasks(n_arithmetic, split, seed=seed)]
    seen = set()
    for row in common.read_jsonl_gz(PREFERENCE_FILES[split]):
        key = json.dumps(row["prompt"], ensure_ascii=False)
        if row["source"] == "chatterbot" and key not in seen and len(seen) < n_conversation:
            seen.add(key)
            prompts.append({"prompt": row["prompt"], "answer": None, "kind": "chat"})
    return prompts


# ---------------------------------------------------------------------------------------------------------------
# Rewards.
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


def reward_model_scores(reward_model, tokenizer, prompts, completions, batch_size=32):
    """Reward-model score of each (prompt messages, completion text): reward_model_input_ids at the model's
    context, right-padded (the score is read at the last real token)."""
    import torch

    max_len = reward_model.config.max_position_embeddings
    dev = next(reward_model.parameters()).device
    scores = []
    for i in range(0, len(prompts), batch_size):
        ids = reward_model_input_ids(tokenizer, prompts[i:i + batch_size], completions[i:i + batch_size], max_len)
        width = max(map(len, ids))
        input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids], device=dev)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=dev)
        with torch.no_grad():
            scores += reward_model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().tolist()
    return scores


def chat_reward_model_scores(reward_model, tokenizer, prompts, completions, answers):
    """GRPO's reward-model reward: the score of each completion whose prompt has no checkable answer (answer None),
    None where the exact answer judges it (there the reward model's scores would only add noise to the 0/1)."""
    judged = [i for i, a in enumerate(answers) if a is None]
    scores = iter(reward_model_scores(reward_model, tokenizer, [prompts[i] for i in judged],
                                      [completions[i] for i in judged]))
    return [next(scores) if a is None else None for a in answers]


def exact_answer_reward(completions, answers):
    """1.0 where a completion states the task's exact answer ("The answer is N." / "答案是N。"), else 0.0;
    None for prompts without a verifiable answer (TRL then leaves this reward out for them)."""
    return [None if a is None else float(common.extract_answer(c) == a) for c, a in zip(completions, answers)]


def load_reward_model(path, dev=None):
    """(reward model, its tokenizer), in eval mode on dev."""
    if not (Path(path) / "config.json").is_file():
        raise UserError(f"no reward model in {path}: run `python RLHF/reward_model.py` first "
                        "(or pass --rm-weight 0 to train on exact answers alone)")
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32).eval()
    return model.to(dev or "cpu"), common.load_chat_tokenizer(path)


# ---------------------------------------------------------------------------------------------------------------
# Sampling and log-probabilities. Prompts are left-padded so that every completion starts at the same column.
def prompt_token_ids(tokenizer, prompts, room=None):
    """Token ids of each prompt exactly as GRPOTrainer makes them: chat template + generation prompt, no BOS. With
    room, a longer prompt keeps its last `room` tokens (the end, where the answer starts): generation and scoring
    must cut it the same way, or the model would be scored on a context it never saw."""
    ids = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        tokenizer_kwargs={"verbose": False})["input_ids"]  # no "too long" warning:
    return ids if room is None else [x[-room:] for x in ids]                              # cut right here


def prompt_room(model, max_new_tokens):
    """How many prompt tokens fit in the model's context next to max_new_tokens generated ones."""
    return max(model.config.n_positions - max_new_tokens, 1)


def generate_completions(model, tokenizer, prompts, max_new_tokens, do_sample, temperature=1.0, batch_size=32,
                         dtype="fp32"):
    """(completion token ids, completion texts) for each prompt (list of messages). Stops at <|im_end|>;
    the ids include the stop token, the text leaves special tokens out. (generate() runs without autograd.)
    dtype: the compute dtype name ('bf16' generates under autocast over the fp32 weights, as the Trainers do)."""
    import torch

    dev = next(model.parameters()).device
    all_ids, texts = [], []
    for i in range(0, len(prompts), batch_size):
        ids = prompt_token_ids(tokenizer, prompts[i:i + batch_size], prompt_room(model, max_new_tokens))
        width = max(map(len, ids))
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids], device=dev)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=dev)
        with autocast(dev, dtype):
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=do_sample, temperature=temperature if do_sample else None,
                                 top_k=0 if do_sample else None, top_p=1.0 if do_sample else None,
                                 eos_token_id=model.generation_config.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)[:, width:].tolist()
        for seq in out:
            stops = [j for j, t in enumerate(seq) if t in model.generation_config.eos_token_id]
            seq = seq[:stops[0] + 1] if stops else seq
            all_ids.append(seq)
            texts.append(tokenizer.decode(seq, skip_special_tokens=True))
    return all_ids, texts


def position_ids(attention_mask):
    """GPT-2 positions of a left-padded batch as generate() derives them from the attention mask: each row counts
    from 0 at its first real token (pads get 0). Scoring with arange positions instead shifts every left-padded row."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_logps(model, prompt_ids, completion_ids, temperature=1.0):
    """Per-token log-probabilities of each completion given its prompt, as a (B, T) tensor padded with 0, and
    the (B, T) completion mask: left-padded prompts at the positions generate() sampled them at, logits divided
    by the sampling temperature (as TRL does)."""
    import torch

    dev = next(model.parameters()).device
    width_p, width_c = max(map(len, prompt_ids)), max(map(len, completion_ids))
    rows, masks, cmask = [], [], []
    for p, c in zip(prompt_ids, completion_ids):
        rows.append([0] * (width_p - len(p)) + p + c + [0] * (width_c - len(c)))
        masks.append([0] * (width_p - len(p)) + [1] * (len(p) + len(c)) + [0] * (width_c - len(c)))
        cmask.append([1] * len(c) + [0] * (width_c - len(c)))
    input_ids, attention_mask = torch.tensor(rows, device=dev), torch.tensor(masks, device=dev)
    cmask = torch.tensor(cmask, device=dev, dtype=torch.float32)
    return last_token_logps(model, input_ids, attention_mask, width_c, temperature)[0] * cmask, cmask


def last_token_logps(model, input_ids, attention_mask, n, temperature=1.0):
    """(log-probabilities of the last n tokens of each row, (B, n); the whole log-softmax at those positions,
    (B, n, vocab)) of a left-padded batch, at generate()'s positions, logits divided by the sampling temperature and
    taken in fp32. Only the n positions that predict them go through the LM head."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                   logits_to_keep=n + 1, use_cache=False).logits[:, :-1]
    log_softmax = torch.log_softmax(logits.float() / temperature, dim=-1)
    return log_softmax.gather(-1, input_ids[:, -n:, None]).squeeze(-1), log_softmax


# ---------------------------------------------------------------------------------------------------------------
# Trainer runs (common.checkpoint_to_resume and common.train_or_finish decide what a rerun resumes).
def rerun_command(script, **flags):
    """`python SCRIPT` plus the path flags (name=(value, default)) whose value is not the default: the command that
    rebuilds an output, for error messages."""
    return " ".join([f"python {script}"] + [f"--{name.replace('_', '-')} {value}" for name, (value, default)
                                            in flags.items() if Path(value).resolve() != Path(default).resolve()])


def checkpoint_epoch(checkpoint):
    """The epoch a run resumed from `checkpoint` continues in (0 when starting fresh)."""
    if not checkpoint:
        return 0
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["epoch"])


def mean_logged(state, key):
    """Mean of the values logged under `key` over the whole run (a resumed run's log history includes the steps
    before the resume), or None if none were logged."""
    values = [h[key] for h in state.log_history if key in h]
    return sum(values) / len(values) if values else None
