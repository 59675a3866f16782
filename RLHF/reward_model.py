"""RLHF step 1: train a reward model on chosen/rejected answer pairs with TRL's RewardTrainer.

Reads:  the SFT policy as the starting point (SFT/sft_output/merged/, else output/ + the LoRA adapter in
        SFT/sft_output/ merged in memory; if --sft-dir holds no model yet, the pretrained model in output/; a
        --sft-dir that does not exist, or an adapter trained on another base, is an error), and preference pairs:
        by default the embedded RLHF/data/preference_{train,heldout}.jsonl.gz, or your own.
Writes: RLHF/reward_model/      the reward: a preference classifier, GPT2ForSequenceClassification (num_labels=1),
                                + tokenizer, plus likelihood_weight (in its config.json) x the reply's mean
                                log-probability per token under reference/, a copy of the SFT policy (the classifier
                                is trained on the loss of that whole reward). Load it with
                                llm_train.rl.load_reward_model("RLHF/reward_model") and score with .scores(...).
                                lineage.json: settings; the SFT policy and base it was built from
        RLHF/reward_eval.json   held-out pairwise accuracy (chosen scored above rejected), overall and per kind, and
                                the classifier's alone
        RLHF/checkpoints/reward_model/  resumable checkpoints
        RLHF/train.log, RLHF/runs/reward_model/ (TensorBoard)

Reruns (llm_train/stage.py): the same command on a finished run does nothing and says so; a killed run resumes from
its last checkpoint and logs what the uninterrupted run would have; checkpoints of a run with other settings or of
another SFT policy are an error that names the difference (--force starts over, redoes a finished run and replaces a
reward model GRPO was built from).

Your own pairs (--data FILE..., --hf-dataset NAME): jsonl(.gz) or parquet rows in one of these layouts
  conversational   {"prompt": [messages], "chosen": [messages], "rejected": [messages]}  (prompt optional: the
                   shared leading messages of chosen and rejected become the prompt)
  Anthropic HH     {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}  (converted to our chat template)
  plain text       {"prompt": "question", "chosen": "good answer", "rejected": "bad answer"}
An optional "kind" column breaks the held-out accuracy down by kind.

    python RLHF/reward_model.py                         # the cpu preset without CUDA, gpu with it
    python RLHF/reward_model.py --preset smoke          # seconds
    python RLHF/reward_model.py --hf-dataset Anthropic/hh-rlhf --max-steps -1 --max-length 512 --batch-size 32
"""
import argparse
import gzip
import hashlib
import json
import os
import tempfile
from pathlib import Path

from llm_train import rl, runtime
from llm_train.atomic import atomic_write_json
from llm_train.cli import apply_preset, nonnegative_float, nonnegative_int, positive_float, positive_int, settings_of
from llm_train.errors import UserError, run_main
from llm_train.paths import OUTPUT_DIR, PREFERENCE_FILES, REWARD_MODEL_DIR, SFT_OUTPUT_DIR
from llm_train.rl import (
    REFERENCE_DIR,
    RewardModel,
    classifier_scores,
    load_policy,
    reply_log_likelihoods,
    reward_model_input_ids,
)
from llm_train.runtime import default_scale, dtype_name
from llm_train.stage import Stage
from llm_train.tokenizer import load_chat_tokenizer
from llm_train.trainer_runs import (
    add_batch_flags,
    append_jsonl,
    jsonl_log_callback,
    mean_logged,
    recipe_log_callback,
    split_global_batch,
    train_and_end,
)

import torch

RLHF_DIR = REWARD_MODEL_DIR.parent
STAGE = "reward_model"

# Budget and optimizer per scale of policy, in one place (README table); each value can be overridden by its flag.
# All weights are trained (the scalar head is new), so the lr is lower than a LoRA run's. cpu: 1 epoch over two
# rejected kinds per prompt plus a contradiction per problem, lr 2e-4 (more epochs, other lrs, LoRA, length-grouped
# batches: no better within the seeds' spread); likelihood_weight 3: best of 1-30 on wrong numbers and overall
# (docs/experiments.md#reward-model). batch_size is the global batch
# (pairs per optimizer step over all processes; split_global_batch splits it, e.g. gpu: 1 x 32 or 8 x 4).
PRESETS = {
    "gpu": dict(epochs=1.0, max_steps=-1, batch_size=32, lr=5e-5, save_steps=100, likelihood_weight=3.0),
    "cpu": dict(epochs=1.0, max_steps=-1, batch_size=16, lr=2e-4, save_steps=100, likelihood_weight=3.0),
    "smoke": dict(epochs=1.0, max_steps=6, batch_size=16, lr=3e-4, save_steps=50, likelihood_weight=3.0),
}
ROWS_PER_SLICE = 8  # of the 2 x pairs rows of a batch, scored together (LengthSlices)


