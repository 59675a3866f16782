"""RLHF step 2: GRPO with TRL's GRPOTrainer on the SFT policy (LoRA), rewarded by exact answers on the verifiable
arithmetic tasks and by the reward model on the chat prompts.

Reads:  the SFT policy (SFT/sft_output/merged/, else output/ + the LoRA adapter in SFT/sft_output/ merged in memory),
        the reward model RLHF/reward_model/ (python RLHF/reward_model.py), prompts: arithmetic problems from
        arithmetic_tasks and conversation prompts of RLHF/data/preference_train.jsonl.gz.
Writes: RLHF/grpo_output/           merged full model + tokenizer (AutoModelForCausalLM.from_pretrained works on it),
                                    adapter/ (the LoRA adapter alone), history.jsonl (one line per logged step),
                                    lineage.json (settings; the policy and reward model it was built from)
        RLHF/eval.json              held-out prompts: reward-model score and exact-answer accuracy of the SFT policy
                                    vs the GRPO policy, and the GRPO policy's per-token KL to the SFT policy
        RLHF/checkpoints/grpo/      resumable checkpoints: rerunning the same command resumes from the latest
        RLHF/train.log, RLHF/runs/grpo/ (TensorBoard): reward, reward std, KL, completion length, step time, and
                                    with --eval-every N the held-out exact answers every N steps (as eval.json's)

The objective (TRL 1.16 settings, chosen explicitly): loss_type="dapo" (token-level mean over the whole batch),
advantages = reward - mean reward of the prompt's group (scale_rewards="none": no division by the std),
clipped ratio (epsilon 0.2), KL to the frozen SFT policy with beta=0.05 (k3 estimator). grpo_training.py is the
same algorithm written out in plain PyTorch. Two fixes to TRL 1.16 (GRPOTrainerFixed): completions are scored at
the positions they were sampled at (TRL passes no position_ids, so the learned positions of a left-padded prompt
were shifted by its padding), and each epoch's prompt order is seeded by the epoch (a resumed run sees the same order).

Reruns: the same command on a finished run does nothing and says so. A killed run, rerun, resumes from its last
checkpoint and logs what the uninterrupted run would have (prompt order, sampling RNG and optimizer restored); a
larger --epochs continues a run exactly (the learning rate is constant after the warm-up). Checkpoints of a run
with other settings, or of another policy or reward model, are an error naming the difference: rerun with that
run's flags, or pass --force to start over. Training checks that the reward model was built on this SFT policy;
--mode eval/inference check that grpo_output still belongs to them.

    python RLHF/grpo_trl.py                                   # the cpu preset without CUDA, gpu with it
    python RLHF/grpo_trl.py --preset smoke                    # seconds
    accelerate launch --multi_gpu --num_processes=2 RLHF/grpo_trl.py   # 2 GPUs or 2 CPU processes; or torchrun
    python RLHF/grpo_trl.py --mode inference --prompt "Tom has 3 apples and gets 4 more. How many apples does Tom have now?"
    python RLHF/grpo_trl.py --mode eval                       # only rewrite RLHF/eval.json
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from llm_train import runtime, trainer_runs
from llm_train.atomic import atomic_dir, atomic_write_bytes, atomic_write_json, check_writable_dir
from llm_train.cli import apply_preset, nonnegative_float, nonnegative_int, positive_float, positive_int, settings_of
from llm_train.errors import UserError, run_main
from llm_train.lineage import already_done, check_lineage, recorded_parents, write_lineage
from llm_train.paths import GRPO_OUTPUT_DIR, OUTPUT_DIR, SFT_OUTPUT_DIR
from llm_train.rl import (
    chat_reward_model_scores,
    exact_answer_reward,
    load_policy,
    load_reward_model,
    policy_parents,
    reward_model_scores,
    rlhf_prompts,
)
from llm_train.runtime import compute_dtype, default_scale, dtype_name, end_distributed
from llm_train.sampling import completion_logps, generate_completions, last_token_logps, prompt_room, prompt_token_ids
from llm_train.tokenizer import EOT, IM_END, load_chat_tokenizer
from llm_train.trainer_runs import checkpoint_epoch, checkpoint_to_resume, train_or_finish

import torch

RLHF_DIR = GRPO_OUTPUT_DIR.parent
STAGE = "grpo"
# Budget and optimizer per scale of policy, in one place (README table); each value can be overridden by its flag.
# beta 0.05 and unscaled advantages are the same at every scale. Groups of 8 give a prompt that the policy answers
# right some of the time a non-zero advantage. The reward model's scores spread far wider than the 0/1 exact answer
# (std 3.8 on the cpu run's completions), so its weight is 0.1, and it scores only the chat prompts: the exact answer
# decides where the reward model (right on 53-78% of wrong-number pairs) cannot tell numbers apart.
# cpu, measured on one SFT policy at 96.0% held-out exact match (greedy; 71.0% sampled at temperature 0.7), one run
# each, bf16 CPU: the old preset, 128 prompts x 3 epochs in batches of 32, lost 11.5 points (84.5%; 89.5% without the
# reward model, 88.5% in fp32): its 96 arithmetic problems are learned by heart. Fresh prompts (512 x 1 epoch) in
# batches of 128 completions (16 prompts per update) after 4 warm-up steps: lr 5e-4 -> 93.5% (sampled 70.8%),
# 1e-3 -> 91.5%, 2e-4 -> 95.0% (KL 0.0003/token: it hardly moves), temperature 1.0 -> 92.0%, only the 20% most
# uncertain tokens trained -> 95.5% (sampled 67.0%). None improves on SFT: in ~4,000 sampled answers a 0/1 reward per
# answer teaches this 3M model less than SFT's supervised tokens did; this preset is the one that moves the policy
# (KL ~0.002/token) without harming it beyond chance (+-3 points on 200 problems) on bf16 policies at 86-97%. On an
# fp32-trained policy at 80.5% (58.6% sampled) it lost 6.5 points greedy, and so did the reward-model-free run (74.0%)
# and lr 2e-4 (75.5%, KL 0.0009/token), while sampled accuracy stayed (56.9 / 59.1 / 59.9%); groups sampled at
# temperature 0.3 with lr 2e-4: 75.5% (a bf16 policy at 89.0%: 89.5%). Twice the steps on an 86.5% policy: 88.0%
# without the reward model, 83.5% with it. On an Intel Xeon (AMX) policy at 94.5% (71.1% sampled): 31 steps 92.5%,
# 23 steps (this preset: ~40 s less) 94.0%, and training only on the problems the policy is least sure of (the 12.5%
# with the least likely reference token, which held all its greedy errors) 89.0%: what changes between the SFT and
# GRPO answers is mostly one digit one higher ("13 - 6 = 8", "4 + 1 = 6"), a shift of all digits, not a fixed fact.
# Partial credit for a wrong answer (half the share of the reference worked answer it matches before its first wrong
# character), on an 89.5% bf16 policy (sampled 67.5%): 88.0% (68.4%), as the 0/1 reward's 88.5% (68.4%).
# The groups do hold signal: 16 answers sampled at 0.7 per held-out problem of that policy include the right one for
# all 21 it answers wrong greedily (0.30 of them right on average), and not only right ones for 166 of the 179 it
# answers right (0.73): 23 updates of 16 prompts are too few to move it, and a larger lr or more steps cost greedy
# answers (above). All weights trained instead of LoRA (same steps, on that policy): lr 3e-5 88.5% (sampled 67.9%),
# 1e-4 79.5% (61.8%), 3e-4 43.0% (30.6%; the training reward fell from ~0.65 to ~0.35 once the warm-up reached it).
# Far more steps, on one H200 (the same policy, no reward model, --eval-every 16/32; greedy / sampled at 0.7 on the
# held-out problems, SFT 89.5% / 70%): the cpu preset for 192 steps of 128 answers 93.0% / 79.0%; groups of 16,
# batches of 256: 94.5% / 81.9% after 192 steps, 96.5% / 88.5% after 320 (82,000 sampled answers); lr 1e-3: 94.0% /
# 77.8% after 96 steps, 93.5% / 82.9% after 192, the most per sampled answer; batches of 32 or 64 (lr 2e-4, 3e-4)
# gain less per answer. From the pretrained base (75.5% / 58%, no SFT): 91.5% / 78.2% after 192 steps of 128, 95.0%
# / 87.1% after 352 of 256. So GRPO does teach this model, given 10-30x the answers this preset samples (2,944 in 23
# steps: before any gain shows); +10 points over an 89.5% policy (99.5%) was reached by none. On the AVX512-BF16
# EPYC (bf16), lr 1e-3 for 94 steps (--num-prompts 1536, reward model on) trains 630 s: 87.0% / 71.5% (SFT 67.5%).
PRESETS = {
    "gpu": dict(rm_weight=0.1, exact_weight=1.0, num_prompts=2048, epochs=3.0, num_generations=8, batch_size=64,
                warmup_steps=0, max_completion_length=64, temperature=1.0, lr=5e-5, lora_r=16, save_steps=100,
                eval_arithmetic=200, eval_conversation=64, eval_every=64),
    "cpu": dict(rm_weight=0.1, exact_weight=1.0, num_prompts=384, epochs=1.0, num_generations=8, batch_size=128,
                warmup_steps=4, max_completion_length=56, temperature=0.7, lr=5e-4, lora_r=16, save_steps=8,
                eval_arithmetic=200, eval_conversation=32, eval_every=0),
    "smoke": dict(rm_weight=1.0, exact_weight=1.0, num_prompts=8, epochs=1.0, num_generations=4, batch_size=8,
                  warmup_steps=0, max_completion_length=12, temperature=1.0, lr=2e-4, lora_r=16, save_steps=10,
                  eval_arithmetic=8, eval_conversation=4, eval_every=0),
}
SAMPLES = 4  # sampled answers per held-out problem in eval.json (the greedy one is the headline number)
DEFAULT_CHAT_PROMPTS = ["Anna has 12 apples and gets 7 more. How many apples does Anna have now?",
                        "小明有25本书，送给别人8本书。还剩多少本书？", "Hello, how are you?", "你好"]


def grpo_trainer_class():
    """GRPOTrainer of TRL 1.16 with two fixes (a function, so that trl is imported only when training):

    - The log-probabilities of the loss (policy, old and reference) are computed at the positions generate()
      sampled the completions at. TRL passes no position_ids, so the model numbered a left-padded row 0, 1, ...
      from its first pad token, while generate() numbers it from its first real token: GPT-2's learned positions
      differed between sampling and training by the padding of each prompt. They are a plain log-softmax of the
      completion positions: TRL's chunked LM-head kernel scores every prompt and pad position off CUDA (2.8x slower
      in bf16, bench/bench_grpo.py).
    - Each epoch's prompt order is drawn from a generator seeded by (seed + epoch). TRL's RepeatSampler draws every
      epoch from one generator, so a run resumed in a later epoch got the first epoch's order again.
    """
    from trl import GRPOTrainer
    from trl.trainer.utils import RepeatSampler

    class EpochSeededSampler(RepeatSampler):
        def set_epoch(self, epoch):  # the Trainer calls it before each epoch; first_epoch covers the resumes under
            self.epoch = epoch       # several processes, where the call does not reach the sampler

        def __iter__(self):
            if self.shuffle:
                self.generator.manual_seed(self.seed + self.epoch)
            self.epoch += 1
            return super().__iter__()

    class GRPOTrainerFixed(GRPOTrainer):
        first_epoch = 0  # the epoch a resumed run starts in (checkpoint_epoch)

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, **kwargs):
            logps, entropies = [], []
            rows = batch_size or input_ids.size(0)
            for start in range(0, input_ids.size(0), rows):
                ids, mask = input_ids[start:start + rows], attention_mask[start:start + rows]
                with self.accelerator.autocast():
                    token_logps, log_softmax = last_token_logps(model, ids, mask, logits_to_keep,
                                                                            self.temperature)
                completion_mask = mask[:, -logits_to_keep:]  # 0 after a completion's end, as TRL's labels -100
                logps.append(token_logps * completion_mask)
                if compute_entropy:
                    entropies.append(-(log_softmax.exp() * log_softmax).sum(-1) * completion_mask)
            return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

        def _get_train_sampler(self, dataset=None):
            sampler = super()._get_train_sampler(dataset)
            sampler.__class__, sampler.epoch = EpochSeededSampler, self.first_epoch
            return sampler

    return GRPOTrainerFixed


def grpo_config(args, output_dir, reward_weights, dtype):
    """The GRPOConfig of a run (tests build TRL's side of the loss comparison from it too)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(output_dir), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        learning_rate=args.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=args.warmup_steps,
        beta=0.05, loss_type="dapo", scale_rewards="none", epsilon=0.2, temperature=args.temperature,
        reward_weights=reward_weights, logging_steps=1, save_strategy="steps", save_steps=args.save_steps,
        save_total_limit=2, report_to="none", seed=args.seed, gradient_checkpointing=False,
        bf16=dtype == "bf16", fp16=dtype == "fp16",  # mixed precision: autocast over fp32 weights
        use_cpu=not torch.cuda.is_available(), disable_dropout=True, dataloader_num_workers=0)


