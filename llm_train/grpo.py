"""TRL's GRPOTrainer as RLHF/grpo_trl.py runs it: two fixes to TRL 1.16, the held-out evaluation during training,
and the run's history.jsonl on a resume. trl is imported inside the functions, so importing this stays cheap."""
import json
from pathlib import Path

from llm_train.atomic import atomic_write_bytes
from llm_train.engine import Engine, Sampling
from llm_train.sampling import last_token_logps

import torch


class ScaledLayerNorm(torch.nn.LayerNorm):
    """A LayerNorm whose output is multiplied by exp(log_scale), one trainable scalar: in front of GPT-2's tied LM
    head it sets how sharp the logits are, which LoRA on the projections cannot (the final norm renormalizes)."""

    def __init__(self, norm):
        super().__init__(norm.normalized_shape, eps=norm.eps, device=norm.weight.device, dtype=norm.weight.dtype)
        self.load_state_dict(norm.state_dict())
        self.log_scale = torch.nn.Parameter(torch.zeros((), device=norm.weight.device))

    def forward(self, x):
        # the params in x's dtype: TRL casts a QLoRA policy's trained copies to bf16, CPU layer_norm refuses the mix
        out = torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype),
                                             self.eps)
        return out * self.log_scale.exp()


def add_logit_scale(policy):
    """Give the policy's final layer norm a log_scale starting at 0 (the same outputs). GRPO trains it as PEFT's
    modules_to_save copy of ln_f, so it is in the adapter of every checkpoint; fold_logit_scale undoes the class."""
    policy.transformer.ln_f = ScaledLayerNorm(policy.transformer.ln_f)
    return policy


def fold_logit_scale(peft_model):
    """Multiply the trained copy of ln_f's weight and bias by its scale and make it a plain LayerNorm again: the
    same outputs, and an adapter that PeftModel.from_pretrained loads on the plain SFT policy. Returns the scale."""
    wrapper = peft_model.base_model.model.transformer.ln_f
    norm = wrapper.modules_to_save["default"]
    scale = norm.log_scale.detach().exp()
    plain = torch.nn.LayerNorm(norm.normalized_shape, eps=norm.eps, device=norm.weight.device)
    with torch.no_grad():
        plain.weight.copy_(norm.weight * scale)
        plain.bias.copy_(norm.bias * scale)
    wrapper.modules_to_save["default"] = plain
    return scale.item()


def grpo_trainer_class():
    """GRPOTrainer of TRL 1.16 with two fixes and our sampler (a function, so that trl is imported only when
    training):

    - The log-probabilities of the loss (policy, old and reference) are computed at the positions generate()
      sampled the completions at. TRL passes no position_ids, so the model numbered a left-padded row 0, 1, ...
      from its first pad token, while generate() numbers it from its first real token: GPT-2's learned positions
      differed between sampling and training by the padding of each prompt. They are a plain log-softmax of the
      completion positions: TRL's chunked LM-head kernel scores every prompt and pad position off CUDA (2.8x slower
      in bf16, bench/bench_grpo.py).
    - Each epoch's prompt order is drawn from a generator seeded by (seed + epoch). TRL's RepeatSampler draws every
      epoch from one generator, so a run resumed in a later epoch got the first epoch's order again.
    - The groups are sampled by llm_train.engine (the evaluations' sampler) under the training's autocast:
      generate()'s torch.multinomial took a fifth of a cpu-preset step (docs/experiments.md#grpo).

    And with logit_scale_lr > 0, the log_scale of the final norm's copy (add_logit_scale) trains at that lr; the
    copy's weight and bias stay as they are.
    """
    from trl import GRPOTrainer
    from trl.models import unwrap_model_for_generation
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
        logit_scale_lr = 0.0

        def create_optimizer(self, model=None):
            model = self.model if model is None else model
            if self.optimizer is None and self.logit_scale_lr:
                for name, param in model.named_parameters():
                    if "modules_to_save" in name and not name.endswith("log_scale"):
                        param.requires_grad_(False)
                trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
                groups = [{"params": [p for n, p in trained if not n.endswith("log_scale")],
                           "weight_decay": self.args.weight_decay},
                          {"params": [p for n, p in trained if n.endswith("log_scale")], "lr": self.logit_scale_lr,
                           "weight_decay": 0.0}]
                optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
                self.optimizer = optimizer_cls(groups, **kwargs)
            return super().create_optimizer(model)

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, **kwargs):
            logps, entropies = [], []
            rows = batch_size or input_ids.size(0)
            for start in range(0, input_ids.size(0), rows):
                ids, mask = input_ids[start:start + rows], attention_mask[start:start + rows]
                with self.accelerator.autocast():
                    token_logps, log_softmax = last_token_logps(model, ids, mask, logits_to_keep, self.temperature)
                completion_mask = mask[:, -logits_to_keep:]  # 0 after a completion's end, as TRL's labels -100
                logps.append(token_logps * completion_mask)
                if compute_entropy:
                    entropies.append(-(log_softmax.exp() * log_softmax).sum(-1) * completion_mask)
            return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            if self.use_vllm or self.use_transformers_continuous_batching or images or multimodal_fields:
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                     has_tool_images)
            sampling = Sampling(temperature=self.temperature, top_k=self.top_k or 0, top_p=self.top_p)
            dtype = "bf16" if self.args.bf16 else "fp16" if self.args.fp16 else "fp32"
            unwrapped = unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)
            with unwrapped as model, self._dist.summon_full_params(self.model_wrapped, recurse=False):
                engine = Engine(model, self._tokenizer, dtype=dtype, stops=self.eos_token_ids)
                # one batch; each completion up to and with its first stop token, as TRL cuts them
                completions = engine.generate_batch(prompt_ids, self.max_completion_length, sampling,
                                                    batch_size=len(prompt_ids))
            return completions, None

        def _get_train_sampler(self, dataset=None):
            sampler = super()._get_train_sampler(dataset)
            sampler.__class__, sampler.epoch = EpochSeededSampler, self.first_epoch
            return sampler

    return GRPOTrainerFixed


def heldout_eval_callback(every, evaluate, log_to):
    """A TrainerCallback that, on the main process, calls evaluate(model) -> {name: value} before the first step
    and after every `every` steps, and hands the values to the on_log of the callbacks in log_to (the log files,
    TensorBoard). evaluate must leave training's RNG as it was."""
    from transformers import TrainerCallback

    class HeldoutEval(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:  # step 0: the policy before training
                self.on_step_end(args, state, control, model=model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0 and state.is_world_process_zero:
                logs = evaluate(model, state.global_step)
                for callback in log_to:
                    callback.on_log(args, state, control, logs=logs)

    return HeldoutEval()


def trim_history(history_file, resume):
    """Drop the lines of a run's history.jsonl logged after the checkpoint `resume` (all of them when starting
    fresh): the resumed run logs those steps again."""
    history_file = Path(history_file)
    if not history_file.exists():
        return
    done = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"] if resume else 0
    kept = [line for line in history_file.read_text().splitlines() if json.loads(line).get("step", 0) <= done]
    atomic_write_bytes(history_file, "".join(line + "\n" for line in kept).encode())
