"""RLHF step 2: GRPO with TRL's GRPOTrainer on the SFT policy (LoRA), rewarded by exact answers on the verifiable
arithmetic tasks and by the reward model on the chat prompts.

Reads:  the SFT policy (SFT/sft_output/merged/, else output/ + the LoRA adapter in SFT/sft_output/ merged in memory),
        the reward model RLHF/reward_model/ (python RLHF/reward_model.py), prompts: arithmetic problems from
        arithmetic_tasks and conversation prompts of RLHF/data/preference_train.jsonl.gz.
Writes: RLHF/grpo_output/           merged full model + tokenizer (AutoModelForCausalLM.from_pretrained works on it),
                                    adapter/ (the LoRA adapter alone), history.jsonl (one line per logged step),
                                    lineage.json (settings; the policy and reward model it was built from)
        RLHF/eval.json              held-out prompts: exact-answer accuracy and reward-model score (chat prompts) of
                                    the SFT policy vs the GRPO policy, and the GRPO policy's per-token KL to the SFT
                                    policy
        RLHF/checkpoints/grpo/      resumable checkpoints and the run's history.jsonl
        RLHF/train.log, RLHF/runs/grpo/ (TensorBoard): reward, reward std, KL, completion length, step time, and
                                    with --eval-every N the held-out exact answers every N steps (as eval.json's)

The objective (TRL 1.16 settings, chosen explicitly in grpo_config): loss_type="dapo" (token-level mean over the
whole batch), advantages = reward - mean reward of the prompt's group (scale_rewards="none"), clipped ratio
(epsilon 0.2), KL to the frozen SFT policy with beta=0.05 (k3 estimator). grpo_training.py is the same algorithm
in plain PyTorch; llm_train/grpo.py holds the two fixes to TRL's trainer.

Reruns (llm_train/stage.py): the same command on a finished run does nothing and says so; a killed run resumes from
its last checkpoint and logs what the uninterrupted run would have; a larger --epochs continues a run exactly (the
learning rate is constant after the warm-up); checkpoints of a run with other settings, policy or reward model are an
error naming the difference (--force starts over). The reward model must have been built on this SFT policy;
--mode eval/inference check that grpo_output still belongs to them.

    python RLHF/grpo_trl.py                                   # the cpu preset without CUDA, gpu with it
    python RLHF/grpo_trl.py --preset smoke                    # seconds
    accelerate launch --multi_gpu --num_processes=2 RLHF/grpo_trl.py   # 2 GPUs or 2 CPU processes; or torchrun
    python RLHF/grpo_trl.py --mode inference --prompt "Tom has 3 apples and gets 4 more. How many apples does Tom have now?"
    python RLHF/grpo_trl.py --mode eval                       # only rewrite RLHF/eval.json
"""
import argparse
import os
import tempfile
from pathlib import Path

from llm_train import runtime, trainer_runs
from llm_train.atomic import atomic_write_json
from llm_train.cli import (
    apply_preset,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    settings_of,
    unit_fraction,
)
from llm_train.arithmetic import EXAMPLE_PROMPTS, exact_match_scores, extract_answer
from llm_train.engine import generate_completions, prompt_room, prompt_token_ids, stop_token_ids
from llm_train.errors import UserError, run_main
from llm_train.grpo import add_logit_scale, fold_logit_scale, grpo_trainer_class, heldout_eval_callback, trim_history
from llm_train.lineage import check_lineage, recorded_parents
from llm_train.paths import GRPO_OUTPUT_DIR, OUTPUT_DIR, SFT_OUTPUT_DIR
from llm_train.rl import (
    chat_reward_model_scores,
    exact_answer_reward,
    load_policy,
    load_reward_model,
    paired_bootstrap_error_reduction,
    policy_parents,
    rlhf_prompts,
)
from llm_train.runtime import compute_dtype, default_scale, dtype_name
from llm_train.sampling import completion_logps
from llm_train.stage import Stage
from llm_train.tokenizer import IM_END, load_chat_tokenizer
from llm_train.trainer_runs import checkpoint_epoch, jsonl_log_callback, train_and_end

