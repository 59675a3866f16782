"""Stage 7: evaluate every stage's model on the same tasks with EleutherAI's lm-evaluation-harness (lm-eval).

Reads:  the models that exist of output/ (the pretrained base), SFT/sft_output/ (the LoRA adapter on output/, which
        lm-eval's HFLM loads with peft=, then merged) and RLHF/grpo_output/ (the merged GRPO policy), each with its
        own tokenizer;
        the task YAMLs in Eval/tasks/ (offline: their data is built in memory from the repo's held-out data), and
        by name any task of lm-eval's own registry (those download their data from the Hugging Face hub).
Writes: Eval/results.json            per model, task and metric: value and stderr; the lm-eval version, the settings,
                                     documents per task, seconds per model
        Eval/samples/MODEL.jsonl     every scored document: prompt and reply (generation tasks), target, metrics

    python Eval/evaluate.py                         # the offline tasks on every model that exists (`make eval`)
    python Eval/evaluate.py --limit 16              # the first 16 documents of each task: a quick look
    python Eval/evaluate.py --tasks hellaswag,arc_easy,piqa,lambada_openai,winogrande   # needs network; GPU advised
    python Eval/evaluate.py --tasks cmmlu,ceval-valid --models sft
    lm_eval run --model hf --model_args pretrained=output --include_path Eval/tasks --tasks llm_train_bpb_en

Offline tasks (tag llm_train; Eval/tasks/*.yaml, their data and scoring in Eval/tasks/utils.py):
  llm_train_bpb_en, _zh, _code  bits per byte (loglikelihood_rolling, lm-eval's bits_per_byte) of the held-out corpus
                                files data/default_corpus/heldout_*.jsonl.gz, in passages of ~2,000 characters
  llm_train_arith               exact match of greedy answers, through the chat template, to 400 held-out
                                arithmetic problems (English and Chinese, + and -, 0-99) in the wordings training uses
  llm_train_arith_heldout_wordings  the same for 400 problems in wordings no training stage sees
                                Both: the items, answer rule and stop tokens of SFT/eval.json and RLHF/eval.json
                                (--max-new-tokens = their reply length), so their numbers and these agree: reply for
                                reply in fp32; under bf16 autocast the batches' makeup changes ~2% of the greedy
                                replies (~1 point of exact match, the CPU model)
  llm_train_continuation        multiple choice: the true next line of a held-out passage among three lines of other
                                documents (acc, acc_norm; chance 0.25)
  llm_train_bpb_pretrain_val    (by name only) bits per byte of pretrain_data_chunks/'s val split: the text whose
                                val_bpb PreTrain/model.py reports
Generation tasks run with apply_chat_template=True (these are chat models, the base too since mid-training), in
batches of --generation-batch-size prompts, greedy ones through llm_train.engine's batch loop (EngineLM), as SFT's and
GRPO's evaluations generate; log-likelihood tasks score plain text, as lm-eval's leaderboards do, in
batches of --batch-size. Without network, a task that needs the hub stops the run with one error before any model
is loaded. Weights are fp32; $LLM_TRAIN_DTYPE / auto (bf16 on GPUs) is the
autocast dtype, as in SFT's evaluation. An adapter on another base, or a GRPO model whose parents were replaced, is
refused with the command that rebuilds it.

Every model asked for with --models (default: all three) must exist: a missing one stops the run (exit 2) with its
directory and the command that builds it. A results.json this run would make less complete (a model or task it does
not evaluate, or fewer documents per task) is not replaced unless --force; use --output-dir to keep both.
"""
import argparse
import json
import logging
import os
import time
from pathlib import Path

from llm_train.atomic import atomic_write_bytes, atomic_write_json, check_writable_dir
from llm_train.cli import positive_int
from llm_train.engine import Engine, stop_token_ids
from llm_train.errors import UserError, run_main
from llm_train.lineage import check_lineage, recorded_parents
from llm_train.paths import GRPO_OUTPUT_DIR, OUTPUT_DIR, REPO, SFT_OUTPUT_DIR
from llm_train.runtime import compute_dtype, dtype_name
from llm_train.stage_files import read_json
from llm_train.tokenizer import load_chat_tokenizer