def reward_functions(args, device):
    """TRL reward functions (prompts, completions, **dataset columns) -> one float (or None) per completion,
    with their weights. TRL sums the weighted rewards; advantages are taken from that sum."""
    funcs, weights = [], []
    if args.rm_weight:
        rm, rm_tok = load_reward_model(args.reward_model, device)

        def reward_model_score(prompts, completions, answer, **kwargs):
            return chat_reward_model_scores(rm, rm_tok, prompts, [c[-1]["content"] for c in completions],
                                                        answer)

        funcs.append(reward_model_score)
        weights.append(args.rm_weight)
    if args.exact_weight:
        def exact_answer(prompts, completions, answer, **kwargs):
            return exact_answer_reward([c[-1]["content"] for c in completions], answer)

        funcs.append(exact_answer)
        weights.append(args.exact_weight)
    return funcs, weights


def parents_of(args):
    """What grpo_output is built from: the SFT policy (and the base under an adapter) and the reward model."""
    has_rm = args.rm_weight and (Path(args.reward_model) / "config.json").is_file()
    return {**policy_parents(args.sft_dir, args.base_dir),
            "reward_model": args.reward_model if has_rm else None}


def rerun_command(args):
    return trainer_runs.rerun_command("RLHF/grpo_trl.py", sft_dir=(args.sft_dir, SFT_OUTPUT_DIR),
                                     base_dir=(args.base_dir, OUTPUT_DIR), out_dir=(args.out_dir, RLHF_DIR))


