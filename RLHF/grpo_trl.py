"""RLHF step 2: GRPO with TRL's GRPOTrainer on the SFT policy (LoRA), rewarded by the reward model and by exact
answers to the verifiable arithmetic tasks.

Reads:  the SFT policy (SFT/sft_output/merged/, else output/ + the LoRA adapter in SFT/sft_output/ merged in memory),
        the reward model RLHF/reward_model/ (python RLHF/reward_model.py), prompts: arithmetic problems from
        common.arithmetic_tasks and conversation prompts of RLHF/data/preference_train.jsonl.gz.
Writes: RLHF/grpo_output/           merged full model + tokenizer (AutoModelForCausalLM.from_pretrained works on it),
                                    adapter/ (the LoRA adapter alone), history.jsonl (one line per logged step)
        RLHF/eval.json              held-out prompts: reward-model score and exact-answer accuracy of the SFT policy
                                    vs the GRPO policy, and the GRPO policy's per-token KL to the SFT policy
        RLHF/checkpoints/grpo/      resumable checkpoints: rerunning the same command resumes from the latest
        RLHF/train.log, RLHF/runs/grpo/ (TensorBoard): reward, reward std, KL, completion length, step time

The objective (TRL 1.16 settings, chosen explicitly): loss_type="dapo" (token-level mean over the whole batch),
advantages = reward - mean reward of the prompt's group (scale_rewards="none": no division by the std),
clipped ratio (epsilon 0.2), KL to the frozen SFT policy with beta=0.05 (k3 estimator). grpo_training.py is the
same algorithm written out in plain PyTorch.

    python RLHF/grpo_trl.py                                   # CPU default (~3 min)
    python RLHF/grpo_trl.py --num-prompts 16 --epochs 1       # smoke
    accelerate launch --multi_gpu --num_processes=2 RLHF/grpo_trl.py   # 2 GPUs or 2 CPU processes; or torchrun
    python RLHF/grpo_trl.py --mode inference --prompt "Tom has 3 apples and gets 4 more. How many apples does Tom have now?"
    python RLHF/grpo_trl.py --mode eval                       # only rewrite RLHF/eval.json
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

import torch  # noqa: E402

RLHF_DIR = common.GRPO_OUTPUT_DIR.parent




def latest_checkpoint(ckpt_dir):
    """Newest checkpoint-N whose trainer_state.json exists: Trainer writes that file last, so a checkpoint cut
    short by a kill is skipped."""
    ckpts = [p for p in Path(ckpt_dir).glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return str(max(ckpts, key=lambda p: int(p.name.split("-")[-1]))) if ckpts else None


def load_reward_model(path):
    from transformers import AutoModelForSequenceClassification

    if not (Path(path) / "config.json").is_file():
        raise common.UserError(f"no reward model in {path}: run `python RLHF/reward_model.py` first "
                               "(or pass --rm-weight 0 to train on exact answers alone)")
    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, common.load_chat_tokenizer(path)


def reward_functions(args, device):
    """TRL reward functions (prompts, completions, **dataset columns) -> one float (or None) per completion,
    with their weights. TRL sums the weighted rewards; advantages are taken from that sum."""
    funcs, weights = [], []
    if args.rm_weight:
        rm, rm_tok = load_reward_model(args.reward_model)
        rm.to(device)

        def reward_model_score(prompts, completions, **kwargs):
            return common.reward_model_scores(rm, rm_tok, prompts, [c[-1]["content"] for c in completions])

        funcs.append(reward_model_score)
        weights.append(args.rm_weight)
    if args.exact_weight:
        def exact_answer(prompts, completions, answer, **kwargs):
            return common.exact_answer_reward([c[-1]["content"] for c in completions], answer)

        funcs.append(exact_answer)
        weights.append(args.exact_weight)
    if not funcs:
        raise common.UserError("--rm-weight and --exact-weight are both 0: there is nothing to reward")
    return funcs, weights


def evaluate(args, grpo_model, tok):
    """Held-out prompts: mean reward-model score and exact-answer accuracy (greedy answers) of the SFT policy and
    the GRPO policy, and the mean per-token KL(GRPO || SFT) on completions sampled from the GRPO policy."""
    prompts = common.rlhf_prompts("heldout", args.eval_arithmetic, args.eval_conversation, seed=args.seed)
    messages, answers = [p["prompt"] for p in prompts], [p["answer"] for p in prompts]
    sft_model, _ = common.load_policy(args.sft_dir, args.base_dir)
    rm = load_reward_model(args.reward_model) if (Path(args.reward_model) / "config.json").is_file() else None
    result = {"prompts": len(prompts), "arithmetic_prompts": sum(a is not None for a in answers),
              "max_new_tokens": args.max_completion_length}
    for name, model in (("sft", sft_model), ("grpo", grpo_model)):
        model.eval()
        _, texts = common.generate_completions(model, tok, messages, args.max_completion_length, do_sample=False)
        exact = [r for r in common.exact_answer_reward(texts, answers) if r is not None]
        result[name] = {"exact_answer_accuracy": sum(exact) / max(1, len(exact)),
                        "examples": [{"prompt": m[-1]["content"], "completion": t} for m, t in zip(messages[::9], texts[::9])]}
        if rm is not None:
            scores = common.reward_model_scores(rm[0], rm[1], messages, texts)
            result[name]["reward_model_score"] = sum(scores) / len(scores)
    # KL to the reference on the GRPO policy's own samples: k1 = log p/q is unbiased, k3 is what TRL logs.
    ids, _ = common.generate_completions(grpo_model, tok, messages, args.max_completion_length, do_sample=True)
    prompt_ids = common.prompt_token_ids(tok, messages)
    with torch.no_grad():
        logp, mask = common.completion_logps(grpo_model, prompt_ids, ids)
        ref_logp, _ = common.completion_logps(sft_model, prompt_ids, ids)
    n = mask.sum().clamp(min=1)
    result["kl_k1_per_token"] = ((logp - ref_logp) * mask).sum().item() / n.item()
    result["kl_k3_per_token"] = ((torch.exp(ref_logp - logp) - (ref_logp - logp) - 1) * mask).sum().item() / n.item()
    common.atomic_write_json(args.out_dir / "eval.json", result)
    line = (f"held-out: exact-answer accuracy SFT {result['sft']['exact_answer_accuracy']:.3f} -> GRPO "
            f"{result['grpo']['exact_answer_accuracy']:.3f}")
    if rm is not None:
        line += (f"; reward-model score SFT {result['sft']['reward_model_score']:.3f} -> GRPO "
                 f"{result['grpo']['reward_model_score']:.3f}")
    print(line + f"; KL(GRPO||SFT) per token {result['kl_k1_per_token']:.4f} (k3 {result['kl_k3_per_token']:.4f}); "
          f"wrote {args.out_dir / 'eval.json'}")
    return result


def load_grpo_model(grpo_dir):
    from transformers import AutoModelForCausalLM

    if not (Path(grpo_dir) / "config.json").is_file():
        raise common.UserError(f"no GRPO model in {grpo_dir}: train it first with `python RLHF/grpo_trl.py`")
    model = AutoModelForCausalLM.from_pretrained(str(grpo_dir), dtype=torch.float32).eval()
    tok = common.load_chat_tokenizer(grpo_dir)
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids(common.IM_END), tok.convert_tokens_to_ids(common.EOT)]
    return model, tok


DEFAULT_CHAT_PROMPTS = ["Anna has 12 apples and gets 7 more. How many apples does Anna have now?",
                        "小明有25本书，送给别人8本书。还剩多少本书？", "Hello, how are you?", "你好"]


def inference(args):
    model, tok = load_grpo_model(args.out_dir / "grpo_output")
    prompts = [[{"role": "user", "content": p}] for p in (args.prompt or DEFAULT_CHAT_PROMPTS)]
    _, texts = common.generate_completions(model, tok, prompts, args.max_new_tokens, do_sample=args.temperature > 0,
                                    temperature=max(args.temperature, 1e-5))
    for p, t in zip(prompts, texts):
        print(f"user: {p[-1]['content']}\nassistant: {t}\n")


def train(args):
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.tensorboard import SummaryWriter
    from transformers import BitsAndBytesConfig, TrainerCallback
    from transformers.integrations import TensorBoardCallback
    from trl import GRPOConfig, GRPOTrainer

    common.check_writable_dir(args.out_dir)
    ckpt_dir, grpo_dir = args.out_dir / "checkpoints" / "grpo", args.out_dir / "grpo_output"
    log_file, history_file = args.out_dir / "train.log", ckpt_dir / "history.jsonl"
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    funcs, weights = reward_functions(args, device)  # fails early if the reward model is missing

    with tempfile.TemporaryDirectory() as tmp:
        policy, tok = common.load_policy(args.sft_dir, args.base_dir)
        if args.qlora:  # reload the (merged) SFT weights as 4-bit NF4; LoRA adapters train on top in bf16
            from transformers import AutoModelForCausalLM

            policy.save_pretrained(tmp)
            generation_config = policy.generation_config
            policy = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
            policy.generation_config = generation_config
    prompts = common.rlhf_prompts("train", args.num_prompts - args.num_prompts // 4, args.num_prompts // 4, seed=args.seed)
    dataset = Dataset.from_list(prompts)
    if rank == 0:
        print(f"policy {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M params; {len(dataset)} prompts; "
              f"rewards {[f.__name__ for f in funcs]} weights {weights}")

    resume = latest_checkpoint(ckpt_dir)
    if rank == 0 and history_file.exists():  # drop history logged after the checkpoint we resume from
        done = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"] if resume else 0
        kept = [line for line in history_file.read_text().splitlines() if json.loads(line).get("step", 0) <= done]
        common.atomic_write_bytes(history_file, "".join(line + "\n" for line in kept).encode())

    class Logs(TrainerCallback):  # train.log (all stages) and history.jsonl (this run, for the report card)
        def on_log(self, a, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs:
                record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
                for path, rec in ((log_file, {"stage": "grpo", **record}), (history_file, record)):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with open(path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    config = GRPOConfig(
        output_dir=str(ckpt_dir), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        beta=0.05, loss_type="dapo", scale_rewards="none", epsilon=0.2, temperature=args.temperature,
        reward_weights=weights, logging_steps=1, save_strategy="steps", save_steps=args.save_steps,
        save_total_limit=2, report_to="none", seed=args.seed, gradient_checkpointing=False,
        bf16=use_cuda,  # on CPU, bf16 autocast measured slower than fp32 for these small models
        use_cpu=not use_cuda, disable_dropout=True, dataloader_num_workers=0)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)  # GPT-2 uses Conv1D
    callbacks = [Logs()]
    if rank == 0:
        callbacks.append(TensorBoardCallback(SummaryWriter(str(args.out_dir / "runs" / "grpo"))))
    trainer = GRPOTrainer(model=policy, reward_funcs=funcs, args=config, train_dataset=dataset,
                          processing_class=tok, peft_config=lora, callbacks=callbacks)
    if rank == 0 and resume:
        print(f"resuming from {resume}")
    t0 = time.time()
    trainer.train(resume_from_checkpoint=resume)
    if not trainer.accelerator.is_main_process:
        return
    print(f"trained {trainer.state.global_step} steps in {time.time() - t0:.0f} s")

    # Save the adapter and the merged model (the adapter merged into full-precision SFT weights, also after QLoRA).
    from peft import PeftModel

    with common.atomic_dir(grpo_dir) as tmp:
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(str(tmp / "adapter"))
        base, _ = common.load_policy(args.sft_dir, args.base_dir)
        merged = PeftModel.from_pretrained(base, str(tmp / "adapter")).merge_and_unload()
        merged.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        if history_file.exists():
            (tmp / "history.jsonl").write_bytes(history_file.read_bytes())
    print(f"saved the GRPO model to {grpo_dir} (adapter in {grpo_dir / 'adapter'})")
    model, tok = load_grpo_model(grpo_dir)
    evaluate(args, model, tok)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["train", "inference", "eval"], default="train")
    parser.add_argument("--sft-dir", type=Path, default=common.SFT_OUTPUT_DIR, help="SFT output (or any causal LM dir)")
    parser.add_argument("--base-dir", type=Path, default=common.OUTPUT_DIR, help="pretrained base of the SFT adapter")
    parser.add_argument("--reward-model", type=Path, help="default: OUT_DIR/reward_model (= RLHF/reward_model)")
    parser.add_argument("--out-dir", type=Path, default=RLHF_DIR,
                        help="writes grpo_output/, eval.json, checkpoints/grpo/, runs/grpo/, train.log here")
    parser.add_argument("--rm-weight", type=float, default=1.0, help="weight of the reward-model score")
    parser.add_argument("--exact-weight", type=float, default=1.0, help="weight of the exact-answer reward (0/1)")
    parser.add_argument("--num-prompts", type=int, default=64, help="training prompts: 3/4 arithmetic, 1/4 chat")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--num-generations", type=int, default=4, help="group size: completions per prompt")
    parser.add_argument("--batch-size", type=int, default=16, help="completions per device per step")
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (inference: 0 = greedy)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--qlora", action="store_true", help="4-bit NF4 policy weights (bitsandbytes) under LoRA")
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--eval-arithmetic", type=int, default=64, help="held-out arithmetic prompts in eval.json")
    parser.add_argument("--eval-conversation", type=int, default=32, help="held-out chat prompts in eval.json")
    parser.add_argument("--prompt", action="append", help="inference: a user message (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="inference: longest answer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.reward_model = args.reward_model or args.out_dir / "reward_model"
    if args.mode == "inference":
        inference(args)
    elif args.mode == "eval":
        evaluate(args, *load_grpo_model(args.out_dir / "grpo_output"))
    else:
        train(args)


if __name__ == "__main__":
    common.run_main(main)
