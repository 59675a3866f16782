"""GRPO written out in plain PyTorch, to read top to bottom: the same algorithm and settings as grpo_trl.py
(TRL 1.16, loss_type="dapo", scale_rewards="none", beta=0.05), on the same prompts and reward functions.

For each step: take a few prompts, sample a group of G completions per prompt from the current policy, score
each completion (reward model + exact answer), and turn scores into group-relative advantages
    A_i = r_i - mean(r_group)                                  (no division by the std: Dr. GRPO / scale_rewards="none")
Then minimise, over every completion token t, averaged over all completion tokens in the batch ("dapo"),
    -min(ratio_t * A, clip(ratio_t, 1-eps, 1+eps) * A) + beta * ratio_t * k3_t
where ratio_t = pi(token)/pi_old(token) (1 in value here: one update per batch, but it carries the gradient),
k3_t = exp(ref - logp) - (ref - logp) - 1 is the KL estimator to the frozen reference (the SFT policy), and the
ratio factor on k3 is TRL's use_bias_correction_kl=True. tests/test_rlhf.py checks that this loss and its
gradients equal TRL's GRPOTrainer.compute_loss on the same batch, in fp32 and under bf16 autocast, and that the
log-probabilities it uses are those of the sampling pass (left-padded prompts are scored at the positions
generate() gave them). As in grpo_trl.py, dropout is off (TRL's disable_dropout) and every forward pass, sampling
and scoring, runs under the compute dtype's autocast over fp32 weights, as under TRL's accelerate-wrapped model
(dtype_name: bf16 on GPUs and bf16-capable CPUs, else fp32; LLM_TRAIN_DTYPE=bf16|fp32 forces it).

Unlike grpo_trl.py it trains all weights (no LoRA), runs in one process, and writes only
RLHF/checkpoints/grpo_training/ (final model + tokenizer + lineage.json) and its log lines to RLHF/train.log. A rerun
of a finished run with the same settings, policy and reward model does nothing and says so (llm_train/stage.py);
there are no intermediate checkpoints, so a killed run starts over when rerun.

    python RLHF/grpo_training.py                    # short default: 16 prompts, 1 epoch
    python RLHF/grpo_training.py --num-prompts 64 --epochs 3
"""
import argparse
import copy
import time
from pathlib import Path

from llm_train import runtime
from llm_train.cli import nonnegative_float, nonnegative_int, positive_float, positive_int, settings_of
from llm_train.engine import generate_completions, prompt_room, prompt_token_ids
from llm_train.errors import run_main
from llm_train.lineage import check_lineage
from llm_train.paths import GRPO_OUTPUT_DIR, OUTPUT_DIR, SFT_OUTPUT_DIR
from llm_train.rl import (
    chat_reward_model_scores,
    exact_answer_reward,
    load_policy,
    load_reward_model,
    policy_parents,
    rlhf_prompts,
)
from llm_train.runtime import autocast, dtype_name
from llm_train.sampling import completion_logps
from llm_train.stage import Stage
from llm_train.trainer_runs import append_jsonl, rerun_command

import torch

RLHF_DIR = GRPO_OUTPUT_DIR.parent
BETA, EPSILON = 0.05, 0.2


