"""Eval/evaluate.py (lm-evaluation-harness on every stage's model) against the stages' own numbers: lm-eval's bits
per byte equals PreTrain/model.py's val_bpb on the same text, and its arithmetic replies and exact match equal the
SFT and GRPO evaluations' on the same items. The models are those of the smoke pipeline, whose `make all` ran
`make eval` (--limit 8 --max-new-tokens 12); nothing is mocked and nothing comes from the hub."""
import json
import math
import subprocess
import types

from llm_train.arithmetic import (
    DIGITS,
    LANGS,
    OPS,
    arithmetic_answer,
    arithmetic_split,
    arithmetic_tasks,
    cell,
    evaluation_tasks,
    extract_answer,
)
from llm_train.chunks import chunk_rows
from llm_train.engine import generate_completions
from llm_train.gpt import GPT
from llm_train.rl import load_policy
from llm_train.runtime import dtype_name
from llm_train.tokenizer import EOT, IM_END, load_chat_tokenizer, render_messages

import pytest

from conftest import PY, REPO, checkout_env, load_script

ARITH = {"heldout": "llm_train_arith", "heldout_wordings": "llm_train_arith_heldout_wordings"}  # split: task


def read(path):
    return json.loads(path.read_text(encoding="utf-8"))


def samples(root, model):
    return [json.loads(line) for line in (root / "Eval" / "samples" / f"{model}.jsonl").read_text().splitlines()]


def run_eval(root, *args, env=None):
    """The smoke copy's own Eval/evaluate.py, so its default paths are that copy's stage outputs."""
    return subprocess.run([PY, str(root / "Eval" / "evaluate.py"), *map(str, args)], cwd=root, capture_output=True,
                          text=True, timeout=600, env={**checkout_env(root), **(env or {})})


def stage_val_loss(root, all_rows):
    """PreTrain/model.py's own evaluate() on the run's final checkpoint (its own GPT class and val rows): the mean
    loss per token over the rows the run validated on (--eval-rows), or over every val row."""
    import torch
    from safetensors.torch import load_file

    stage = load_script("PreTrain/model.py")
    chunks = root / "pretrain_data_chunks"
    manifest = read(chunks / "manifest.json")
    checkpoint = max((root / "checkpoints" / "smoke" / "pretrain").glob("step_*"))  # make all: per SCALE
    state = read(checkpoint / "state.json")
    config = state["model_config"]
    model = GPT(**config)
    model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
    rows = chunk_rows(chunks, manifest, "val", config["context_length"], config["vocab_size"])
    eval_rows = len(rows) if all_rows else int(state["args"]["eval_rows"])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=state["args"]["dtype"] == "bf16")  # the run's
    val = stage.evaluate(model.eval(), autocast, rows, eval_rows, int(state["args"]["batch_size"]),
                         types.SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu")),
                         manifest["splits"]["val"]["tokens"] / manifest["splits"]["val"]["bytes"])
    return val["val_loss"], val["val_bpb"]