EVAL_DIR = REPO / "Eval"
TASKS_DIR = EVAL_DIR / "tasks"
MODELS = ("base", "sft", "grpo")
# lm-eval warns about every task with a custom dataset, about every model with "chat" in its path, and about every
# context it cuts to the model's window (from the left, as designed: the CPU models see 128 tokens): noise here.
for _name in ("lm_eval.api.task", "lm_eval.evaluator", "lm_eval.models.huggingface"):
    logging.getLogger(_name).addFilter(lambda r: not any(s in r.getMessage() for s in (
        "Custom kwargs can be passed", "appears to be an instruct or chat variant", "exceeds model's maximum length")))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", default="llm_train",
                   help="comma-separated lm-eval task, group or tag names; llm_train = the offline tasks")
    p.add_argument("--models", nargs="+", choices=MODELS,
                   help="which models (not given: all three; a missing one is an error naming the command that "
                        "builds it)")
    p.add_argument("--limit", type=positive_int, help="only the first N documents of each task (not given: all)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="sequences per forward pass of the log-likelihood tasks (bits per byte, multiple choice)")
    p.add_argument("--generation-batch-size", type=positive_int, default=128,
                   help="prompts per batch of the generation tasks: with the small models a new token costs little "
                        "more for 128 rows than for 32")
    p.add_argument("--device", help="cuda, cuda:N or cpu (not given: cuda when there is a GPU, else cpu)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64,
                   help="reply length of the offline generation tasks (SFT's --max-new-tokens, for the same numbers)")
    p.add_argument("--base-dir", type=Path, default=OUTPUT_DIR, help="the pretrained model")
    p.add_argument("--sft-dir", type=Path, default=SFT_OUTPUT_DIR, help="the SFT LoRA adapter (on --base-dir)")
    p.add_argument("--grpo-dir", type=Path, default=GRPO_OUTPUT_DIR, help="the merged GRPO policy")
    p.add_argument("--output-dir", type=Path, default=EVAL_DIR, help="results.json and samples/ go here")
    p.add_argument("--force", action="store_true",
                   help="replace an existing results.json even if it holds models or tasks this run does not "
                        "evaluate, or more documents per task (without it such a run stops before evaluating)")
    return p.parse_args(argv)


BUILT_BY = {"base": "python PreTrain/model.py", "sft": "python SFT/qlora_fine_tune_trl.py",
            "grpo": "python RLHF/grpo_trl.py"}


def find_models(args):
    """{name: (model dir, adapter dir or None, tokenizer dir)} of the models asked for (default: all three), after
    checking that each exists and still belongs to the outputs it was built from."""
    base, sft, grpo = args.base_dir, args.sft_dir, args.grpo_dir
    needs = {"base": [(base, "config.json", "--base-dir")],
             "sft": [(sft, "adapter_config.json", "--sft-dir"), (base, "config.json", "--base-dir")],
             "grpo": [(grpo, "config.json", "--grpo-dir")]}
    wanted = args.models or list(MODELS)
    for name in wanted:
        for where, file, flag in needs[name]:
            if not (where / file).is_file():
                owner = "base" if flag == "--base-dir" else name  # an adapter's base is missing: build the base
                what = f"{name} model" if owner == name else f"base model (the {name} adapter's)"
                raise UserError(f"no {what} in {where} ({file} missing): build it with `{BUILT_BY[owner]}` "
                                f"(or `make all`), pass {flag} DIR, or leave it out with --models")
    if "sft" in wanted:
        check_lineage(sft, f"python SFT/qlora_fine_tune_trl.py --force --model-dir {base} --output-dir {sft}",
                      base=base)
    if "grpo" in wanted:  # against the parents its lineage names that still exist (as RLHF/grpo_trl.py does)
        check_lineage(grpo, "python RLHF/grpo_trl.py --force", **recorded_parents(grpo))
    found = {"base": (base, None, base), "sft": (base, sft, sft), "grpo": (grpo, None, grpo)}
    return {name: found[name] for name in wanted}


def check_replaceable(path, models, names, limit, force):
    """UserError before any evaluation if the results.json in path holds more than this run will write (a model or
    task name it lacks, or all documents / more of them per task), unless force: a partial run never silently
    replaces a fuller one."""
    old = read_json(path, lenient=True)
    if force or not old:
        return
    lost = [f"model {m}" for m in old.get("models", {}) if m not in models]
    lost += [f"task {t}" for t in old.get("settings", {}).get("tasks", []) if t not in names]
    old_limit = old.get("settings", {}).get("limit")
    if limit is not None and (old_limit is None or old_limit > limit):
        lost.append(f"{'all' if old_limit is None else old_limit} documents per task (this run: {limit})")
    if lost:
        raise UserError(f"{path} holds results this run would drop ({', '.join(lost)}): pass --force to replace "
                        f"it anyway, or --output-dir DIR to write elsewhere; nothing was evaluated")


def resolve_tasks(names):
    """(task manager, offline task names, hub names): the offline names expanded to single tasks, every name checked
    to exist and every task loaded once, so a task that cannot get its data stops the run before any model loads."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    ours = set(manager.all_tasks)
    if any(n not in ours for n in names):  # indexing lm-eval's ~15k tasks takes ~20 s: only when they are asked for
        manager = TaskManager(include_path=str(TASKS_DIR))
    for name in names:
        if name not in manager.all_tasks:
            raise UserError(f"unknown task {name!r}: neither in {TASKS_DIR} nor in lm-eval's registry (`lm_eval ls "
                            "tasks` lists them)")
    offline, hub = [], []
    for name in names:
        try:
            loaded = manager.load([name])["tasks"]
        except UserError:
            raise
        except Exception as e:
            if name in ours:
                raise
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}" if str(e).strip() else type(e).__name__
            raise UserError(f"task {name} downloads its data ({why}): run with network, or use the offline tasks "
                            f"(--tasks llm_train)") from None
        if name in ours:
            offline += [t for t in loaded if t not in offline]
        else:
            hub.append((name, all(t.OUTPUT_TYPE == "generate_until" for t in loaded.values())))
    return manager, offline, hub


def engine_lm_class():
    """lm-eval's HFLM whose greedy generation runs in llm_train.engine's batch loop, as SFT's and GRPO's evaluations
    do (the same replies up to the batches' makeup, and faster than generate() on a CPU); sampled requests (a hub
    task's) go to HFLM's own generate()."""
    import torch
    from lm_eval.models.huggingface import HFLM

    class EngineLM(HFLM):
        def _model_generate(self, context, max_length, stop, **kwargs):
            if kwargs.get("do_sample") or kwargs.get("temperature") or "attention_mask" not in kwargs:
                return super()._model_generate(context, max_length, stop, **kwargs)
            engine = Engine(self.model, self.tokenizer, dtype_name(allow_fp16=True))
            new = engine.decode_batch(context, kwargs["attention_mask"], max_length - context.shape[1])
            return torch.cat([context, new], dim=1)  # lm-eval cuts the text at its stop strings

    return EngineLM


def load_model(model_dir, adapter_dir, tokenizer_dir, args):
    """lm-eval's HFLM (EngineLM) on one model: a local dir, plus a LoRA adapter through peft= (merged into the
    weights), with the chat tokenizer."""
    import torch

    dtype = compute_dtype(allow_fp16=True)
    tokenizer = load_chat_tokenizer(tokenizer_dir)
    lm = engine_lm_class()(pretrained=str(model_dir), peft=str(adapter_dir) if adapter_dir else None,
                           tokenizer=tokenizer, device=args.device, batch_size=args.batch_size, dtype=torch.float32,
                           trust_remote_code=False, mixed_precision_dtype=None if dtype == torch.float32 else dtype,
                           softmax_dtype=torch.float32)
    # A reply ends at <|im_end|> (or <|endoftext|>), as in SFT's and GRPO's own evaluations: the rows of a batch that
    # are done get pad tokens while the others finish, not the text after the end of their turn.
    lm.model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    if adapter_dir:  # the policy SFT and GRPO use: merged, as in their evaluations (an unmerged LoRA costs 2x a step)
        lm._model = lm.model.merge_and_unload()
    return lm


def evaluate_model(lm, manager, offline, hub, args):
    """simple_evaluate on one model, twice: generation tasks through the chat template, the others on plain text.
    Returns lm-eval's results dicts (one per call made)."""
    import lm_eval

    tasks = manager.load(offline)["tasks"] if offline else {}  # fresh task objects for each model
    for task in tasks.values():
        if task.OUTPUT_TYPE == "generate_until":
            task.set_config("generation_kwargs", {"max_gen_toks": args.max_new_tokens}, update=True)
    chat = [t for t in tasks.values() if t.OUTPUT_TYPE == "generate_until"] + [n for n, gen in hub if gen]
    plain = [t for t in tasks.values() if t.OUTPUT_TYPE != "generate_until"] + [n for n, gen in hub if not gen]
    runs = []
    for specs, chat_template, batch_size in ((plain, False, args.batch_size), (chat, True, args.generation_batch_size)):
        if specs:
            lm.batch_size_per_gpu = batch_size  # HFLM's batch size (one setting for every request type)
            runs.append(lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=args.limit,
                                                apply_chat_template=chat_template, log_samples=True))
    return runs


