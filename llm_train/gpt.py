"""The GPT of PreTrain/model.py: GPT-2 exactly (pre-LN, learned positions, tanh GELU, tied embeddings, biases), its
FLOPs per token for MFU, and its export as a Hugging Face GPT2LMHeadModel checkpoint.

Parameter names follow GPT2LMHeadModel, so the export is a rename plus a transpose (HF's Conv1D stores a weight as
(in, out)). The embedding may have more rows than the tokenizer has tokens (padded_vocab: a multiple of 64, for
faster matmuls); the logits of those rows are -inf, so they are never predicted and get no gradient, and the export
keeps the tokenizer's rows only."""
import json
import math
import re
import shutil
from pathlib import Path

from llm_train.atomic import atomic_write_json
from llm_train.errors import UserError
from llm_train.lineage import LINEAGE

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash attention on CUDA
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def padded_vocab(vocab_size, multiple=64):
    """Embedding rows for a vocabulary: rounded up to a multiple of 64 (50,000 -> 50,048) for efficient matmuls."""
    return -(-vocab_size // multiple) * multiple


class GPT(nn.Module):
    """vocab_size tokens (the tokenizer's) in an embedding of padded_vocab_size >= vocab_size rows (default: no
    padding); the logits of the padding rows are -inf. chunked_loss: forward(idx, targets) computes the loss chunk
    by chunk of rows (chunked_cross_entropy), as on CUDA; logits (targets None) are returned whole either way."""

    def __init__(self, vocab_size, context_length, n_layer, n_embd, n_head, padded_vocab_size=None,
                 activation_checkpointing=False, chunked_loss=False):
        super().__init__()
        if n_embd % n_head:
            raise UserError(f"--n-embd {n_embd} must be divisible by --n-head {n_head}")
        padded_vocab_size = padded_vocab_size or vocab_size
        self.config = dict(vocab_size=vocab_size, padded_vocab_size=padded_vocab_size, context_length=context_length,
                           n_layer=n_layer, n_embd=n_embd, n_head=n_head)
        self.activation_checkpointing = activation_checkpointing
        self.chunked_loss = chunked_loss  # the training loss by chunked_cross_entropy: never all the logits at once
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(padded_vocab_size, n_embd),
            wpe=nn.Embedding(context_length, n_embd),
            h=nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer)),
            ln_f=nn.LayerNorm(n_embd),
        ))
        # GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers), zero biases.
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, targets=None):
        """Logits (B, T, vocab) in float32, or the mean cross-entropy against targets."""
        t = idx.shape[1]
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(t, device=idx.device))
        for block in self.transformer.h:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None and self.chunked_loss:
            return chunked_cross_entropy(x.reshape(-1, x.shape[-1]), self.transformer.wte.weight, targets.reshape(-1),
                                         self.config["vocab_size"])
        logits = F.linear(x, self.transformer.wte.weight).float()  # tied LM head
        if self.config["padded_vocab_size"] > self.config["vocab_size"]:
            # padding rows are no tokens: -inf keeps the softmax (and so the loss) that of the real vocabulary, which
            # the export keeps; writes only the padding columns
            logits[..., self.config["vocab_size"]:] = float("-inf")
        if targets is None:
            return logits
        # plain cross-entropy over all fp32 logits: on CPU the chunked one costs more (bench/bench_loss.py)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


# Logits elements of one chunk of chunked_cross_entropy: 2^26 (256 MB in fp32) whatever the vocabulary.
LOSS_CHUNK_ELEMENTS = 2**26


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the tied LM head's logits x @ weight.T, chunk by chunk of rows: each chunk's fp32 logits
    exist only while its loss and its gradients (softmax - one-hot, through the head) are computed, in the forward
    pass; backward only scales them by the incoming gradient. The same FLOPs as the plain loss, no logits kept."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, dtype, chunk_rows, need_grad):
        n = x.shape[0]
        xs, w = x.to(dtype), weight.to(dtype)  # what autocast feeds the plain head's matmul
        grad_x, grad_w = torch.empty(x.shape, dtype=torch.float32, device=x.device), None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, n, chunk_rows):
            xc, tc = xs[start:start + chunk_rows], targets[start:start + chunk_rows]
            logits = (xc @ w.t()).float()
            if w.shape[0] > vocab_size:
                logits[:, vocab_size:] = float("-inf")
            rows = torch.arange(len(tc), device=x.device)
            lse = torch.logsumexp(logits, -1)
            total += (lse - logits[rows, tc]).sum()
            if not need_grad:  # validation: the loss only
                continue
            g = logits.sub_(lse[:, None]).exp_()  # in place: d(the chunk's summed loss) / d(logits) = softmax - one-hot
            g[rows, tc] -= 1
            g = g.to(dtype)
            grad_x[start:start + chunk_rows] = g @ w
            part = (g.t() @ xc).float()
            grad_w = part if grad_w is None else grad_w.add_(part)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.dtypes, ctx.n = (x.dtype, weight.dtype), n
        return total / n

    @staticmethod
    def backward(ctx, grad_output):
        grad_x, grad_w = ctx.saved_tensors
        scale = grad_output.float() / ctx.n
        return (grad_x * scale).to(ctx.dtypes[0]), (grad_w * scale).to(ctx.dtypes[1]), None, None, None, None, None