# ---------------------------------------------------------------------------------------------------------------
# Preference data: every layout is converted to {"prompt": [messages], "chosen": [msg], "rejected": [msg], "kind"}.
ROLES = {"system", "user", "assistant"}


def parse_hh(text, where):
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' (Anthropic HH-RLHF) -> chat messages."""
    import re

    parts = re.split(r"\n\n(Human|Assistant): ", "\n\n" + text.lstrip("\n"))
    if parts[0].strip() or len(parts) < 3:
        raise UserError(f"{where}: HH-style text must start with '\\n\\nHuman: '")
    return [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
            for role, content in zip(parts[1::2], parts[2::2])]


def check_messages(messages, where, name):
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: '{name}' must be a non-empty list of {{role, content}} messages")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: '{name}' has a message that is not {{'role': system|user|assistant, "
                                   f"'content': str}}: {str(m)[:80]}")
    return messages


def normalize_pair(row, where):
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        raise UserError(f"{where}: a preference row needs 'chosen' and 'rejected' (and optionally 'prompt')")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if "\n\nHuman:" in chosen[:200] or chosen.startswith("Human:"):
            chosen, rejected = parse_hh(chosen, where), parse_hh(rejected, where)
        elif isinstance(prompt, str) and prompt.strip():
            prompt = [{"role": "user", "content": prompt}]
            chosen, rejected = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
        else:
            raise UserError(f"{where}: text rows need a 'prompt' string, or HH-style '\\n\\nHuman: ... "
                                   "\\n\\nAssistant: ...' dialogues in 'chosen'/'rejected'")
    chosen, rejected = check_messages(chosen, where, "chosen"), check_messages(rejected, where, "rejected")
    if prompt is None:  # implicit prompt: the messages chosen and rejected share
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    prompt = check_messages(prompt, where, "prompt")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if answer[-1]["role"] != "assistant" or not answer[-1]["content"].strip():
            raise UserError(f"{where}: '{name}' must end with a non-empty assistant message")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": str(row.get("kind") or "all")}