def sampled_exact_answer_accuracy(args, model, tok, messages, answers, batch_size=32):
    """Exact-answer accuracy of SAMPLES answers per problem, sampled at the training temperature from args.seed
    (a smoother measure than one greedy answer each): eval.json's, and the --eval-every curve's."""
    torch.manual_seed(args.seed)
    _, sampled = generate_completions(model, tok, [m for m in messages for _ in range(SAMPLES)],
                                                  args.max_completion_length, do_sample=True,
                                                  temperature=args.temperature, batch_size=batch_size,
                                                  dtype=dtype_name(allow_fp16=True))
    rewards = exact_answer_reward(sampled, [a for a in answers for _ in range(SAMPLES)])
    return sum(rewards) / max(1, len(rewards))


def heldout_exact_answers(args, model, tok, arithmetic):
    """(greedy, sampled) exact-answer accuracy of model on the held-out arithmetic prompts during training (the
    --eval-every curve), in batches of 128 (faster than eval.json's 32). The global RNG is left as it was, so
    training samples what it would without."""
    messages, answers = [p["prompt"] for p in arithmetic], [p["answer"] for p in arithmetic]
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        _, greedy = generate_completions(model, tok, messages, args.max_completion_length,
                                                     do_sample=False, batch_size=128,
                                                     dtype=dtype_name(allow_fp16=True))
        sampled = sampled_exact_answer_accuracy(args, model, tok, messages, answers, batch_size=128)
    model.train(was_training)
    greedy = exact_answer_reward(greedy, answers)
    return sum(greedy) / len(greedy), sampled


