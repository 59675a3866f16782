"""The one generation engine of the chat front ends, the report, the inference scripts and the RL sampling.

    from llm_train.engine import Engine, Sampling, GREEDY
    engine = Engine(model, tokenizer, dtype="bf16")        # stops at <|im_end|> and <|endoftext|>
    ids = engine.fit(prompt_ids, max_new_tokens)           # the prompt's end, so prompt + reply fit the context
    replies = engine.generate_batch([ids], 64)             # greedy; each reply ends with its stop token (if any)
    for text, n in engine.stream_text(ids, 64, Sampling(temperature=0.7, top_k=50, top_p=0.95)): ...

Every generation goes through this Engine, under the compute dtype's autocast, without autograd, so the stop tokens,
the sampling settings and the context window are decided here only. A stream is one Hugging Face generate() call
(Engine.generate); a batch (generate_batch: evaluations, GRPO's rollouts) runs our own KV-cache loop over the GPT-2's
modules (GPT2Decoder), which computes a repeated prompt once and drops the rows that have stopped (decode_batch):
- stop tokens: <|im_end|> (end of a chat turn) and <|endoftext|> (end of a document), those the tokenizer has;
- Sampling: temperature 0 = greedy; top_k 0 = off; top_p 1 = off. Out-of-range or NaN values raise a UserError
  naming the setting, before any generation. The token is drawn by InverseCdfDraw, not generate()'s multinomial;
- context: a prompt keeps its last prompt_room() tokens (its end, where the reply starts), so prompt + new tokens
  never ask for a position the model did not learn; generate_sliding() goes past the context by sliding the window.
Greedy generation in fp32 is the same token for token as a direct generate() call with the same stops, batches
included; under bf16 autocast a batch's logits differ from generate()'s by bf16 rounding (the attention's kernel).
"""
import math
import queue
import threading
from dataclasses import dataclass

from llm_train.errors import UserError
from llm_train.runtime import autocast
from llm_train.tokenizer import EOT, IM_END

STOP_TOKENS = (IM_END, EOT)
# Prompts per batch in evaluations: on a CPU a new token costs little more for 256 rows than for 64
# (docs/experiments.md#sampling).
EVAL_BATCH = 256
# A batch drops its stopped rows once this share of them has stopped: dropping copies the KV cache, so not every step.
DROP_SHARE = 0.25


def stop_token_ids(tokenizer):
    """The ids of <|im_end|> and <|endoftext|> that the tokenizer has (in that order)."""
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in STOP_TOKENS if t in vocab]


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: temperature 0 = greedy (argmax); top_k 0 = every token; top_p 1 = no nucleus
    cut. Checked on creation: a NaN, infinite or out-of-range value is a UserError naming the setting."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        def number(name, value):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise UserError(f"{name} must be a number, got {value!r}") from None
            if not math.isfinite(value):
                raise UserError(f"{name} must be a finite number, got {value}")
            return value

        temperature, top_k, top_p = (number(n, getattr(self, n)) for n in ("temperature", "top_k", "top_p"))
        if temperature < 0:
            raise UserError(f"temperature must be 0 (greedy) or more, got {temperature}")
        if top_k < 0 or top_k != int(top_k):
            raise UserError(f"top_k must be a whole number, 0 (off) or more, got {top_k}")
        if not 0 < top_p <= 1:
            raise UserError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "top_k", int(top_k))
        object.__setattr__(self, "top_p", top_p)

    @property
    def greedy(self):
        return self.temperature == 0

    def generate_kwargs(self):
        """generate()'s sampling arguments. Always greedy decoding (None = off, never the generation config's
        default); to sample, generate()'s own temperature, top-k and top-p warpers in generate()'s order, then the
        draw (InverseCdfDraw)."""
        from transformers import LogitsProcessorList
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        kwargs = dict(do_sample=False, temperature=None, top_k=None, top_p=None)
        if self.greedy:
            return kwargs
        warpers = [TemperatureLogitsWarper(self.temperature)]
        if self.top_k:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1:
            warpers.append(TopPLogitsWarper(self.top_p))
        return dict(kwargs, logits_processor=LogitsProcessorList(warpers + [InverseCdfDraw()]))