def read_rows(path):
    """(row number, row) of a local jsonl / jsonl.gz / parquet file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"preference data file {path} not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:
            raise UserError(f"{path}: not a readable parquet file ({e})") from None
        yield from enumerate(rows, start=1)
        return
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield n, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path} line {n}: not valid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it as UTF-8 JSON Lines ({e})") from None


def load_pairs(files):
    pairs = [normalize_pair(row, f"{path} row {n}") for path in files for n, row in read_rows(path)]
    if not pairs:
        raise UserError(f"no preference pairs in {', '.join(map(str, files))}")
    return pairs


def load_hf_pairs(name, split):
    import datasets

    ds = datasets.load_dataset(name, split=split)
    return [normalize_pair(row, f"{name} [{split}] row {n}") for n, row in enumerate(ds, start=1)]


def heldout_by_hash(pairs, fraction=0.05):
    """Split pairs without a separate eval set: a pair is held out by a hash of its prompt (never both sides)."""
    def held(p):
        return hashlib.sha1(json.dumps(p["prompt"], ensure_ascii=False).encode()).digest()[0] < 256 * fraction
    return [p for p in pairs if not held(p)], [p for p in pairs if held(p)]


# ---------------------------------------------------------------------------------------------------------------
def policy_parents(sft_dir, base_dir):
    """The lineage parents of the reward model: the SFT policy it starts from (and the base under an SFT adapter),
    or the pretrained base itself when there is no SFT output yet; and where it starts from, in words."""
    try:
        parents = rl.policy_parents(sft_dir, base_dir)
        return parents, f"SFT policy {parents['policy']}"
    except rl.NoSFTModel:  # a missing --sft-dir, or one built on another base, is an error (find_policy)
        if not (Path(base_dir) / "config.json").is_file():
            raise UserError(f"no SFT model in {sft_dir} and no pretrained model in {base_dir}: "
                                   "run pretraining and SFT first") from None
        return {"policy": Path(base_dir), "base": None}, f"pretrained model {base_dir} (no SFT output in {sft_dir})"


def init_reward_model(sft_dir, base_dir, parents, tmp):
    """(GPT2ForSequenceClassification with num_labels=1, the reference causal LM, tokenizer), both models from the
    policy in parents (see policy_parents)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = parents["policy"]
    if parents["base"] is not None:  # an adapter: merge it, then reload the merged weights with a score head
        model, tok = load_policy(sft_dir, base_dir)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        path = tmp
    tok = load_chat_tokenizer(path if (Path(path) / "tokenizer.json").is_file() else base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    reference = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, reference, tok


def pair_margins(reward, pairs, classifier=True):
    """Per pair, chosen minus rejected: (classifier score or None, reference mean log-likelihood per token). Each
    distinct (prompt, reply) is scored once: a chosen reply sits in several pairs (3 in 10 of the embedded ones)."""
    keys = [[json.dumps([p["prompt"], p[side]], ensure_ascii=False) for side in ("chosen", "rejected")] for p in pairs]
    replies = {}
    for p, sides in zip(pairs, keys):
        replies.update({k: p["prompt"] + p[side] for k, side in zip(sides, ("chosen", "rejected"))})

    def margins(score):
        scored = dict(zip(replies, score([m[:-1] for m in replies.values()],
                                         [m[-1]["content"] for m in replies.values()])))
        return [scored[chosen] - scored[rejected] for chosen, rejected in keys]

    return (margins(lambda *a: classifier_scores(reward.classifier, reward.tokenizer, *a)) if classifier else None,
            margins(lambda *a: reply_log_likelihoods(reward.reference, reward.tokenizer, *a)))


def evaluate(reward, pairs):
    """Held-out pairwise accuracy (chosen scored above rejected) of the reward, overall and per kind, its mean
    margin, and the classifier's accuracy alone."""
    scores, likelihoods = pair_margins(reward, pairs)
    margins = [s + reward.likelihood_weight * l for s, l in zip(scores, likelihoods)]
    by_kind = {}
    for p, m in zip(pairs, margins):
        by_kind.setdefault(p["kind"], []).append(m > 0)
    return {"pairs": len(pairs), "accuracy": sum(m > 0 for m in margins) / len(pairs),
            "accuracy_by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
            "pairs_by_kind": {k: len(v) for k, v in sorted(by_kind.items())},
            "mean_margin": sum(margins) / len(pairs),
            "classifier_accuracy": sum(s > 0 for s in scores) / len(pairs)}


def steps(text):
    """--max-steps: a positive number of steps, or -1 for whole --epochs."""
    return -1 if text.strip() == "-1" else positive_int(text)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft-dir", type=Path, default=SFT_OUTPUT_DIR, help="SFT output (or any causal LM dir)")
    parser.add_argument("--base-dir", type=Path, default=OUTPUT_DIR, help="pretrained base of the SFT adapter")
    parser.add_argument("--data", type=Path, nargs="+", help="your preference pairs (jsonl, jsonl.gz, parquet)")
    parser.add_argument("--eval-data", type=Path, nargs="+", help="held-out pairs (default: 5%% of --data by hash)")
    parser.add_argument("--hf-dataset", help="a Hugging Face hub dataset of pairs, e.g. Anthropic/hh-rlhf")
    parser.add_argument("--hf-split", default="train")
    parser.add_argument("--hf-eval-split", default="test")
    parser.add_argument("--out-dir", type=Path, default=RLHF_DIR,
                        help="writes reward_model/, reward_eval.json, checkpoints/, runs/, train.log here")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="Trainer checkpoints (default: OUT_DIR/checkpoints/reward_model)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="budget and optimizer for the policy's size "
                        "(default: gpu with CUDA, cpu without); the flags below marked (preset) override it")
    parser.add_argument("--epochs", type=positive_float, help="(preset)")
    parser.add_argument("--max-steps", type=steps, help="(preset) stop after this many steps; -1 = whole --epochs")
    add_batch_flags(parser, "pairs")
    parser.add_argument("--lr", type=positive_float, help="(preset)")
    parser.add_argument("--max-length", type=positive_int, default=None,
                        help="a longer prompt + answer keeps its last this many tokens (default: the model's context, as "
                             "scoring does)")
    parser.add_argument("--save-steps", type=positive_int, help="(preset)")
    parser.add_argument("--likelihood-weight", type=nonnegative_float,
                        help="(preset) the reward adds this x the reply's mean log-probability per token under the SFT "
                             "policy; the classifier trains on what that leaves (0: the classifier alone)")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--force", action="store_true",
                        help="redo a finished run, discard checkpoints of a run with other settings, and replace a "
                             "reward model that RLHF/grpo_output was built from")
    return parser