import torch

RLHF_DIR = GRPO_OUTPUT_DIR.parent
STAGE = "grpo"
# Budget and optimizer per scale of policy, in one place (README table); each value can be overridden by its flag.
# Measured: see docs/experiments.md#grpo. beta 0.05 and unscaled advantages at every scale; rm_weight 0.1: the
# reward model's scores spread far wider than the 0/1 exact answer, and it scores only the chat prompts.
# batch_size is the global batch: completions per optimizer step over all processes (split_global_batch splits it, in
# whole groups: gpu 1 x 64 or 8 x 8).
PRESETS = {
    # groups of 8: a prompt answered right some of the time gets a non-zero advantage
    "gpu": dict(rm_weight=0.1, exact_weight=1.0, num_prompts=2048, epochs=3.0, num_generations=8, batch_size=64,
                warmup_steps=0, max_completion_length=64, temperature=1.0, lr=5e-5, lora_r=16, save_steps=100,
                num_iterations=1, chat_fraction=0.25, logit_scale_lr=0.0,
                eval_arithmetic=1000, eval_conversation=64, eval_every=64),
    # fresh prompts x 1 epoch (repeated ones are learned by heart), 16 prompts per update; 11 steps are far too few
    # for the LoRA to teach (lr 1e-4: it harms greedy answers least) but enough to learn how sure to be: the logits'
    # scale at lr 0.8 (docs/experiments.md#grpo); the minutes go to pretraining
    "cpu": dict(rm_weight=0.1, exact_weight=1.0, num_prompts=192, epochs=1.0, num_generations=8, batch_size=128,
                warmup_steps=4, max_completion_length=56, temperature=0.7, lr=1e-4, lora_r=16, save_steps=8,
                num_iterations=1, chat_fraction=0.25, logit_scale_lr=0.8,
                eval_arithmetic=1000, eval_conversation=32, eval_every=0),
    # seconds: the same code paths
    "smoke": dict(rm_weight=1.0, exact_weight=1.0, num_prompts=8, epochs=1.0, num_generations=4, batch_size=8,
                  warmup_steps=0, max_completion_length=12, temperature=1.0, lr=2e-4, lora_r=16, save_steps=10,
                  num_iterations=1, chat_fraction=0.25, logit_scale_lr=0.8,
                  eval_arithmetic=8, eval_conversation=4, eval_every=0),
}
SAMPLES = 4  # sampled answers per held-out problem in eval.json: the primary measure of GRPO
KL_PROMPTS = 256  # held-out problems whose sampled answers measure the KL to the SFT policy
DEFAULT_CHAT_PROMPTS = [*EXAMPLE_PROMPTS, "Hello, how are you?", "你好"]


def batch_split(args):
    """--batch-size completions per optimizer step split over the processes (whole groups of --num-generations)."""
    return trainer_runs.split_global_batch(args.batch_size, args.micro_batch, multiple_of=args.num_generations)


def grpo_config(args, output_dir, reward_weights, dtype):
    """The GRPOConfig of a run (tests build TRL's side of the loss comparison from it too). One generation batch is
    one optimizer step: TRL samples per device x processes x accumulation steps completions at once."""
    from trl import GRPOConfig

    split = batch_split(args)
    return GRPOConfig(
        output_dir=str(output_dir), num_train_epochs=args.epochs, per_device_train_batch_size=split.per_device,
        gradient_accumulation_steps=split.accum,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        num_iterations=args.num_iterations,
        learning_rate=args.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=args.warmup_steps,
        beta=0.05, loss_type="dapo", scale_rewards="none", epsilon=0.2, temperature=args.temperature,
        reward_weights=reward_weights, logging_steps=1, save_strategy="steps", save_steps=args.save_steps,
        save_total_limit=2, report_to="none", seed=args.seed, activation_checkpointing=args.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        bf16=dtype == "bf16", fp16=dtype == "fp16",  # mixed precision: autocast over fp32 weights
        use_cpu=not torch.cuda.is_available(), disable_dropout=True, dataloader_num_workers=0)


