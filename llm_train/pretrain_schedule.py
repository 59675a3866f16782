"""What a pretraining run trains, from its flags: how a global batch of tokens splits into micro batches on each
rank, how many optimizer steps (a length in tokens capped at a number of epochs, or given), and the learning rate of
each step (linear warmup, cosine decay). The same flags give the same steps and tokens per step on any number of
ranks."""
import math
from dataclasses import dataclass

from llm_train.errors import UserError


@dataclass(frozen=True)
class Schedule:
    grad_accum: int  # micro batches per rank per optimizer step
    max_steps: int
    warmup_steps: int
    lr: float  # peak
    min_lr_ratio: float  # the final lr, as a fraction of the peak
    description: str = ""  # the log line saying what the run trains

    def lr_at(self, step):
        """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at max_steps (the lr of step, 0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        min_lr = self.lr * self.min_lr_ratio
        return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (self.lr - min_lr)


def grad_accum_steps(global_batch_tokens, batch_size, context_length, world_size):
    """Micro batches of batch_size rows of context_length tokens per rank that make up global_batch_tokens; a global
    batch that does not split that way is one UserError saying what would."""
    g, b, t, w = global_batch_tokens, batch_size, context_length, world_size
    rows_per_rank, rest = divmod(g, t * w)
    if rest or rows_per_rank % b:
        fits = [d for d in range(1, min(b, rows_per_rank) + 1) if not rest and rows_per_rank % d == 0][-4:]
        batch = f"a --batch-size that divides {rows_per_rank} ({', '.join(map(str, fits))}, ...) or " if fits else ""
        raise UserError(f"--global-batch-tokens {g} does not split into micro batches of --batch-size {b} x "
                        f"--context-length {t} tokens on {w} rank{'s' * (w > 1)}: {g} is not a multiple of {b} x "
                        f"{t} x {w} = {b * t * w}. Pass {batch}a --global-batch-tokens that is a multiple of "
                        f"{b * t * w} (e.g. {max(1, round(g / (b * t * w))) * b * t * w})")
    return rows_per_rank // b


def plan_schedule(global_batch_tokens, batch_size, context_length, world_size, train_rows, data_name, *, max_steps,
                  max_tokens, max_epochs, warmup_steps, warmup_from_preset, lr, min_lr_ratio):
    """The Schedule of a run over train_rows rows (of data_name, for the log line): max_steps if given, else
    max_tokens capped at max_epochs passes over the training tokens; a preset's warmup (warmup_from_preset) is cut
    to a tenth of a short run."""
    g, b, t, w = global_batch_tokens, batch_size, context_length, world_size
    grad_accum = grad_accum_steps(g, b, t, w)
    train_tokens = train_rows * t
    if max_steps is not None:
        how = "--max-steps"
    else:
        how = f"--max-tokens {max_tokens:,}"
        if max_tokens > max_epochs * train_tokens:  # whole steps within the cap
            max_steps = max(1, math.floor(max_epochs * train_tokens / g))
            how += f" capped at --max-epochs {max_epochs:g}: more data would let it train them"
        else:
            max_steps = math.ceil(max_tokens / g)
    if warmup_from_preset and warmup_steps > max_steps // 10:  # a short run: warm up for a tenth
        how += f"; the preset's {warmup_steps} warmup steps shortened to {max_steps // 10}"
        warmup_steps = max_steps // 10
    trained = max_steps * g
    description = (f"training {trained:,} tokens = {trained / train_tokens:.2f} epochs over the {train_tokens:,} "
                   f"training tokens of {data_name} ({max_steps} steps of {g:,} tokens: {b} rows x {grad_accum} "
                   f"micro batch{'es' * (grad_accum > 1)} x {w} rank{'s' * (w > 1)}; {how})")
    return Schedule(grad_accum, max_steps, warmup_steps, lr, min_lr_ratio, description)