def load_preference_pairs(args):
    """(training pairs, held-out pairs) from --hf-dataset, --data (and --eval-data, else 5% held out by hash) or the
    embedded files."""
    if args.hf_dataset:
        return load_hf_pairs(args.hf_dataset, args.hf_split), load_hf_pairs(args.hf_dataset, args.hf_eval_split)
    if not args.data:
        return load_pairs([PREFERENCE_FILES["train"]]), load_pairs([PREFERENCE_FILES["heldout"]])
    if args.eval_data:
        return load_pairs(args.data), load_pairs(args.eval_data)
    train_pairs, eval_pairs = heldout_by_hash(load_pairs(args.data))
    if not eval_pairs:
        raise UserError("too few pairs to hold any out: pass --eval-data")
    return train_pairs, eval_pairs


def run_settings(args, train_pairs, eval_pairs):
    """What decides the reward model, besides its parents: compared with the checkpoints' run before resuming it, and
    recorded in reward_model/lineage.json, where an identical rerun finds it finished."""
    return {**settings_of(args, "hf_dataset", "hf_split", "hf_eval_split", "epochs", "max_steps", "batch_size", "lr",
                          "max_length", "likelihood_weight", "seed"),
            **({"micro_batch": args.micro_batch} if args.micro_batch else {}),
            "data": [str(p.resolve()) for p in args.data or []],
            "eval_data": [str(p.resolve()) for p in args.eval_data or []],
            "pairs_sha256": hashlib.sha256(json.dumps([train_pairs, eval_pairs], ensure_ascii=False).encode())
            .hexdigest(),  # edited data files make a new run
            "dtype": dtype_name(allow_fp16=True), "processes": int(os.environ.get("WORLD_SIZE", "1"))}


def pair_dataset(tok, pairs, max_len, likelihood_margins, likelihood_weight):
    """The pairs' chosen and rejected token ids, tokenized as scoring tokenizes them (TRL would drop every pair
    longer than max_length, a quarter of the embedded "rambling" pairs, while scoring cuts them from the left: the
    model never saw what it was judged on), and TRL's margin: the classifier's loss is -log sigmoid(its margin +
    likelihood_weight x the reference's likelihood margin), the reward's own loss."""
    from datasets import Dataset

    def input_ids(side):
        return reward_model_input_ids(tok, [p["prompt"] + p[side][:-1] for p in pairs],
                                      [p[side][-1]["content"] for p in pairs], max_len)

    return Dataset.from_dict({"chosen_ids": input_ids("chosen"), "rejected_ids": input_ids("rejected"),
                              "margin": [-likelihood_weight * m for m in likelihood_margins]})


class LengthSlices:
    """Calls a sequence-classification model on a right-padded batch in slices of rows of like length, each cut to
    its own longest row, and returns the scores in the batch's order. Each row is scored on its own tokens, so the
    scores are the batch's, with less padding (docs/experiments.md#reward-model)."""

    def __init__(self, model, rows_per_slice):
        self.model, self.rows_per_slice = model, rows_per_slice

    def __call__(self, input_ids, attention_mask, margin=None, **kwargs):  # the margin is the loss's, not the model's
        from transformers.modeling_outputs import SequenceClassifierOutputWithPast

        lengths = attention_mask.sum(dim=1)
        order = torch.argsort(lengths, stable=True)
        logits = [self.model(input_ids=input_ids[rows, :width], attention_mask=attention_mask[rows, :width],
                             **kwargs).logits
                  for rows in order.split(self.rows_per_slice) for width in [int(lengths[rows].max())]]
        return SequenceClassifierOutputWithPast(logits=torch.cat(logits)[torch.argsort(order)])