class InverseCdfDraw:
    """A logits processor that draws the next token from softmax(scores) and leaves only it possible (0, the rest
    -inf), so generate()'s argmax picks it: one uniform number per row against the cumulative probabilities. The
    same distribution as generate()'s torch.multinomial, whose exponential draw per vocabulary entry is slow on CPU
    (docs/experiments.md#sampling). Engine.decode_batch, which drops stopped rows, sets rows (the batch rows still
    in its loop) and batch: the numbers are still drawn for the whole batch, so it samples what generate() would."""

    def __init__(self):
        self.rows = self.batch = None

    def token(self, scores):
        """The drawn token id of each row of scores (B, V)."""
        import torch

        cdf = torch.softmax(scores.float(), dim=-1).cumsum(dim=-1)
        if self.rows is None:
            u = torch.rand((scores.shape[0], 1), device=scores.device)
        else:
            u = torch.rand((self.batch, 1), device=scores.device)[self.rows]
        u = u * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1).squeeze(1)  # the first cdf > u

    def __call__(self, input_ids, scores):
        import torch

        return torch.full_like(scores, -math.inf).scatter_(1, self.token(scores)[:, None], 0.0)


GREEDY = Sampling()


def new_token_count(value):
    """max_new_tokens as an int, or a UserError if it is not a whole number of 1 or more (NaN included)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"max_new_tokens must be a number, got {value!r}") from None
    if not math.isfinite(number) or number < 1 or number != int(number):
        raise UserError(f"max_new_tokens must be a whole number, 1 or more, got {value}")
    return int(number)


def context_of(model):
    """How many positions the model learned (GPT-2's n_positions)."""
    return model.config.n_positions


def prompt_room(model, max_new_tokens):
    """How many prompt tokens fit in the model's context next to max_new_tokens generated ones."""
    return max(context_of(model) - max_new_tokens, 1)


def reply_budget(model, max_new_tokens):
    """How many tokens an interactive reply may have: at most half the context, so the prompt keeps the other half."""
    return max(1, min(int(max_new_tokens), context_of(model) // 2))


def prompt_token_ids(tokenizer, prompts, room=None):
    """Token ids of each prompt exactly as GRPOTrainer makes them: chat template + generation prompt, no BOS. With
    room, a longer prompt keeps its last `room` tokens (the end, where the answer starts): generation and scoring
    must cut it the same way, or the model would be scored on a context it never saw."""
    ids = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        tokenizer_kwargs={"verbose": False})["input_ids"]  # no "too long" warning:
    return ids if room is None else [x[-room:] for x in ids]                              # cut right here


class GPT2Decoder:
    """GPT-2's forward for a batch's KV-cache loop, through the model's own modules (so LoRA layers, 4-bit weights
    and a scaled final norm all take part), with the cache preallocated for `length` positions, in fp32. A new
    token attends over the whole cache, masked, in three small fp32 ops, not scaled_dot_product_attention, whose CPU
    kernel costs ~4x more for one query (docs/experiments.md#sampling): the same logits as the model's forward in
    fp32, and to the rounding of bf16 outputs under autocast. GPT-2 only (every model of this project)."""

    def __init__(self, model, length):
        import torch

        gpt = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel: its LoRA'd GPT-2
        config = gpt.config
        if config.model_type != "gpt2" or config.reorder_and_upcast_attn or config.scale_attn_by_inverse_layer_idx \
                or not config.scale_attn_weights:
            raise UserError(f"batched generation runs GPT-2 models with standard attention only, got a "
                            f"{config.model_type} model")
        self.transformer, self.lm_head = gpt.transformer, gpt.lm_head
        self.heads, self.length = config.n_head, length
        self.head_dim = config.n_embd // config.n_head
        self.scale = self.head_dim ** -0.5
        self.keys = self.values = None  # (layers, B, heads, length, head dim), fp32
        self.seen = None  # (B, length) bool: a position holds a token
        self.filled = 0
        self.device = next(gpt.parameters()).device
        self.no_autocast = torch.autocast(self.device.type, enabled=False)

    def _split(self, qkv):
        """(B, T, 3C) -> q, k, v as (B, heads, T, C / heads)."""
        B, T, _ = qkv.shape
        return [x.view(B, T, self.heads, -1).transpose(1, 2) for x in qkv.chunk(3, dim=-1)]

    def _block(self, block, x, attend):
        q, k, v = self._split(block.attn.c_attn(block.ln_1(x)))
        y = attend(q, k, v)
        x = x + block.attn.c_proj(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        return x + block.mlp(block.ln_2(x))

    def _logits(self, x):
        """The last position's logits in fp32, as generate() hands them to the logits processors."""
        return self.lm_head(self.transformer.ln_f(x[:, -1])).float()

    def prefill(self, input_ids, attention_mask):
        """The logits (B, V) of the next token after a left-padded batch (B, T), its keys and values cached. A prompt
        that comes several times (GRPO's groups, several samples per problem) is computed once."""
        import torch
        import torch.nn.functional as F

        B, T = input_ids.shape
        rows, copies = torch.unique(torch.cat([input_ids, attention_mask], dim=1), dim=0, return_inverse=True)
        input_ids, attention_mask = rows[:, :T], rows[:, T:]
        positions = (attention_mask.cumsum(-1) - 1).clamp_(min=0)  # left padding: each prompt starts at position 0
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        self.seen = torch.zeros(B, self.length, dtype=torch.bool, device=self.device)
        self.seen[:, :T] = attention_mask.bool()[copies]
        causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
        # a pad position sees itself too: its (unused) output stays finite, so no NaN reaches the cache
        mask = ((causal & attention_mask.bool()[:, None]) | torch.eye(T, dtype=torch.bool, device=self.device))[:, None]
        self.keys = torch.zeros(len(self.transformer.h), B, self.heads, self.length, self.head_dim,
                                dtype=torch.float32, device=self.device)
        self.values = torch.zeros_like(self.keys)
        for i, block in enumerate(self.transformer.h):
            def attend(q, k, v, i=i):
                self.keys[i, :, :, :T], self.values[i, :, :, :T] = k[copies], v[copies]
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)

            x = self._block(block, x, attend)
        self.filled = T
        return self._logits(x)[copies]

    def step(self, token, position):
        """The logits (B, V) after one more token per row (B,) at its position (B,)."""
        import torch

        n = self.filled
        self.filled += 1
        self.seen[:, n] = True
        x = self.transformer.wte(token[:, None]) + self.transformer.wpe(position[:, None])
        masked = ~self.seen[:, None, None, :]  # the whole length: a slice of the cache would be copied by matmul
        for i, block in enumerate(self.transformer.h):
            def attend(q, k, v, i=i):
                keys, values = self.keys[i], self.values[i]
                keys[:, :, n], values[:, :, n] = k[:, :, 0], v[:, :, 0]
                with self.no_autocast:  # in fp32, as the fused kernel computes inside
                    scores = torch.matmul(q.float(), keys.transpose(-1, -2)).mul_(self.scale).masked_fill_(
                        masked, -math.inf)
                    return torch.matmul(torch.softmax(scores, dim=-1), values).to(q.dtype)

            x = self._block(block, x, attend)
        return self._logits(x)

    def keep_rows(self, keep):
        """Drop every row of the cache but `keep` (indices)."""
        self.keys, self.values = self.keys.index_select(1, keep), self.values.index_select(1, keep)
        self.seen = self.seen.index_select(0, keep)


class _TokenQueue:
    """A generate() streamer that hands each new token id to another thread (the prompt, put first, is skipped)."""

    def __init__(self):
        self.tokens, self.prompt_seen = queue.Queue(), False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.tokens.put(token)

    def end(self):
        self.tokens.put(None)


class Engine:
    """A model and its tokenizer, with the stop tokens and the compute dtype its generations use.

    dtype: 'fp32' (no autocast; the weights' own dtype), 'bf16' or 'fp16' (autocast over the weights, as the
    Trainers run), or None for the run's compute dtype (runtime.autocast). stops: token ids that end a reply
    (default: stop_token_ids(tokenizer)). tokenizer may be None when stops are given (then no decode/stream_text)."""

    def __init__(self, model, tokenizer, dtype="fp32", stops=None):
        self.model, self.tokenizer, self.dtype = model, tokenizer, dtype
        self.stops = list(stop_token_ids(tokenizer) if stops is None else stops)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer is not None else model.generation_config.pad_token_id

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def context(self):
        return context_of(self.model)

    def fit(self, ids, max_new_tokens):
        """The end of a prompt (a list of ids) that fits the context next to max_new_tokens new tokens."""
        return ids[-prompt_room(self.model, max_new_tokens):]

    def generate(self, input_ids, max_new_tokens, sampling=GREEDY, attention_mask=None, **extra):
        """The new tokens (B, N) after input_ids (B, T), a tensor that already fits: the one generate() call. A row
        that stops early is padded with pad tokens; `extra` goes to generate() (streamer, stopping_criteria)."""
        import torch

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.no_grad(), autocast(self.device, self.dtype):
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                      max_new_tokens=max_new_tokens, eos_token_id=self.stops,
                                      pad_token_id=self.pad_token_id,
                                      **sampling.generate_kwargs(), **extra)
        return out[:, input_ids.shape[1]:]

    def cut_at_stop(self, ids):
        """A generated row up to and including its first stop token (the padding after it left out)."""
        stops = [j for j, t in enumerate(ids) if t in self.stops]
        return ids[:stops[0] + 1] if stops else ids

    def generate_batch(self, prompt_ids, max_new_tokens, sampling=GREEDY, batch_size=EVAL_BATCH):
        """Replies (lists of ids, each ending with its stop token when one came) to prompts (lists of ids),
        left-padded in batches of batch_size; each prompt is cut to fit the context first."""
        import torch

        replies = []
        for i in range(0, len(prompt_ids), batch_size):
            ids = [self.fit(x, max_new_tokens) for x in prompt_ids[i:i + batch_size]]
            width = max(map(len, ids))
            input_ids = torch.tensor([[self.pad_token_id] * (width - len(x)) + x for x in ids], device=self.device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
            out = self.decode_batch(input_ids, mask, max_new_tokens, sampling).tolist()
            replies += [self.cut_at_stop(row) for row in out]
        return replies

    def decode_batch(self, input_ids, attention_mask, max_new_tokens, sampling=GREEDY):
        """The new tokens (B, N) after a left-padded batch that fits, what generate() gives (a stopped row padded
        with pad tokens; sampling draws generate()'s random numbers, so from the same seed the same tokens), from our
        own KV-cache loop over the GPT-2's modules (GPT2Decoder), which drops the stopped rows and their cache once
        DROP_SHARE of the batch has stopped. generate() computes every row until the longest reply ends; this costs
        about the replies' total length instead, and each new token less than generate()'s step on a CPU
        (docs/experiments.md#sampling)."""
        import torch

        decoder = GPT2Decoder(self.model, input_ids.shape[1] + max_new_tokens)
        processors = sampling.generate_kwargs().get("logits_processor")
        warpers, draw = (processors[:-1], processors[-1]) if processors is not None else ([], None)
        device, batch = input_ids.device, input_ids.shape[0]
        stops = torch.tensor(self.stops, dtype=torch.long, device=device)
        out = torch.full((batch, max_new_tokens), self.pad_token_id, dtype=torch.long, device=device)
        rows = torch.arange(batch, device=device)  # the batch row of each row still in the loop
        going = torch.ones(batch, dtype=torch.bool, device=device)  # not stopped yet
        position = (attention_mask.sum(-1) - 1).clamp_(min=0)  # of each prompt's last token (left padding)
        with torch.no_grad(), autocast(self.device, self.dtype):
            logits = decoder.prefill(input_ids, attention_mask)
            for step in range(max_new_tokens):
                scores = logits
                for warper in warpers:
                    scores = warper(None, scores)
                if draw is not None:
                    draw.batch, draw.rows = batch, rows
                    token = draw.token(scores)
                else:
                    token = scores.argmax(-1)
                out[rows[going], step] = token[going]
                going &= ~torch.isin(token, stops)
                left = int(going.sum())
                if left == 0 or step == max_new_tokens - 1:
                    break
                if left <= (1 - DROP_SHARE) * len(going):
                    keep = going.nonzero().squeeze(1)
                    decoder.keep_rows(keep)
                    rows, token, position, going = rows[keep], token[keep], position[keep], going[keep]
                position = position + 1
                logits = decoder.step(token, position)
        return out

    def decode(self, ids):
        """The text of generated ids, special tokens (the stop token) left out."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def stream(self, ids, max_new_tokens, sampling=GREEDY):
        """Yield each new token id as it is generated after `ids` (a list of ids, cut to fit the context), the stop
        token included. generate() runs in a thread; closing this generator (a stop button, a client gone) ends it
        after the current token."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        event, errors, tokens = threading.Event(), [], _TokenQueue()

        class Stop(StoppingCriteria):  # asked after every token
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

        input_ids = torch.tensor([self.fit(list(ids), max_new_tokens)], device=self.device)

        def run():
            try:
                self.generate(input_ids, max_new_tokens, sampling, streamer=tokens,
                              stopping_criteria=StoppingCriteriaList([Stop()]))
            except Exception as e:  # raised in the caller's thread; the queue must still end or it would hang
                errors.append(e)
                tokens.end()

        thread = threading.Thread(target=run, daemon=True, name="generate")
        thread.start()
        try:
            while (token := tokens.tokens.get()) is not None:
                yield token
        finally:
            event.set()
            thread.join()
        if errors:
            raise errors[0]

    def stream_text(self, ids, max_new_tokens, sampling=GREEDY):
        """Yield (text so far, tokens so far) as stream() generates; the text leaves special tokens and a trailing
        incomplete UTF-8 character out. Ends with the whole reply once more."""
        new, text = [], ""
        for token in self.stream(ids, max_new_tokens, sampling):
            new.append(token)
            now = self.decode(new).rstrip("\ufffd")
            if now != text:
                text = now
                yield text, len(new)
        yield self.decode(new), len(new)

    def generate_sliding(self, input_ids, max_new_tokens, sampling=GREEDY):
        """(new ids (1, N), window slides) for a (1, T) prompt continued by max_new_tokens tokens, fewer if a stop
        token comes first. Past the context the window slides: the next generate() starts from the last half
        context of tokens (a new KV cache), so no position beyond the model's context is ever asked for."""
        import torch

        keep = max(1, self.context // 2)
        window = input_ids[:, -(self.context - 1):]
        new, slides = input_ids[:, :0], 0
        while True:
            n = min(max_new_tokens - new.shape[1], self.context - window.shape[1])
            chunk = self.generate(window, n, sampling)
            new = torch.cat([new, chunk], dim=1)
            if new.shape[1] >= max_new_tokens or chunk.shape[1] < n or chunk[0, -1].item() in self.stops:
                return new, slides
            window = torch.cat([window, chunk], dim=1)[:, -keep:]
            slides += 1


def generate_completions(model, tokenizer, prompts, max_new_tokens, do_sample, temperature=1.0, batch_size=EVAL_BATCH,
                         dtype="fp32"):
    """(completion token ids, completion texts) for each prompt (a list of messages), as GRPO samples them: chat
    template, prompts cut to prompt_room, left-padded batches, all tokens when sampling (no top-k / top-p). The ids
    include the stop token; the texts leave special tokens out. dtype: the compute dtype name (see Engine)."""
    engine = Engine(model, tokenizer, dtype)
    sampling = Sampling(temperature=temperature) if do_sample else GREEDY
    ids = engine.generate_batch(prompt_token_ids(tokenizer, prompts), max_new_tokens, sampling, batch_size)
    return ids, [engine.decode(x) for x in ids]