def reward_functions(args, device):
    """TRL reward functions (prompts, completions, **dataset columns) -> one float (or None) per completion,
    with their weights. TRL sums the weighted rewards; advantages are taken from that sum."""
    funcs, weights = [], []
    if args.rm_weight:
        rm = load_reward_model(args.reward_model, device)

        def reward_model_score(prompts, completions, answer, **kwargs):
            return chat_reward_model_scores(rm, prompts, [c[-1]["content"] for c in completions], answer)

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


def sampled_exact_answers(args, model, tok, messages, answers):
    """Per problem, the fraction right of SAMPLES answers sampled at the training temperature from args.seed (a
    smoother measure than one greedy answer each, and what GRPO optimizes): eval.json's, and the --eval-every curve's."""
    torch.manual_seed(args.seed)
    _, sampled = generate_completions(model, tok, [m for m in messages for _ in range(SAMPLES)],
                                      args.max_completion_length, do_sample=True, temperature=args.temperature,
                                      dtype=dtype_name(allow_fp16=True))
    rewards = exact_answer_reward(sampled, [a for a in answers for _ in range(SAMPLES)])
    return [sum(rewards[i:i + SAMPLES]) / SAMPLES for i in range(0, len(rewards), SAMPLES)]


def heldout_exact_answers(args, model, tok, arithmetic):
    """(greedy, sampled) exact-answer accuracy of model on the held-out arithmetic prompts during training (the
    --eval-every curve). The global RNG is left as it was, so training samples what it would without."""
    messages, answers = [p["prompt"] for p in arithmetic], [p["answer"] for p in arithmetic]
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        _, greedy = generate_completions(model, tok, messages, args.max_completion_length,
                                         do_sample=False, dtype=dtype_name(allow_fp16=True))
        sampled = sampled_exact_answers(args, model, tok, messages, answers)
    model.train(was_training)
    greedy = exact_answer_reward(greedy, answers)
    return sum(greedy) / len(greedy), sum(sampled) / len(sampled)


def policy_metrics(args, model, tok, prompts, rm):
    """eval.json's numbers of one policy on the held-out prompts, and the per-problem fraction of sampled answers
    right (for the paired bootstrap): exact-answer accuracy of its greedy answers (per held-out split and language x
    op x digits cell), how many end the turn, examples, the reward model's mean score on the chat prompts (rm: a
    RewardModel or None) and the exact-answer accuracy of answers sampled at the training temperature (what GRPO
    optimizes)."""
    messages = [p["prompt"] for p in prompts]
    model.eval()
    ids, texts = generate_completions(model, tok, messages, args.max_completion_length, do_sample=False,
                                      dtype=dtype_name(allow_fp16=True))
    arithmetic = [(p, t) for p, t in zip(prompts, texts) if p["answer"] is not None]
    greedy = exact_match_scores([p for p, _ in arithmetic], [extract_answer(t) for _, t in arithmetic])
    im_end = tok.convert_tokens_to_ids(IM_END)
    result = {"exact_answer_accuracy": greedy["both"]["exact_match"],  # both held-out splits
              "exact_match": greedy["heldout"]["exact_match"],
              "exact_match_heldout_wordings": greedy["heldout_wordings"]["exact_match"],
              "arithmetic": greedy,
              "ends_with_im_end": sum(bool(x) and x[-1] == im_end for x in ids) / max(1, len(ids)),
              "examples": [{"prompt": m[-1]["content"], "completion": t} for m, t in zip(messages[::97], texts[::97])]}
    chats = [i for i, p in enumerate(prompts) if p["answer"] is None]  # replies the reward model scores in training
    if rm is not None and chats:
        scores = rm.scores([messages[i] for i in chats], [texts[i] for i in chats])
        result["reward_model_score"] = sum(scores) / len(scores)
    # Both models are sampled from the same seed: the SFT policy against itself gives the same value.
    sampled = sampled_exact_answers(args, model, tok, [p["prompt"] for p, _ in arithmetic],
                                    [p["answer"] for p, _ in arithmetic])
    by_split = exact_match_scores([p for p, _ in arithmetic], sampled)
    result["sampled_exact_answer_accuracy"] = by_split["both"]["exact_match"]
    result["sampled"] = {split: by_split[split]["exact_match"] for split in ("heldout", "heldout_wordings")}
    return result, sampled