def evaluate(args, grpo_model, tok):
    """Held-out prompts: mean reward-model score and exact-answer accuracy (greedy answers, and SAMPLES answers per
    problem sampled at the training temperature) of the SFT policy and the GRPO policy, and the mean per-token
    KL(GRPO || SFT) on completions sampled from the GRPO policy. Answers are generated under the compute dtype's
    autocast, as in training, SFT's evaluation and Eval/evaluate.py (bf16 and fp32 greedy answers can differ)."""
    device = runtime.device()
    dtype = dtype_name(allow_fp16=True)
    prompts = rlhf_prompts("heldout", args.eval_arithmetic, args.eval_conversation, seed=args.seed)
    messages, answers = [p["prompt"] for p in prompts], [p["answer"] for p in prompts]
    sft_model = load_policy(args.sft_dir, args.base_dir)[0].to(device)
    grpo_model = grpo_model.to(device)
    has_rm = (Path(args.reward_model) / "config.json").is_file()
    rm = load_reward_model(args.reward_model, device) if has_rm else None
    result = {"prompts": len(prompts), "arithmetic_prompts": sum(a is not None for a in answers),
              "max_new_tokens": args.max_completion_length, "sampling": {"temperature": args.temperature,
                                                                        "samples_per_problem": SAMPLES}}
    im_end = tok.convert_tokens_to_ids(IM_END)
    arithmetic = [(m, a) for m, a in zip(messages, answers) if a is not None]
    for name, model in (("sft", sft_model), ("grpo", grpo_model)):
        model.eval()
        ids, texts = generate_completions(model, tok, messages, args.max_completion_length,
                                                      do_sample=False, dtype=dtype)
        rewards = exact_answer_reward(texts, answers)
        exact = [r for r in rewards if r is not None]
        by_kind = {}
        for r, p in zip(rewards, prompts):  # per operation and language, e.g. "add_en"
            if r is not None:
                by_kind.setdefault(p["kind"], []).append(r)
        result[name] = {"exact_answer_accuracy": sum(exact) / max(1, len(exact)),
                        "exact_answer_by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
                        "ends_with_im_end": sum(bool(x) and x[-1] == im_end for x in ids) / max(1, len(ids)),
                        "examples": [{"prompt": m[-1]["content"], "completion": t} for m, t in zip(messages[::9], texts[::9])]}
        if rm is not None:
            scores = reward_model_scores(rm[0], rm[1], messages, texts)
            result[name]["reward_model_score"] = sum(scores) / len(scores)
        # What GRPO optimizes: answers sampled at the training temperature (its reward on the training prompts can
        # rise by learning those prompts by heart; this is the same measure on held-out ones). Both models are
        # sampled from the same seed: the SFT policy against itself gives the same value.
        result[name]["sampled_exact_answer_accuracy"] = sampled_exact_answer_accuracy(
            args, model, tok, [m for m, _ in arithmetic], [a for _, a in arithmetic])
    # KL to the reference on the GRPO policy's own samples: k1 = log p/q is unbiased, k3 is what TRL logs.
    torch.manual_seed(args.seed)  # the same samples on every evaluation of the same model
    ids, _ = generate_completions(grpo_model, tok, messages, args.max_completion_length, do_sample=True,
                                              dtype=dtype)
    prompt_ids = prompt_token_ids(tok, messages, prompt_room(grpo_model, args.max_completion_length))
    with torch.no_grad():  # scored in fp32: bf16 logits would blur a KL of ~0.001/token
        logp, mask = completion_logps(grpo_model, prompt_ids, ids)
        ref_logp, _ = completion_logps(sft_model, prompt_ids, ids)
    n = mask.sum().clamp(min=1)
    result["kl_k1_per_token"] = ((logp - ref_logp) * mask).sum().item() / n.item()
    result["kl_k3_per_token"] = ((torch.exp(ref_logp - logp) - (ref_logp - logp) - 1) * mask).sum().item() / n.item()
    atomic_write_json(args.out_dir / "eval.json", result)
    line = (f"held-out: exact-answer accuracy SFT {result['sft']['exact_answer_accuracy']:.3f} -> GRPO "
            f"{result['grpo']['exact_answer_accuracy']:.3f} (sampled at temperature {args.temperature}: "
            f"{result['sft']['sampled_exact_answer_accuracy']:.3f} -> {result['grpo']['sampled_exact_answer_accuracy']:.3f})")
    if rm is not None:
        line += (f"; reward-model score SFT {result['sft']['reward_model_score']:.3f} -> GRPO "
                 f"{result['grpo']['reward_model_score']:.3f}")
    print(line + f"; KL(GRPO||SFT) per token {result['kl_k1_per_token']:.4f} (k3 {result['kl_k3_per_token']:.4f}); "
          f"wrote {args.out_dir / 'eval.json'}")
    return result


