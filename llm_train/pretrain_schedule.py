"""What a pretraining run trains, from its flags: how a global batch of tokens splits into micro batches on each
rank, how many optimizer steps (a length in tokens capped at a number of epochs, or given), and the learning rate of
each step (linear warmup, cosine decay). The same flags give the same steps and tokens per step on any number of
ranks, or the nearest global batch that splits when it does not (with a preset's micro batch only: then one log
line says so)."""
import argparse
import math
from dataclasses import dataclass

from llm_train.cli import positive_float, positive_int
from llm_train.errors import UserError


def token_count(text):
    """A positive whole number of tokens, also written as 2e9 or 524_288."""
    value = positive_float(text)
    if value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens, got {text}")
    return int(value)


def micro_batch(text):
    """--batch-size: rows, or auto."""
    return "auto" if text == "auto" else positive_int(text)


@dataclass(frozen=True)
class Schedule:
    grad_accum: int  # micro batches per rank per optimizer step
    max_steps: int
    warmup_steps: int
    lr: float  # peak
    min_lr_ratio: float  # the final lr, as a fraction of the peak
    description: str = ""  # the log line saying what the run trains
    batch_size: int = None  # the micro batch in rows: the one asked for, or a preset's lowered to split the batch
    global_batch_tokens: int = None  # the one asked for, or the nearest that splits (`adjusted` says why)
    adjusted: str = ""  # one log line when the micro or the global batch is not the one asked for

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


def split_batch(global_batch_tokens, batch_size, context_length, world_size, batch_from_preset=False):
    """(micro batch rows, grad_accum, global batch tokens, log line or "") for global_batch_tokens over world_size
    ranks. An explicit --batch-size must split the global batch exactly (grad_accum_steps' error otherwise). A
    preset's micro batch b may be lowered to b/2 at the least: the largest that splits the global batch exactly,
    else the one whose split comes nearest to it (the global batch then moves there, more or fewer tokens)."""
    g, b, t, w = global_batch_tokens, batch_size, context_length, world_size
    if not batch_from_preset:
        return b, grad_accum_steps(g, b, t, w), g, ""

    def split(d):  # rows per micro batch -> (distance from the asked batch in tokens, -d, d, grad_accum)
        accum = max(1, round(g / (t * w * d)))
        return abs(accum * d * w * t - g), -d, d, accum

    _, _, d, accum = min(split(d) for d in range(-(-b // 2), b + 1))
    tokens = d * accum * w * t
    if d == b and tokens == g:
        return b, accum, g, ""
    rank_s = f"{w} rank{'s' * (w > 1)}"
    if tokens == g:
        why = f"the preset's micro batch of {b} rows does not split {g // t} rows over {rank_s}"
        return d, accum, g, f"--batch-size {d} (not the preset's {b}): {why}"
    return d, accum, tokens, (
        f"--global-batch-tokens {tokens:,} ({tokens / g - 1:+.1%}) instead of {g:,}: {g:,} tokens do not split into "
        f"micro batches of {b // 2 + b % 2}..{b} rows x {t} tokens x {rank_s}; the nearest that does is {accum} "
        f"micro batch{'es' * (accum > 1)} of {d} rows per rank (pass a --global-batch-tokens that is a multiple of "
        f"{d * w * t:,} to choose another)")


def plan_schedule(global_batch_tokens, batch_size, context_length, world_size, train_rows, data_name, *, max_steps,
                  max_tokens, max_epochs, warmup_steps, warmup_from_preset, lr, min_lr_ratio, batch_from_preset=False):
    """The Schedule of a run over train_rows rows (of data_name, for the log line): the split of split_batch (which
    batch_from_preset lets lower the micro batch, or move the global batch), max_steps if given, else max_tokens
    capped at max_epochs passes over the training tokens; a preset's warmup (warmup_from_preset) is cut to a tenth
    of a short run."""
    t, w = context_length, world_size
    b, grad_accum, g, adjusted = split_batch(global_batch_tokens, batch_size, t, w, batch_from_preset)
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
    return Schedule(grad_accum, max_steps, warmup_steps, lr, min_lr_ratio, description, b, g, adjusted)


def plan_from_flags(args, world_size, train_rows, batch_size=None):
    """plan_schedule of PreTrain/model.py's flags (args) over train_rows rows, with a preset's micro batch free to
    move (args.batch_from_preset) unless batch_size is given (one that fits, for --batch-size auto); args.batch_size
    and args.global_batch_tokens become the ones it trains."""
    schedule = plan_schedule(args.global_batch_tokens, batch_size or args.batch_size, args.context_length, world_size,
                             train_rows, args.chunks_dir, max_steps=args.max_steps, max_tokens=args.max_tokens,
                             max_epochs=args.max_epochs, warmup_steps=args.warmup_steps,
                             warmup_from_preset=args.warmup_from_preset, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
                             batch_from_preset=args.batch_from_preset and batch_size is None)
    args.batch_size, args.global_batch_tokens = schedule.batch_size, schedule.global_batch_tokens
    return schedule