def kl_to_sft(args, grpo_model, sft_model, tok, messages, batch_size=64):
    """(k1, k3) per-token KL(GRPO || SFT) on completions the GRPO policy samples from args.seed (the same samples
    on every evaluation of the same model): k1 = log p/q is unbiased, k3 is what TRL logs."""
    torch.manual_seed(args.seed)
    ids, _ = generate_completions(grpo_model, tok, messages, args.max_completion_length, do_sample=True,
                                  dtype=dtype_name(allow_fp16=True))
    prompt_ids = prompt_token_ids(tok, messages, prompt_room(grpo_model, args.max_completion_length))
    k1 = k3 = n = 0.0
    for i in range(0, len(ids), batch_size):
        with torch.no_grad():  # scored in fp32: bf16 logits would blur a KL of ~0.001/token
            logp, mask = completion_logps(grpo_model, prompt_ids[i:i + batch_size], ids[i:i + batch_size])
            ref_logp, _ = completion_logps(sft_model, prompt_ids[i:i + batch_size], ids[i:i + batch_size])
        k1 += ((logp - ref_logp) * mask).sum().item()
        k3 += ((torch.exp(ref_logp - logp) - (ref_logp - logp) - 1) * mask).sum().item()
        n += mask.sum().item()
    return k1 / max(n, 1), k3 / max(n, 1)