def load_grpo_model(args, parents):
    """The trained GRPO model and tokenizer, on the GPU when there is one, after checking that it still belongs to
    its parents (dirs by role, see parents_of)."""
    from transformers import AutoModelForCausalLM

    grpo_dir = args.out_dir / "grpo_output"
    if not (grpo_dir / "config.json").is_file():
        raise UserError(f"no GRPO model in {grpo_dir}: train it first with `python RLHF/grpo_trl.py`")
    check_lineage(grpo_dir, rerun_command(args), **parents)
    model = AutoModelForCausalLM.from_pretrained(str(grpo_dir), dtype=torch.float32).eval()
    tok = load_chat_tokenizer(grpo_dir)
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(EOT)]
    return model.to(runtime.device()), tok


def inference(args):
    # inference uses none of the parents, but one replaced since (e.g. the SFT policy retrained) makes it stale
    model, tok = load_grpo_model(args, recorded_parents(args.out_dir / "grpo_output"))
    prompts = [[{"role": "user", "content": p}] for p in (args.prompt or DEFAULT_CHAT_PROMPTS)]
    _, texts = generate_completions(model, tok, prompts, args.max_new_tokens,
                                                do_sample=args.temperature > 0, temperature=max(args.temperature, 1e-5),
                                                dtype=dtype_name(allow_fp16=True))  # as evaluated
    for p, t in zip(prompts, texts):
        print(f"user: {p[-1]['content']}\nassistant: {t}\n")