def build_trainer(args, model, tok, train_ds, ckpt_dir):
    """RewardTrainer taking --batch-size pairs per optimizer step however many processes split them; in one
    process it scores each batch in LengthSlices (DDP's reducer expects one forward per backward)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback
    from trl import RewardConfig, RewardTrainer

    class SlicedRewardTrainer(RewardTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(LengthSlices(model, ROWS_PER_SLICE), inputs, return_outputs,
                                        num_items_in_batch)

    dtype = dtype_name(allow_fp16=True)
    split = split_global_batch(args.batch_size, args.micro_batch)
    config = RewardConfig(
        output_dir=str(ckpt_dir), num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=split.per_device, gradient_accumulation_steps=split.accum, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.0, max_length=None,
        activation_checkpointing=args.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        bf16=dtype == "bf16", fp16=dtype == "fp16",  # mixed precision: autocast over fp32 weights
        logging_steps=5, save_strategy="steps", save_steps=args.save_steps,
        save_total_limit=2, report_to="none", seed=args.seed, dataloader_num_workers=0,
        disable_tqdm=False, use_cpu=not torch.cuda.is_available())
    callbacks = [jsonl_log_callback({args.out_dir / "train.log": {"stage": STAGE}}),
                 recipe_log_callback(args.batch_size, "pairs", lambda line: print(line, flush=True))]
    if int(os.environ.get("RANK", "0")) == 0:
        callbacks.append(TensorBoardCallback(SummaryWriter(str(args.out_dir / "runs" / STAGE))))
    trainer = SlicedRewardTrainer if split.processes == 1 else RewardTrainer
    return trainer(model=model, args=config, train_dataset=train_ds, processing_class=tok, callbacks=callbacks)


def save_and_evaluate(args, stage, trainer, reward, eval_pairs, report):
    """reward_model/ (the classifier with the likelihood weight in its config, tokenizer, reference/, lineage.json),
    then its held-out accuracy into reward_eval.json (after the run's numbers in report) and train.log."""
    reward.classifier = trainer.accelerator.unwrap_model(trainer.model).eval()
    reward.classifier.config.likelihood_weight = reward.likelihood_weight
    with stage.output() as tmp:
        reward.classifier.save_pretrained(tmp)
        reward.tokenizer.save_pretrained(tmp)
        reward.reference.save_pretrained(Path(tmp) / REFERENCE_DIR)
    metrics = evaluate(reward, eval_pairs)
    atomic_write_json(args.out_dir / "reward_eval.json", {**report, "likelihood_weight": reward.likelihood_weight,
                                                          "heldout": metrics})
    append_jsonl(args.out_dir / "train.log", {"stage": STAGE, "event": "eval", **metrics})
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in metrics["accuracy_by_kind"].items())
    print(f"held-out pairwise accuracy {metrics['accuracy']:.3f} (the classifier alone {metrics['classifier_accuracy']:.3f},"
          f" the likelihood weighted {reward.likelihood_weight:g}; {kinds}); saved {stage.out_dir} and "
          f"{args.out_dir / 'reward_eval.json'}")


def main():
    args = apply_preset(build_parser().parse_args(), PRESETS, default_scale())
    train_pairs, eval_pairs = load_preference_pairs(args)  # a bad file fails in a second, before any model loads
    ckpt_dir = args.checkpoint_dir or args.out_dir / "checkpoints" / "reward_model"
    parents, source = policy_parents(args.sft_dir, args.base_dir)
    stage = Stage(STAGE, "reward model", args.out_dir / "reward_model", run_settings(args, train_pairs, eval_pairs),
                  force=args.force, parents=parents, done_file=args.out_dir / "reward_eval.json")
    if stage.done():
        return
    stage.prepare(writable=[args.out_dir, ckpt_dir])
    resume, finished = stage.resume_point(ckpt_dir)

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model, reference, tok = init_reward_model(args.sft_dir, args.base_dir, parents, tmp)
    print(f"reward model initialised from {source}; {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; "
          f"{len(train_pairs)} train / {len(eval_pairs)} held-out pairs")
    max_len = min(args.max_length or model.config.max_position_embeddings, model.config.max_position_embeddings)
    reference.to(runtime.device())
    reward = RewardModel(model, reference, tok, args.likelihood_weight)
    margins = [0.0] * len(train_pairs)
    if args.likelihood_weight:
        with runtime.autocast(runtime.device()):  # as the classifier trains
            margins = pair_margins(reward, train_pairs, classifier=False)[1]
    trainer = build_trainer(args, model, tok, pair_dataset(tok, train_pairs, max_len, margins, args.likelihood_weight),
                            ckpt_dir)
    seconds = train_and_end(trainer, resume, finished, args.out_dir / "train.log", STAGE)
    if trainer.accelerator.is_main_process:
        save_and_evaluate(args, stage, trainer, reward, eval_pairs, {
            "initialised_from": source, "train_pairs": len(train_pairs), "steps": trainer.state.global_step,
            "train_loss": mean_logged(trainer.state, "loss"),  # the whole run, also after a resume
            "train_seconds": round(seconds, 1)})


if __name__ == "__main__":
    run_main(main)