def evaluate(args, grpo_model, tok):
    """Held-out prompts: policy_metrics of the SFT policy and of the GRPO policy, and the GRPO policy's KL to the
    SFT policy, written to OUT_DIR/eval.json. Answers are generated under the compute dtype's autocast, as in
    training, SFT's evaluation and Eval/evaluate.py (bf16 and fp32 greedy answers can differ)."""
    device = runtime.device()
    prompts = rlhf_prompts("heldout", args.eval_arithmetic, args.eval_conversation, seed=args.seed)
    sft_model = load_policy(args.sft_dir, args.base_dir)[0].to(device)
    grpo_model = grpo_model.to(device)
    has_rm = (Path(args.reward_model) / "config.json").is_file()
    rm = load_reward_model(args.reward_model, device) if has_rm else None
    result = {"prompts": len(prompts), "arithmetic_prompts": sum(p["answer"] is not None for p in prompts),
              "max_new_tokens": args.max_completion_length, "sampling": {"temperature": args.temperature,
                                                                        "samples_per_problem": SAMPLES}}
    sampled = {}
    for name, model in (("sft", sft_model), ("grpo", grpo_model)):
        result[name], sampled[name] = policy_metrics(args, model, tok, prompts, rm)
    # GRPO's primary measure: the relative fall of the sampled error rate, with a 95% paired-bootstrap interval
    result["sampled_error_reduction"] = paired_bootstrap_error_reduction(sampled["sft"], sampled["grpo"],
                                                                         seed=args.seed)
    # KL on KL_PROMPTS of the held-out problems (spread over both splits) and the chat prompts: ~10k sampled tokens
    arithmetic = [p for p in prompts if p["answer"] is not None]
    kl_prompts = arithmetic[::max(1, len(arithmetic) // KL_PROMPTS)][:KL_PROMPTS] + \
        [p for p in prompts if p["answer"] is None]
    result["kl_k1_per_token"], result["kl_k3_per_token"] = kl_to_sft(args, grpo_model, sft_model, tok,
                                                                     [p["prompt"] for p in kl_prompts])
    # how much sharper GRPO made the logits (--logit-scale-lr; 1.0 without): the ratio of the final norms' gains
    gains = [m.transformer.ln_f.weight.detach().norm() for m in (grpo_model, sft_model)]
    result["logit_scale"] = (gains[0] / gains[1]).item()
    atomic_write_json(args.out_dir / "eval.json", result)
    sft, grpo = result["sft"], result["grpo"]
    line = (f"held-out: exact-answer accuracy SFT {sft['exact_answer_accuracy']:.3f} -> GRPO "
            f"{grpo['exact_answer_accuracy']:.3f} (sampled at temperature {args.temperature}: "
            f"{sft['sampled_exact_answer_accuracy']:.3f} -> {grpo['sampled_exact_answer_accuracy']:.3f})")
    if "reward_model_score" in sft:
        line += (f"; reward-model score on the chat prompts SFT {sft['reward_model_score']:.3f} -> GRPO "
                 f"{grpo['reward_model_score']:.3f}")
    cut = result["sampled_error_reduction"]
    line += (f"; sampled error rate {cut['error_before']:.1%} -> {cut['error_after']:.1%}: reduced by "
             f"{cut['relative']:+.1%} relative (95% CI {cut['ci95'][0]:+.1%} .. {cut['ci95'][1]:+.1%}; "
             "< 0: more errors)")
    print(line + f"; KL(GRPO||SFT) per token {result['kl_k1_per_token']:.4f} (k3 {result['kl_k3_per_token']:.4f}); "
          f"logits {result['logit_scale']:.2f}x as sharp; wrote {args.out_dir / 'eval.json'}")
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
    model.generation_config.eos_token_id = stop_token_ids(tok)
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


def run_settings(args):
    """What decides the GRPO model, besides its parents: compared with the checkpoints' run before resuming it, and
    recorded in grpo_output/lineage.json, where an identical rerun finds it finished."""
    return {**settings_of(args, "rm_weight", "exact_weight", "num_prompts", "epochs", "num_generations", "batch_size",
                          "max_completion_length", "temperature", "lr", "warmup_steps", "lora_r", "qlora", "seed",
                          "num_iterations", "chat_fraction", "logit_scale_lr"),
            **({"micro_batch": args.micro_batch} if args.micro_batch else {}),
            "dtype": dtype_name(allow_fp16=True), "processes": int(os.environ.get("WORLD_SIZE", "1"))}


def check_reward_model(args, parents):
    """With --rm-weight: the reward model exists and was built on this SFT policy (a UserError otherwise)."""
    if not args.rm_weight:
        return
    if parents["reward_model"] is None:
        load_reward_model(args.reward_model)  # raises the error that says what to run
    rebuild = trainer_runs.rerun_command("RLHF/reward_model.py", sft_dir=(args.sft_dir, SFT_OUTPUT_DIR),
                                         base_dir=(args.base_dir, OUTPUT_DIR),
                                         out_dir=(Path(args.reward_model).parent, RLHF_DIR))
    check_lineage(args.reward_model, rebuild, policy=parents["policy"], base=parents["base"])


def trainable_policy(args):
    """(policy, tokenizer) to put LoRA on: the SFT policy, with --qlora reloaded with 4-bit NF4 weights."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with tempfile.TemporaryDirectory() as tmp:
        policy, tok = load_policy(args.sft_dir, args.base_dir)
        if args.qlora:  # reload the (merged) SFT weights as 4-bit NF4; LoRA adapters train on top
            policy.save_pretrained(tmp)
            generation_config = policy.generation_config
            # each process puts its copy on its own GPU (without a device map all would load on cuda:0); CPU: as is
            placement = {"device_map": {"": runtime.device()}} if torch.cuda.is_available() else {}
            policy = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype(allow_fp16=True)),
                **placement)
            policy.generation_config = generation_config
    return policy, tok


def training_prompts(args, policy, tok):
    """(the training prompts that leave room for a whole completion in the context, how many were left out, the
    room): TRL generates from the whole prompt, and must never run past GPT-2's last position."""
    from datasets import Dataset

    n_chat = round(args.num_prompts * args.chat_fraction)
    prompts = rlhf_prompts("train", args.num_prompts - n_chat, n_chat, seed=args.seed)
    room = prompt_room(policy, args.max_completion_length)
    lengths = map(len, prompt_token_ids(tok, [p["prompt"] for p in prompts]))
    fitting = [p for p, n in zip(prompts, lengths) if n <= room]
    if not fitting:
        raise UserError(f"no training prompt fits in {room} tokens next to --max-completion-length "
                        f"{args.max_completion_length}: lower it")
    return Dataset.from_list(fitting), len(prompts) - len(fitting), room


def logging_callbacks(args, tok, history_file):
    """train.log and history.jsonl lines, TensorBoard (rank 0) and with --eval-every the held-out exact answers."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    heldout = rlhf_prompts("heldout", args.eval_arithmetic, 0, seed=args.seed) if args.eval_every else []
    logs = jsonl_log_callback({args.out_dir / "train.log": {"stage": STAGE}, history_file: {}})
    rank0 = int(os.environ.get("RANK", "0")) == 0
    tensorboard = TensorBoardCallback(SummaryWriter(str(args.out_dir / "runs" / STAGE))) if rank0 else None
    log_to = [logs] + ([tensorboard] if tensorboard else [])

    def evaluate_heldout(model, step):  # the --eval-every curve (step 0 = the SFT policy), on rank 0 alone
        greedy, sampled = heldout_exact_answers(args, model, tok, heldout)
        print(f"step {step}: held-out exact answers {greedy:.3f} (sampled at temperature {args.temperature}: "
              f"{sampled:.3f})")
        return {"heldout/exact_answer": greedy, "heldout/sampled_exact_answer": sampled}

    recipe = trainer_runs.recipe_log_callback(args.batch_size, "completions", lambda line: print(line, flush=True))
    return [logs, recipe] + ([heldout_eval_callback(args.eval_every, evaluate_heldout, log_to)] if heldout else []) + \
        ([tensorboard] if tensorboard else [])


def build_trainer(args, policy, tok, dataset, funcs, weights, ckpt_dir, resume):
    """The fixed GRPOTrainer with LoRA on GPT-2's projections, its prompt order set to continue `resume`."""
    from peft import LoraConfig

    if args.logit_scale_lr:
        add_logit_scale(policy)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,  # GPT-2 uses Conv1D
                      modules_to_save=["ln_f"] if args.logit_scale_lr else None)  # its log_scale alone trains
    callbacks = logging_callbacks(args, tok, ckpt_dir / "history.jsonl")
    config = grpo_config(args, ckpt_dir, weights, dtype_name(allow_fp16=True))
    trainer = grpo_trainer_class()(model=policy, reward_funcs=funcs, args=config, train_dataset=dataset,
                                   processing_class=tok, peft_config=lora, callbacks=callbacks)
    trainer.first_epoch = checkpoint_epoch(resume)
    trainer.logit_scale_lr = args.logit_scale_lr
    return trainer


def save_grpo_model(args, stage, trainer, tok, history_file):
    """grpo_output/: the adapter, and merged into the full-precision SFT weights (also after QLoRA), with the
    tokenizer, the run's history.jsonl and lineage.json."""
    from peft import PeftModel

    with stage.output() as tmp:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if args.logit_scale_lr:
            print(f"the logits' learned scale: {fold_logit_scale(model):.3f}")
        model.save_pretrained(str(tmp / "adapter"))
        base, _ = load_policy(args.sft_dir, args.base_dir)
        merged = PeftModel.from_pretrained(base, str(tmp / "adapter")).merge_and_unload()
        merged.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        if history_file.exists():
            (tmp / "history.jsonl").write_bytes(history_file.read_bytes())
    print(f"saved the GRPO model to {stage.out_dir} (adapter in {stage.out_dir / 'adapter'})")


def train(args):
    ckpt_dir = args.checkpoint_dir or args.out_dir / "checkpoints" / "grpo"
    rank0 = int(os.environ.get("RANK", "0")) == 0
    parents = parents_of(args)
    check_reward_model(args, parents)
    stage = Stage(STAGE, "GRPO model", args.out_dir / "grpo_output", run_settings(args), force=args.force,
                  parents=parents, done_file=args.out_dir / "eval.json")
    if stage.done():
        return
    stage.prepare(writable=[args.out_dir, ckpt_dir])
    resume, finished = stage.resume_point(ckpt_dir, may_grow=("epochs",))
    funcs, weights = reward_functions(args, runtime.device())
    policy, tok = trainable_policy(args)
    dataset, left_out, room = training_prompts(args, policy, tok)
    if rank0:
        print(f"policy {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M params; {len(dataset)} prompts "
              f"({left_out} left out: longer than {room} tokens); rewards {[f.__name__ for f in funcs]} "
              f"weights {weights}")
        trim_history(ckpt_dir / "history.jsonl", resume)
    trainer = build_trainer(args, policy, tok, dataset, funcs, weights, ckpt_dir, resume)
    seconds = train_and_end(trainer, resume, finished, args.out_dir / "train.log", STAGE)
    if trainer.accelerator.is_main_process:
        print(f"trained {trainer.state.global_step} steps in {seconds:.0f} s")
        save_grpo_model(args, stage, trainer, tok, ckpt_dir / "history.jsonl")
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
                        help="(preset) training prompts, arithmetic and chat (--chat-fraction)")
    parser.add_argument("--chat-fraction", type=unit_fraction,
                        help="(preset) share of chat prompts (rewarded by the reward model) among the training prompts")
    parser.add_argument("--epochs", type=positive_float, help="(preset)")
    parser.add_argument("--num-iterations", type=positive_int,
                        help="(preset) optimizer steps on each batch of sampled completions (experience replay; "
                        "TRL's num_iterations, the clipped ratio bounds each update)")
    parser.add_argument("--num-generations", type=positive_int,
                        help="(preset) group size: completions per prompt (at least 2)")
    trainer_runs.add_batch_flags(parser, "completions")
    parser.add_argument("--max-completion-length", type=positive_int,
                        help="(preset) longest completion (a worked arithmetic answer is ~40-50 tokens)")
    parser.add_argument("--temperature", type=nonnegative_float,
                        help="(preset) sampling temperature of the training groups, of eval.json's sampled answers "
                        "and of --mode inference (0 = greedy, inference only)")
    parser.add_argument("--lr", type=positive_float, help="(preset)")
    parser.add_argument("--warmup-steps", type=nonnegative_int,
                        help="(preset) optimizer steps of linear lr warm-up, then constant")
    parser.add_argument("--lora-r", type=positive_int, help="(preset)")
    parser.add_argument("--logit-scale-lr", type=nonnegative_float,
                        help="(preset) lr of one scalar that scales the logits (how sure the policy is), trained "
                             "with the LoRA; 0: not trained")
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
        if not args.rm_weight and not args.exact_weight:
            parser.error("--rm-weight and --exact-weight are both 0: there is nothing to reward")
        if args.num_generations < 2:
            parser.error("--num-generations must be at least 2: advantages compare completions of the same prompt")
        if args.batch_size % args.num_generations:
            parser.error(f"--batch-size {args.batch_size} must be a multiple of --num-generations "
                         f"{args.num_generations}: a step holds whole groups")
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