def chunked_cross_entropy(x, weight, targets, vocab_size, chunk_elements=None):
    """F.cross_entropy(x @ weight.T (logits of the rows beyond vocab_size -inf), targets) as the plain loss computes
    it (under autocast: a matmul in the autocast dtype, fp32 logits) without ever holding all the logits: chunks of
    at most chunk_elements (default LOSS_CHUNK_ELEMENTS) logits (rows x padded vocabulary). x: (rows, n_embd);
    weight: (padded vocab, n_embd)."""
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    rows = max(1, (chunk_elements or LOSS_CHUNK_ELEMENTS) // weight.shape[0])
    chunk_rows = -(-x.shape[0] // -(-x.shape[0] // rows))  # even chunks of at most `rows` rows
    with torch.autocast(device_type, enabled=False):
        need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        return _ChunkedCrossEntropy.apply(x, weight, targets, vocab_size, dtype, chunk_rows, need_grad)


def param_groups(model, weight_decay):
    """AdamW parameter groups: weight decay on matrices (linear weights, embeddings) only, not on biases and
    LayerNorm."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def flops_per_token(model_config, n_params):
    """Training FLOPs per token: 6*N + 12*layers*dim*context (PaLM appendix B), N without the position embeddings."""
    c = model_config
    n = n_params - c["context_length"] * c["n_embd"]  # position embeddings are a lookup, not a matmul
    return 6 * n + 12 * c["n_layer"] * c["n_embd"] * c["context_length"]


def hf_state_dict(model):
    """Our state dict under Hugging Face GPT2LMHeadModel names (Conv1D weights transposed), float32."""
    out = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().float().cpu()
        if re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", name):
            tensor = tensor.t()
        out[name] = tensor.contiguous()
    return out


def save_hf(model_state, model_config, tokenizer, tokenizer_dir, out_dir):
    """Write a GPT2LMHeadModel checkpoint + the tokenizer files into out_dir (a fresh temporary directory).

    The embedding keeps the tokenizer's rows only (the padding rows are no tokens; the trained model's logits for
    them are -inf), so config.vocab_size == len(tokenizer). The tokenizer's model_max_length is the model's context
    (the tokenizer dir's own value knows no model), and the generation config holds sampling defaults only: a
    max_new_tokens there would override a caller's generate(max_length=...). The MLP activation is the fused tanh GELU
    this model trained with (F.gelu(approximate="tanh")), not GPT-2's "gelu_new": the same formula in ~8 separate
    ops, slower in every later stage (bench/bench_activation.py, docs/experiments.md#pretraining)."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its bar over the one shard written is noise

    c = model_config
    vocab = len(tokenizer)
    if c["vocab_size"] != vocab:
        raise RuntimeError(f"model of {c['vocab_size']} tokens, tokenizer of {vocab}")
    model_state = {**model_state, "transformer.wte.weight": model_state["transformer.wte.weight"][:vocab].clone()}
    config = GPT2Config(vocab_size=vocab, n_positions=c["context_length"], n_embd=c["n_embd"],
                        n_layer=c["n_layer"], n_head=c["n_head"], activation_function="gelu_pytorch_tanh",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    with torch.device("meta"):
        hf = GPT2LMHeadModel(config)
    hf.load_state_dict(model_state, strict=False, assign=True)
    hf.tie_weights()
    missing = [n for n, p in hf.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"export left parameters unset: {missing[:5]}")
    hf.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=0.8,
                                            top_k=50)
    hf.save_pretrained(str(out_dir), safe_serialization=True)
    for f in Path(tokenizer_dir).iterdir():  # the tokenizer as stage 1 wrote it (chat template included)
        if f.is_file() and f.name not in ("README.md", "report.json", LINEAGE):
            shutil.copy2(f, Path(out_dir) / f.name)
    tokenizer_config = Path(out_dir) / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text(encoding="utf-8")) if tokenizer_config.is_file() else {}
    atomic_write_json(tokenizer_config, {**settings, "model_max_length": c["context_length"]})