def test_bits_per_byte_equals_the_pretraining_stage_val_bpb(smoke_repo, tmp_path):
    """Same text (pretrain_data_chunks' val split), same model, two implementations: the stage packs documents into
    rows (it also predicts each <|endoftext|>, never a row's first token), lm-eval scores each document in rolling
    windows from an <|endoftext|> prefix. They agree within 0.5%."""
    root, _ = smoke_repo
    summary = read(root / "output" / "pretrain_summary.json")
    # the stage function, checkpoint and rows used here are the run's own: they give its reported val loss exactly
    assert stage_val_loss(root, all_rows=False)[0] == pytest.approx(summary["final_val_loss"], rel=1e-6)
    _, stage_bpb = stage_val_loss(root, all_rows=True)

    proc = run_eval(root, "--models", "base", "--tasks", "llm_train_bpb_pretrain_val", "--output-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = read(tmp_path / "results.json")["models"]["base"]["results"]["llm_train_bpb_pretrain_val"]
    assert result["bits_per_byte"]["value"] == pytest.approx(stage_bpb, rel=5e-3)


def lm_eval_replies(root, model, items):
    """{prompt: reply} of the lm-eval samples of `model` for the arithmetic `items` (evaluation_tasks: both held-out
    splits), after checking that each split's items are the first documents of its task, were prompted through the
    chat template and scored by the answer rule."""
    rows = samples(root, model)
    replies = {}
    for split, task in ARITH.items():
        mine = [t for t in items if t["split"] == split]
        assert mine
        done = [r for r in rows if r["task"] == task][:len(mine)]
        assert [r["prompt"] for r in done] == [
            render_messages([{"role": "user", "content": t["prompt"]}], add_generation_prompt=True) for t in mine]
        replies.update({t["prompt"]: r["response"] for t, r in zip(mine, done)})
        assert [r["exact_match"] for r in done] == [int(extract_answer(r["response"]) == t["answer"])
                                                   for t, r in zip(mine, done)]
    return replies


def scores(items, replies):
    """Exact match per held-out split and per language x op x digits cell ({split or 'both': {"exact_match", "n",
    "by_cell"}}), counted here from the replies, the way SFT/eval.json and RLHF/eval.json report it."""
    by_split = {}
    for t in items:
        right = float(extract_answer(replies[t["prompt"]]) == t["answer"])
        for split in (t["split"], "both"):
            by_split.setdefault(split, {}).setdefault(cell(t), []).append(right)
    out = {}
    for split, cells in by_split.items():
        flat = [r for rights in cells.values() for r in rights]
        out[split] = {"exact_match": round(sum(flat) / len(flat), 4), "n": len(flat),
                      "by_cell": {c: round(sum(v) / len(v), 4) for c, v in sorted(cells.items())}}
    return out


def check_breakdown(items, replies, stage_metrics, headline):
    """stage_metrics (one model's part of SFT/eval.json or RLHF/eval.json) holds the per-split and per-cell exact
    match of these replies: its "arithmetic" breakdown, its per-split numbers and its headline (both splits)."""
    ours = scores(items, replies)
    assert set(ours) == {"heldout", "heldout_wordings", "both"} and ours == stage_metrics["arithmetic"]
    assert stage_metrics["exact_match"] == ours["heldout"]["exact_match"]
    assert stage_metrics["exact_match_heldout_wordings"] == ours["heldout_wordings"]["exact_match"]
    if headline:
        assert stage_metrics[headline] == ours["both"]["exact_match"]


def test_arithmetic_replies_and_exact_match_equal_the_sft_and_grpo_evaluations(smoke_repo):
    """The SFT stage's own generate() (base and SFT, as in SFT/eval.json) and the RLHF stage's own
    generate_completions() (SFT policy and GRPO, as in RLHF/eval.json) replay their greedy replies on the items of
    both held-out splits; lm-eval's replies to the same items (llm_train_arith, llm_train_arith_heldout_wordings),
    with the same number of new tokens, are the same strings, so the exact match per split and per language x op x
    digits cell is the same too."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, _ = smoke_repo
    settings = read(root / "Eval" / "results.json")["settings"]
    sft_eval, rlhf_eval = read(root / "SFT" / "eval.json"), read(root / "RLHF" / "eval.json")
    assert settings["max_new_tokens"] == rlhf_eval["max_new_tokens"]  # and SFT's --max-new-tokens (Makefile)
    items = evaluation_tasks(sft_eval["n_heldout_tasks"], seed=0)  # SFT's: n of each held-out split
    rl_items = evaluation_tasks(rlhf_eval["arithmetic_prompts"] // 2, seed=0)  # RLHF's: the first ones of each
    assert {t["split"] for t in rl_items} == {"heldout", "heldout_wordings"}
    assert all(t in items for t in rl_items)  # lm-eval (--limit 8) has answered them all

    sft_stage = load_script("SFT/qlora_fine_tune_trl.py")
    tokenizer = load_chat_tokenizer(root / "output")
    base = AutoModelForCausalLM.from_pretrained(str(root / "output"), dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(root / "SFT" / "sft_output")).eval()
    conversations = [sft_stage.arithmetic_conversation(t)[:1] for t in items]
    with model.disable_adapter():
        stage = {"base": sft_stage.generate(model, tokenizer, conversations, settings["max_new_tokens"])}
    stage["sft"] = sft_stage.generate(model, tokenizer, conversations, settings["max_new_tokens"])
    for name in ("base", "sft"):
        replies = {t["prompt"]: text for t, (text, _) in zip(items, stage[name])}
        check_breakdown(items, replies, sft_eval[name], None)  # the replay is SFT/eval.json's
        assert [replies[e["prompt"]] for e in sft_eval[name]["examples"] if "answer" in e] == \
            [e["reply"] for e in sft_eval[name]["examples"] if "answer" in e]
        ours = lm_eval_replies(root, name, items)
        assert {p: r.strip() for p, r in ours.items()} == replies
        check_breakdown(items, ours, sft_eval[name], None)

    messages = [[{"role": "user", "content": t["prompt"]}] for t in rl_items]
    for name, path in (("sft", root / "SFT" / "sft_output"), ("grpo", root / "RLHF" / "grpo_output")):
        if name == "sft":
            policy, tok = load_policy(path, root / "output")
        else:  # as RLHF/grpo_trl.py loads it
            policy, tok = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval(), \
                load_chat_tokenizer(path)
            policy.generation_config.eos_token_id = [tok.convert_tokens_to_ids(IM_END),
                                                     tok.convert_tokens_to_ids(EOT)]
        _, texts = generate_completions(policy.eval(), tok, messages, settings["max_new_tokens"], do_sample=False,
                                        dtype=dtype_name(allow_fp16=True))  # as grpo_trl.py evaluates
        replies = dict(zip((t["prompt"] for t in rl_items), texts))
        check_breakdown(rl_items, replies, rlhf_eval[name], "exact_answer_accuracy")
        ours = lm_eval_replies(root, name, rl_items)
        assert ours == replies
        check_breakdown(rl_items, ours, rlhf_eval[name], "exact_answer_accuracy")


def test_make_eval_scored_every_model_on_every_offline_task(smoke_repo):
    import lm_eval

    root, log = smoke_repo
    assert "== stage eval took" in log
    results = read(root / "Eval" / "results.json")
    assert results["lm_eval_version"] == lm_eval.__version__ == "0.4.13"
    offline = ["llm_train_bpb_en", "llm_train_bpb_zh", "llm_train_bpb_code", "llm_train_continuation", *ARITH.values()]
    assert sorted(results["tasks"]) == sorted(offline)
    assert all(results["tasks"][t]["documents"] == 8 for t in offline)  # make eval SCALE=smoke: --limit 8
    assert [t for t in offline if results["tasks"][t]["chat_template"]] == list(ARITH.values())
    assert list(results["models"]) == ["base", "sft", "grpo"]
    bpb = {m: r["results"]["llm_train_bpb_en"]["bits_per_byte"]["value"] for m, r in results["models"].items()}
    assert len(set(bpb.values())) == 3  # the adapter is applied (peft=), and GRPO moved the SFT policy

    # The bits-per-byte documents are the held-out files cut at line ends, every byte as it is in the file: the
    # byte counts lm-eval divided by are those of the first 8 passages.
    utils = load_script("Eval/tasks/utils.py")
    for lang in ("en", "zh", "code"):
        passages = [p for doc in utils.heldout_documents(lang) for p in utils.passages(doc)]
        assert "".join(passages) == "".join(utils.heldout_documents(lang))
        scored = [r["bits_per_byte"][1] for r in samples(root, "base") if r["task"] == f"llm_train_bpb_{lang}"]
        assert scored == [len(p.encode("utf-8")) for p in passages[:8]]
        lls = [r["bits_per_byte"][0] for r in samples(root, "base") if r["task"] == f"llm_train_bpb_{lang}"]
        value = results["models"]["base"]["results"][f"llm_train_bpb_{lang}"]["bits_per_byte"]["value"]
        assert value == pytest.approx(-sum(lls) / sum(scored) / math.log(2), rel=1e-9)


def test_offline_task_data_and_scoring():
    """One arithmetic task per held-out split, each the 400 problems of that split that evaluation_tasks gives
    (those SFT/eval.json and RLHF/eval.json count first), every language x op x digits cell well represented; a
    reference worked answer scores 1 and a near miss 0. Each multiple-choice item's right choice is the line that
    follows its context in a held-out document."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(REPO / "Eval" / "tasks"), include_defaults=False)
    tasks = manager.load(["llm_train"])["tasks"]
    assert not any(name.startswith("llm_train_arith") and name not in ARITH.values() for name in tasks)
    cells = {f"{lang} {op} {digits}" for lang in LANGS for op in OPS for digits in DIGITS}
    prompts = {}
    for split, name in ARITH.items():
        docs = list(tasks[name].eval_docs)
        assert len(docs) == 400 and {d["split"] for d in docs} == {split}
        assert [d["prompt"] for d in docs] == [t["prompt"] for t in arithmetic_tasks(400, split, seed=0)]
        assert docs == [{**{k: t[k] for k in ("prompt", "answer", "split", "lang", "op", "digits", "response")},
                         "cell": cell(t)} for t in evaluation_tasks(400, seed=0) if t["split"] == split]
        assert all(arithmetic_answer(d["prompt"]) == d["answer"] for d in docs)  # the answers are the prompts'
        if split == "heldout":  # held-out problems in the trained wordings
            assert all(arithmetic_split(d["prompt"]) == "heldout" for d in docs)
        counts = {c: sum(d["cell"] == c for d in docs) for c in cells}
        assert set(d["cell"] for d in docs) == cells and min(counts.values()) >= 15, counts
        prompts[split] = {d["prompt"] for d in docs}
        for doc in docs:
            answer = str(doc["answer"])
            cut = doc["response"].rfind(answer)
            near = doc["response"][:cut] + str(doc["answer"] + 1) + doc["response"][cut + len(answer):]
            assert tasks[name].process_results(doc, [doc["response"]]) == {"exact_match": 1}
            assert tasks[name].process_results(doc, [near]) == {"exact_match": 0}

    assert not prompts["heldout"] & prompts["heldout_wordings"]

    utils = load_script("Eval/tasks/utils.py")
    held = {lang: "".join(utils.heldout_documents(lang)) for lang in ("en", "zh", "code")}
    docs = list(tasks["llm_train_continuation"].eval_docs)
    assert len(docs) == 300 and [d["lang"] for d in docs[:6]] == ["en", "zh", "code"] * 2
    for d in docs:
        assert len(set(d["choices"])) == 4 and d["context"].strip()
        assert d["context"] + d["choices"][d["label"]] in held[d["lang"]]
        assert sum(d["context"] + c in held[d["lang"]] for c in d["choices"]) == 1


def test_a_task_that_needs_the_hub_is_one_clear_error_offline(smoke_repo, tmp_path):
    root, _ = smoke_repo
    proc = run_eval(root, "--tasks", "hellaswag", "--models", "base", "--output-dir", tmp_path / "out",
                    env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "task hellaswag downloads its data" in proc.stderr and "--tasks llm_train" in proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_missing_model_is_an_error_and_a_partial_run_never_replaces_fuller_results(smoke_repo, tmp_path):
    """`--base-dir /wrong` used to evaluate GRPO alone, without a word, over the three models' results.json."""
    root, _ = smoke_repo
    out = tmp_path / "out"
    proc = run_eval(root, "--base-dir", tmp_path / "wrong", "--output-dir", out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"no base model in {tmp_path / 'wrong'}" in proc.stderr and "python PreTrain/model.py" in proc.stderr
    proc = run_eval(root, "--models", "sft", "--base-dir", tmp_path / "wrong", "--output-dir", out)
    assert proc.returncode == 2 and "the sft adapter's" in proc.stderr and "--base-dir" in proc.stderr
    assert not out.exists()

    out.mkdir()
    fuller = read(root / "Eval" / "results.json")  # base, sft and grpo
    (out / "results.json").write_text(json.dumps(fuller))
    for args in (["--models", "grpo"], ["--tasks", "llm_train_bpb_en"], ["--limit", "2"]):
        proc = run_eval(root, *args, "--output-dir", out)
        assert proc.returncode == 2 and "--force" in proc.stderr and "nothing was evaluated" in proc.stderr, args
    assert "model base" in run_eval(root, "--models", "grpo", "--output-dir", out).stderr
    assert read(out / "results.json") == fuller and not (out / "samples").exists()
    proc = run_eval(root, "--models", "base", "--tasks", "llm_train_bpb_en", "--limit", "2", "--force",
                    "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(read(out / "results.json")["models"]) == ["base"]
    assert "--force" in run_eval(root, "--help").stdout