def train(args):
    ckpt_dir, grpo_dir = args.checkpoint_dir or args.out_dir / "checkpoints" / "grpo", args.out_dir / "grpo_output"
    log_file, history_file = args.out_dir / "train.log", ckpt_dir / "history.jsonl"
    rank = int(os.environ.get("RANK", "0"))
    device = runtime.device()
    parents = parents_of(args)
    if args.rm_weight:  # the reward model must exist and have been trained on this policy
        if parents["reward_model"] is None:
            load_reward_model(args.reward_model)  # raises the error that says what to run
        rebuild = trainer_runs.rerun_command("RLHF/reward_model.py", sft_dir=(args.sft_dir, SFT_OUTPUT_DIR),
                                            base_dir=(args.base_dir, OUTPUT_DIR),
                                            out_dir=(Path(args.reward_model).parent, RLHF_DIR))
        check_lineage(args.reward_model, rebuild, policy=parents["policy"], base=parents["base"])
    dtype = dtype_name(allow_fp16=True)
    settings = {**settings_of(args, "rm_weight", "exact_weight", "num_prompts", "epochs", "num_generations",
                                     "batch_size", "max_completion_length", "temperature", "lr", "warmup_steps",
                                     "lora_r", "qlora", "seed"),
                "dtype": dtype, "processes": int(os.environ.get("WORLD_SIZE", "1"))}
    if not args.force and (args.out_dir / "eval.json").is_file() and already_done(
            grpo_dir, STAGE, settings, **parents):
        return
    check_writable_dir(args.out_dir)
    resume, finished = checkpoint_to_resume(ckpt_dir, STAGE, settings, args.force, may_grow=("epochs",),
                                                   **parents)
    funcs, weights = reward_functions(args, device)

    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.tensorboard import SummaryWriter
    from transformers import BitsAndBytesConfig, TrainerCallback
    from transformers.integrations import TensorBoardCallback

    with tempfile.TemporaryDirectory() as tmp:
        policy, tok = load_policy(args.sft_dir, args.base_dir)
        if args.qlora:  # reload the (merged) SFT weights as 4-bit NF4; LoRA adapters train on top
            from transformers import AutoModelForCausalLM

            policy.save_pretrained(tmp)
            generation_config = policy.generation_config
            policy = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype(
                    allow_fp16=True)))
            policy.generation_config = generation_config
    prompts = rlhf_prompts("train", args.num_prompts - args.num_prompts // 4, args.num_prompts // 4,
                                       seed=args.seed)
    # TRL generates from the whole prompt: one that leaves no room for the completion in the context is left out
    # (counted), never run past GPT-2's last position.
    room = prompt_room(policy, args.max_completion_length)
    lengths = map(len, prompt_token_ids(tok, [p["prompt"] for p in prompts]))
    fitting = [p for p, n in zip(prompts, lengths) if n <= room]
    if not fitting:
        raise UserError(f"no training prompt fits in {room} tokens next to --max-completion-length "
                               f"{args.max_completion_length}: lower it")
    dataset = Dataset.from_list(fitting)
    if rank == 0:
        print(f"policy {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M params; {len(dataset)} prompts "
              f"({len(prompts) - len(fitting)} left out: longer than {room} tokens); "
              f"rewards {[f.__name__ for f in funcs]} weights {weights}")

    if rank == 0 and history_file.exists():  # drop history logged after the checkpoint we resume from
        done = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"] if resume else 0
        kept = [line for line in history_file.read_text().splitlines() if json.loads(line).get("step", 0) <= done]
        atomic_write_bytes(history_file, "".join(line + "\n" for line in kept).encode())

    heldout = rlhf_prompts("heldout", args.eval_arithmetic, 0, seed=args.seed) if args.eval_every else []

    class Logs(TrainerCallback):  # train.log (all stages) and history.jsonl (this run, for the report card)
        def on_log(self, a, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs:
                record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
                for path, rec in ((log_file, {"stage": STAGE, **record}), (history_file, record)):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with open(path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")

        # --eval-every: the held-out accuracy as training goes (step 0 = the SFT policy), on rank 0 alone
        def on_train_begin(self, a, state, control, model=None, **kw):
            if state.global_step == 0:
                self.on_step_end(a, state, control, model=model)

        def on_step_end(self, a, state, control, model=None, **kw):
            if heldout and state.global_step % args.eval_every == 0 and state.is_world_process_zero:
                greedy, sampled = heldout_exact_answers(args, model, tok, heldout)
                print(f"step {state.global_step}: held-out exact answers {greedy:.3f} (sampled at temperature "
                      f"{args.temperature}: {sampled:.3f})")
                logs = {"heldout/exact_answer": greedy, "heldout/sampled_exact_answer": sampled}
                for callback in [self] + ([tensorboard] if tensorboard else []):
                    callback.on_log(a, state, control, logs=logs)

    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)  # GPT-2 uses Conv1D
    tensorboard = TensorBoardCallback(SummaryWriter(str(args.out_dir / "runs" / STAGE))) if rank == 0 else None
    callbacks = [Logs()] + ([tensorboard] if tensorboard else [])
    trainer = grpo_trainer_class()(model=policy, reward_funcs=funcs, args=grpo_config(args, ckpt_dir, weights, dtype),
                                   train_dataset=dataset, processing_class=tok, peft_config=lora, callbacks=callbacks)
    trainer.first_epoch = checkpoint_epoch(resume)
    if rank == 0 and resume:
        print(f"resuming from {resume}" + (" (the run's last step: nothing left to train)" if finished else ""))
        with open(log_file, "a", encoding="utf-8") as f:
            f.write(json.dumps({"stage": STAGE, "event": "resume", "checkpoint": resume, "time": time.time()}) + "\n")
    t0 = time.time()
    train_or_finish(trainer, resume, finished)
    end_distributed()  # rank 0 goes on alone: saving and evaluating use no collectives
    if not trainer.accelerator.is_main_process:
        return
    print(f"trained {trainer.state.global_step} steps in {time.time() - t0:.0f} s")

    # Save the adapter and the merged model (the adapter merged into full-precision SFT weights, also after QLoRA).
    from peft import PeftModel

    with atomic_dir(grpo_dir) as tmp:
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(str(tmp / "adapter"))
        base, _ = load_policy(args.sft_dir, args.base_dir)
        merged = PeftModel.from_pretrained(base, str(tmp / "adapter")).merge_and_unload()
        merged.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        if history_file.exists():
            (tmp / "history.jsonl").write_bytes(history_file.read_bytes())
        write_lineage(tmp, STAGE, settings, **parents)
    print(f"saved the GRPO model to {grpo_dir} (adapter in {grpo_dir / 'adapter'})")
    evaluate(args, *load_grpo_model(args, parents))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["train", "inference", "eval"], default="train")
    parser.add_argument("--sft-dir", type=Path, default=SFT_OUTPUT_DIR, help="SFT output (or any causal LM dir)")
    parser.add_argument("--base-dir", type=Path, default=OUTPUT_DIR, help="pretrained base of the SFT adapter")
    parser.add_argument("--reward-model", type=Path, help="default: OUT_DIR/reward_model (= RLHF/reward_model)")
    parser.add_argument("--out-dir", type=Path, default=RLHF_DIR,
                        help="writes grpo_output/, eval.json, checkpoints/grpo/, runs/grpo/, train.log here")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="Trainer checkpoints and history.jsonl (default: OUT_DIR/checkpoints/grpo)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="budget and optimizer for the policy's size "
                        "(default: gpu with CUDA, cpu without); the flags below marked (preset) override it")
    parser.add_argument("--rm-weight", type=nonnegative_float, help="(preset) weight of the reward-model score")
    parser.add_argument("--exact-weight", type=nonnegative_float,
                        help="(preset) weight of the exact-answer reward (0/1)")
    parser.add_argument("--num-prompts", type=positive_int,
                        help="(preset) training prompts: 3/4 arithmetic, 1/4 chat")
    parser.add_argument("--epochs", type=positive_float, help="(preset)")
    parser.add_argument("--num-generations", type=positive_int,
                        help="(preset) group size: completions per prompt (at least 2)")
    parser.add_argument("--batch-size", type=positive_int, help="(preset) completions per device per step")
    parser.add_argument("--max-completion-length", type=positive_int,
                        help="(preset) longest completion (a worked arithmetic answer is ~40-50 tokens)")
    parser.add_argument("--temperature", type=nonnegative_float,
                        help="(preset) sampling temperature of the training groups, of eval.json's sampled answers "
                        "and of --mode inference (0 = greedy, inference only)")
    parser.add_argument("--lr", type=positive_float, help="(preset)")
    parser.add_argument("--warmup-steps", type=nonnegative_int,
                        help="(preset) optimizer steps of linear lr warm-up, then constant")
    parser.add_argument("--lora-r", type=positive_int, help="(preset)")
    parser.add_argument("--qlora", action="store_true", help="4-bit NF4 policy weights (bitsandbytes) under LoRA")
    parser.add_argument("--save-steps", type=positive_int, help="(preset)")
    parser.add_argument("--eval-arithmetic", type=nonnegative_int,
                        help="(preset) held-out arithmetic prompts in eval.json")
    parser.add_argument("--eval-conversation", type=nonnegative_int,
                        help="(preset) held-out chat prompts in eval.json")
    parser.add_argument("--eval-every", type=nonnegative_int,
                        help="(preset) log the held-out exact-answer accuracy (greedy, and sampled) every N steps "
                        "and before the first (0 = only at the end, in eval.json)")
    parser.add_argument("--prompt", action="append", help="inference: a user message (repeatable)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="inference: longest answer")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--force", action="store_true",
                        help="redo a finished run, and discard checkpoints of a run with other settings")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = apply_preset(parser.parse_args(argv), PRESETS, default_scale())
    args.reward_model = args.reward_model or args.out_dir / "reward_model"
    if args.mode == "train":  # what TRL would reject later with a traceback
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        if not args.rm_weight and not args.exact_weight:
            parser.error("--rm-weight and --exact-weight are both 0: there is nothing to reward")
        if args.num_generations < 2:
            parser.error("--num-generations must be at least 2: advantages compare completions of the same prompt")
        if args.batch_size * processes % args.num_generations:
            parser.error(f"--batch-size {args.batch_size} x {processes} process(es) must be a multiple of "
                         f"--num-generations {args.num_generations}: a step holds whole groups")
    if args.mode != "inference" and args.temperature == 0:
        parser.error("--temperature must be above 0 for training and evaluation (0 = greedy is for --mode inference)")
    if args.mode != "inference" and not args.eval_arithmetic + args.eval_conversation:
        parser.error("--eval-arithmetic and --eval-conversation are both 0: there is nothing to evaluate")
    return args


def main():
    args = parse_args()
    if args.mode == "inference":
        inference(args)
    elif args.mode == "eval":
        evaluate(args, *load_grpo_model(args, parents_of(args)))  # the SFT policy it is compared to is its parent
    else:
        train(args)


if __name__ == "__main__":
    run_main(main)
