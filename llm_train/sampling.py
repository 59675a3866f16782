"""Sampling completions and scoring their log-probabilities. Prompts are left-padded so that every completion starts
at the same column."""
from llm_train.runtime import autocast


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


