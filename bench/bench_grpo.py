"""Benchmark the log-probabilities of GRPO's loss: grpo_trl.py's plain log-softmax of the completion positions vs
TRL's chunked fused LM head (both at the positions generate() sampled at), forward + backward, as one training step
of the cpu preset computes them (policy with gradients, reference without).

Reads:  RLHF/grpo_trl.py, PreTrain/train_byte_level_bpe_tokenizer.py (a small tokenizer is trained in a temp dir).
Writes: bench/results/bench_grpo.json

    .venv/bin/python bench/bench_grpo.py                    # ~1 min
    .venv/bin/python bench/bench_grpo.py --rounds 7 --batch 64

A randomly initialised GPT-2 of the cpu preset's shape (4 layers, 192 wide, 8,192-token vocabulary, 128 positions)
scores --batch rows of 16-48 left-padded prompt tokens and 40 completion tokens under the compute dtype's autocast;
the two ways alternate for --rounds rounds and the medians are compared. They give the same numbers
(tests/test_rlhf.py::test_logps_of_the_loss_are_those_of_the_sampling_pass).
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

from llm_train import sampling
from llm_train.arithmetic import arithmetic_tasks
from llm_train.atomic import atomic_write_json
from llm_train.cli import positive_int
from llm_train.errors import run_main
from llm_train.paths import load_script
from llm_train.runtime import dtype_name
from llm_train.tokenizer import load_chat_tokenizer

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "bench" / "results" / "bench_grpo.json"


def build_trainer(tmp, dtype):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    stage = load_script("PreTrain/train_byte_level_bpe_tokenizer.py")
    texts = [t["prompt"] + " " + t["response"] for t in arithmetic_tasks(300, "train")]
    stage.save(stage.train(texts, vocab_size=600), Path(tmp) / "tokenizer")
    tok = load_chat_tokenizer(Path(tmp) / "tokenizer")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=8192, n_positions=128, n_embd=192, n_layer=4, n_head=4,
                               activation_function="gelu_pytorch_tanh",  # as PreTrain/model.py exports
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)).save_pretrained(Path(tmp) / "model")
    model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "model")  # TRL loads its reference model from the path
    trl_script = load_script("RLHF/grpo_trl.py")
    args = trl_script.parse_args(["--preset", "cpu"])
    trainer = trl_script.grpo_trainer_class()(
        model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=trl_script.grpo_config(args, str(Path(tmp) / "ckpt"), [1.0], dtype), processing_class=tok,
        train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}]}] * 8))
    return trainer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--batch", type=positive_int, default=128, help="completions per step (cpu preset: 128)")
    args = parser.parse_args()

    import torch
    from trl import GRPOTrainer

    dtype = dtype_name()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(tmp, dtype)
    model, completion = trainer.model, 40
    gen = torch.Generator().manual_seed(0)
    prompt_lengths = torch.randint(16, 49, (args.batch,), generator=gen)
    width = int(prompt_lengths.max()) + completion
    input_ids = torch.randint(0, 600, (args.batch, width), generator=gen)
    attention = (torch.arange(width)[None, :] >= (width - completion - prompt_lengths)[:, None]).long()

    def ours(**kw):
        return trainer._get_per_token_logps_and_entropies(model, input_ids, attention, completion, **kw)

    def trl_fused(**kw):
        def at_sampling_positions(**inputs):
            return model(**inputs, position_ids=sampling.position_ids(inputs["attention_mask"]))

        return GRPOTrainer._get_per_token_logps_and_entropies(trainer, at_sampling_positions, input_ids, attention,
                                                              completion, **kw)

    def step(fn):
        t0 = time.perf_counter()
        with torch.no_grad():
            fn()  # the reference model's pass
        logps, entropy, _ = fn(compute_entropy=True)  # the policy's pass, with the entropy metric
        logps.sum().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step(ours), step(trl_fused)  # warm-up
    times = {"ours": [], "trl_fused": []}
    for r in range(args.rounds):
        for name, fn in (("ours", ours), ("trl_fused", trl_fused)):
            times[name].append(step(fn))
        print(f"round {r + 1}/{args.rounds}: ours {times['ours'][-1]:.2f} s, TRL fused {times['trl_fused'][-1]:.2f} s")
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {"dtype": dtype, "batch": args.batch, "completion_tokens": completion, "rounds": args.rounds,
              "seconds": times, "median_seconds": medians, "speedup": medians["trl_fused"] / medians["ours"],
              "torch_threads": torch.get_num_threads()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS, result)
    print(f"log-probs of one GRPO step ({dtype}, {args.batch} completions): ours {medians['ours']:.2f} s, "
          f"TRL fused {medians['trl_fused']:.2f} s median -> {result['speedup']:.2f}x; wrote {RESULTS}")


if __name__ == "__main__":
    run_main(main)