def metrics_of(task_results):
    """{metric: {"value", "stderr"}} from lm-eval's {"metric,filter": value, "metric_stderr,filter": ...}; a filter
    other than "none" (e.g. gsm8k's strict-match) is kept in the name."""
    out = {}
    for key, value in task_results.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, filt = key.split(",", 1)
        stderr = task_results.get(f"{metric}_stderr,{filt}")
        out[metric if filt == "none" else f"{metric},{filt}"] = {
            "value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None}
    return out


def sample_rows(task, samples, output_type):
    """Eval/samples lines of one task: what was scored, slimmed (no documents of the bits-per-byte tasks)."""
    rows = []
    for s in samples:
        row = {"task": task, "doc_id": s["doc_id"]}
        if output_type == "generate_until":
            row.update(prompt=s["arguments"][0][0], target=s["target"], response=s["filtered_resps"][0])
        elif output_type != "loglikelihood_rolling":
            row.update(target=s["target"], loglikelihoods=[r[0] for r in s["filtered_resps"]])
        row.update({m: s[m] for m in s.get("metrics", []) if m in s})
        rows.append(row)
    return rows


def write_samples(path, rows):
    text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
    atomic_write_bytes(path, text.encode("utf-8"))


def table(results):
    """Plain-text comparison: one row per task and metric, one column per model."""
    models = list(results["models"])
    rows = [("task", "metric", *models)]
    for task in dict.fromkeys(t for r in results["models"].values() for t in r["results"]):
        metrics = {m for r in results["models"].values() for m in r["results"].get(task, {})}
        for metric in sorted(metrics):
            values = [results["models"][m]["results"].get(task, {}).get(metric, {}).get("value") for m in models]
            rows.append((task, metric, *("n/a" if v is None else f"{v:.4f}" for v in values)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def main(argv=None):
    args = parse_args(argv)
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        raise UserError("--tasks is empty: give task names, e.g. --tasks llm_train")
    models = find_models(args)
    check_writable_dir(args.output_dir)
    check_replaceable(args.output_dir / "results.json", models, names, args.limit, args.force)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: torch sees no CUDA GPU here; use --device cpu")
    if all(n.startswith("llm_train") for n in names):  # the offline tasks (all named so) never need the hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval

    manager, offline, hub = resolve_tasks(names)
    print(f"eval: {', '.join(models)} on {', '.join(offline + [n for n, _ in hub])}"
          f"{f' (first {args.limit} documents each)' if args.limit else ''}, {args.device}, "
          f"{dtype_name(allow_fp16=True)}", flush=True)

    results = {"lm_eval_version": lm_eval.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "settings": {"tasks": names, "limit": args.limit, "batch_size": args.batch_size,
                            "generation_batch_size": args.generation_batch_size, "device": args.device,
                            "dtype": dtype_name(allow_fp16=True), "max_new_tokens": args.max_new_tokens},
               "tasks": {}, "models": {}}
    t_start = time.time()
    for name, (model_dir, adapter_dir, tokenizer_dir) in models.items():
        t0 = time.time()
        lm = load_model(model_dir, adapter_dir, tokenizer_dir, args)
        entry = {"model_dir": str(model_dir), "adapter_dir": str(adapter_dir) if adapter_dir else None, "results": {}}
        rows = []
        for run in evaluate_model(lm, manager, offline, hub, args):
            for task, task_results in run["results"].items():
                entry["results"][task] = metrics_of(task_results)
            for task, config in run["configs"].items():
                n = run["n-samples"].get(task, {})
                results["tasks"][task] = {"output_type": config["output_type"], "documents": n.get("effective"),
                                          "of": n.get("original"),
                                          "chat_template": config["output_type"] == "generate_until"}
                rows += sample_rows(task, run["samples"].get(task, []), config["output_type"])
        entry["seconds"] = round(time.time() - t0, 1)
        results["models"][name] = entry
        write_samples(args.output_dir / "samples" / f"{name}.jsonl", rows)
        print(f"eval: {name} done in {entry['seconds']:.1f}s", flush=True)
        del lm
    results["seconds"] = round(time.time() - t_start, 1)
    atomic_write_json(args.output_dir / "results.json", results)
    print(table(results))
    print(f"eval: wrote {args.output_dir / 'results.json'} in {results['seconds']:.0f}s")


if __name__ == "__main__":
    run_main(main)
