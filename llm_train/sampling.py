"""Scoring sampled completions: their log-probabilities at the positions generate() gave them. Prompts are
left-padded so that every completion starts at the same column. (Sampling itself is llm_train.engine's.)"""


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