def group_advantages(rewards, group_size):
    """reward minus the mean reward of its group (the G completions of one prompt); no std scaling."""
    grouped = rewards.view(-1, group_size)
    return (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, beta=BETA, epsilon=EPSILON):
    """The clipped GRPO objective with a k3 KL penalty, averaged over all completion tokens of the batch.
    logps/old_logps/ref_logps/mask: (B, T); advantages: (B,)."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    adv = advantages[:, None]
    policy_term = -torch.min(ratio * adv, clipped * adv)
    kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1  # k3: unbiased, always >= 0
    per_token = policy_term + beta * kl * ratio  # ratio on the KL: TRL's use_bias_correction_kl
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft-dir", type=Path, default=SFT_OUTPUT_DIR, help="SFT output (or any causal LM dir)")
    parser.add_argument("--base-dir", type=Path, default=OUTPUT_DIR, help="pretrained base of the SFT adapter")
    parser.add_argument("--reward-model", type=Path, help="default: OUT_DIR/reward_model (= RLHF/reward_model)")
    parser.add_argument("--out-dir", type=Path, default=RLHF_DIR)
    parser.add_argument("--rm-weight", type=nonnegative_float, default=1.0)
    parser.add_argument("--exact-weight", type=nonnegative_float, default=1.0)
    parser.add_argument("--num-prompts", type=positive_int, default=16,
                        help="training prompts: 3/4 arithmetic, 1/4 chat")
    parser.add_argument("--epochs", type=positive_int, default=1)
    parser.add_argument("--prompts-per-step", type=positive_int, default=4)
    parser.add_argument("--num-generations", type=positive_int, default=4, help="group size G (at least 2)")
    parser.add_argument("--max-completion-length", type=positive_int, default=32)
    parser.add_argument("--temperature", type=positive_float, default=1.0)
    parser.add_argument("--lr", type=positive_float, default=1e-5)
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--force", action="store_true", help="redo a finished run")
    args = parser.parse_args(argv)
    if args.num_generations < 2:
        parser.error("--num-generations must be at least 2: advantages compare completions of the same prompt")
    if not args.rm_weight and not args.exact_weight:
        parser.error("--rm-weight and --exact-weight are both 0: there is nothing to reward")
    args.reward_model = args.reward_model or args.out_dir / "reward_model"
    return args


def rewards_of(args, rm, messages, texts, answers):
    """The weighted reward of each completion; a reward a prompt has no value for counts 0: the exact answer on a chat
    prompt, and (as in grpo_trl.py) the reward model's score where an exact answer is checked. rm: a RewardModel or
    None."""
    rewards = torch.zeros(len(texts))
    if rm is not None:
        scores = chat_reward_model_scores(rm, messages, texts, answers)
        rewards += args.rm_weight * torch.tensor([0.0 if r is None else r for r in scores])
    if args.exact_weight:
        exact = exact_answer_reward(texts, answers)
        rewards += args.exact_weight * torch.tensor([0.0 if r is None else r for r in exact])
    return rewards


def grpo_step(args, policy, reference, optimizer, tok, rm, batch):
    """One GRPO update on a batch of prompts; returns the numbers logged for it."""
    G, device, dtype = args.num_generations, runtime.device(), dtype_name(allow_fp16=True)
    messages = [p["prompt"] for p in batch for _ in range(G)]  # each prompt G times, groups adjacent
    answers = [p["answer"] for p in batch for _ in range(G)]

    # 1. Sample a group of completions per prompt from the current policy.
    completion_ids, texts = generate_completions(
        policy, tok, messages, args.max_completion_length, do_sample=True, temperature=args.temperature, dtype=dtype)
    # 2. Score them, and turn the scores into group-relative advantages.
    rewards = rewards_of(args, rm, messages, texts, answers)
    advantages = group_advantages(rewards, G).to(device)

    # 3. Log-probabilities of the sampled tokens: reference (frozen) and current policy (with gradient).
    prompt_ids = prompt_token_ids(tok, messages, prompt_room(policy, args.max_completion_length))
    with autocast(device, dtype):
        with torch.no_grad():
            ref_logps, _ = completion_logps(reference, prompt_ids, completion_ids, args.temperature)
        logps, mask = completion_logps(policy, prompt_ids, completion_ids, args.temperature)
    old_logps = logps.detach()  # one update per batch: the sampling policy is the current one

    # 4. One gradient step on the clipped objective + KL penalty.
    loss = grpo_loss(logps, old_logps, ref_logps, advantages, mask)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()

    with torch.no_grad():
        kl = ((torch.exp(ref_logps - logps) - (ref_logps - logps) - 1) * mask).sum() / mask.sum()
    return {"loss": loss.item(), "reward": rewards.mean().item(), "reward_std": rewards.std().item(),
            "kl": kl.item(), "completion_length": mask.sum(1).mean().item()}


def stage_of(args):
    """The run's Stage: its output dir, settings and parents (the SFT policy, and the reward model it uses, which
    must have been built on that policy: a UserError otherwise)."""
    parents = policy_parents(args.sft_dir, args.base_dir)
    if args.rm_weight:
        if not (args.reward_model / "config.json").is_file():
            load_reward_model(args.reward_model)  # raises the error that says what to run
        check_lineage(args.reward_model, rerun_command(
            "RLHF/reward_model.py", sft_dir=(args.sft_dir, SFT_OUTPUT_DIR),
            base_dir=(args.base_dir, OUTPUT_DIR), out_dir=(args.reward_model.parent, RLHF_DIR)), **parents)
    paths = ("sft_dir", "base_dir", "reward_model", "out_dir", "force")
    settings = {**settings_of(args, *sorted(k for k in vars(args) if k not in paths)),
                "dtype": dtype_name(allow_fp16=True)}
    return Stage("grpo_training", "plain-PyTorch GRPO policy", args.out_dir / "checkpoints" / "grpo_training",
                 settings, force=args.force,
                 parents={**parents, "reward_model": args.reward_model if args.rm_weight else None})


def main(argv=None):
    args = parse_args(argv)
    stage = stage_of(args)
    if stage.done():
        return
    stage.prepare(writable=[args.out_dir])
    device = runtime.device()
    rm = load_reward_model(args.reward_model, device) if args.rm_weight else None
    torch.manual_seed(args.seed)

    policy, tok = load_policy(args.sft_dir, args.base_dir)
    # Dropout stays off (eval mode throughout, TRL's disable_dropout): ratio and KL compare the same function.
    policy = policy.to(device).eval()
    reference = copy.deepcopy(policy).requires_grad_(False)  # the frozen SFT policy the KL is measured to
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    prompts = rlhf_prompts("train", args.num_prompts - args.num_prompts // 4, args.num_prompts // 4, seed=args.seed)
    print(f"policy {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M params, {len(prompts)} prompts, "
          f"G={args.num_generations}, {dtype_name(allow_fp16=True)} on {device}")
    step = 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(prompts)).tolist()
        for start in range(0, len(order), args.prompts_per_step):
            t0 = time.time()
            numbers = grpo_step(args, policy, reference, optimizer, tok, rm,
                                [prompts[i] for i in order[start:start + args.prompts_per_step]])
            step += 1
            record = {"stage": "grpo_training", "step": step, "epoch": epoch, **numbers, "step_time": time.time() - t0}
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
            append_jsonl(args.out_dir / "train.log", record)
    with stage.output() as tmp:
        policy.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    print(f"saved the policy to {stage.out_dir}")


if __name__ == "__main__":
    run_main(main)
