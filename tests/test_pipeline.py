"""`make all SCALE=smoke` runs every stage end to end in a copy of the repo, the report card's numbers are the ones
the stages wrote (and its example answers the ones this run's models give), and a second `make all` skips every
stage."""
import json
import shutil
import subprocess

from llm_train.arithmetic import DIGITS, EXAMPLE_PROMPTS, LANGS, OPS, arithmetic_answer, extract_answer
from llm_train.tokenizer import tokenizer_fingerprint

from conftest import checkout_env, load_script

CELLS = [f"{lang} {op} {digits}" for lang in LANGS for op in OPS for digits in DIGITS]


def read(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_stage_ran_and_was_timed(smoke_repo):
    root, log = smoke_repo
    stages = ["tokenizer", "chunks", "pretrain", "sft", "reward_model", "grpo", "eval", "report"]
    for stage in stages:
        assert f"== stage {stage} took" in log
        assert read(root / "report" / "timings" / f"{stage}.json")["seconds"] > 0
    for made in ["tokenizer/tokenizer.json", "pretrain_data_chunks/manifest.json", "output/model.safetensors",
                 "SFT/sft_output/adapter_model.safetensors", "SFT/sft_output/merged/config.json",
                 "RLHF/reward_model/config.json", "RLHF/grpo_output/config.json", "Eval/results.json",
                 "report/report.md"]:
        assert (root / made).is_file(), made


def test_report_numbers_come_from_the_stage_outputs(smoke_repo):
    root, _ = smoke_repo
    metrics = read(root / "report" / "metrics.json")
    assert metrics["tokenizer"] == read(root / "tokenizer" / "report.json")
    assert metrics["pretrain"] == read(root / "output" / "pretrain_summary.json")
    assert metrics["sft"] == read(root / "SFT" / "eval.json")
    assert metrics["reward_model"] == read(root / "RLHF" / "reward_eval.json")
    assert metrics["grpo"] == read(root / "RLHF" / "eval.json")
    assert metrics["eval"] == read(root / "Eval" / "results.json")
    report = (root / "report" / "report.md").read_text(encoding="utf-8")
    val_bpb = metrics["pretrain"]["val_bpb"]
    assert f"{val_bpb:.3f}" in report
    bpb = {m: r["results"]["llm_train_bpb_en"]["bits_per_byte"]["value"] for m, r in metrics["eval"]["models"].items()}
    assert set(bpb) == {"base", "sft", "grpo"}
    assert "| llm_train_bpb_en | bits_per_byte | " + " | ".join(f"{v:.3f}" for v in bpb.values()) + " |" in report
    for png in metrics["plots"].values():
        assert png and (root / "report" / png).read_bytes()[:4] == b"\x89PNG" and f"({png})" in report
    assert set(metrics["samples"]) == {"pretrained", "pretrained, chat template", "sft", "grpo"}
    for task in ("llm_train_arith", "llm_train_arith_heldout_wordings"):  # lm-eval's two held-out splits
        assert f"| {task} | exact_match | " in report
    check_lessons(report, metrics["sft"], metrics["grpo"])
    check_cells(report, {"base": metrics["sft"]["base"], "SFT": metrics["sft"]["sft"], "GRPO": metrics["grpo"]["grpo"]})


def test_second_run_skips_every_stage(smoke_repo):
    root, _ = smoke_repo
    proc = subprocess.run(["make", "all", "SCALE=smoke"], cwd=root, env=checkout_env(root), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "== stage" not in proc.stdout, proc.stdout


def test_replacing_an_upstream_output_is_refused_or_detected(smoke_repo, tmp_path):
    """After `make all`: the README's tokenizer command would replace tokenizer/ under everything built on it, so it
    stops and names what would go stale; a base model replaced with --force makes the SFT adapter's loaders stop."""
    # on a copy: other tests (web UI, eval) share the session's smoke run
    root = tmp_path / "llm_train"
    shutil.copytree(smoke_repo[0], root, symlinks=True)
    py = str(root / ".venv" / "bin" / "python")
    before = (root / "tokenizer" / "tokenizer.json").read_bytes()
    proc = subprocess.run([py, "train_byte_level_bpe_tokenizer.py"], cwd=root / "PreTrain",
                          env=checkout_env(root), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--force" in proc.stderr, proc.stderr
    # names what would go stale, or (another tokenizer's settings) refuses to replace the one that is there
    assert ("pretrain_data_chunks" in proc.stderr and "output" in proc.stderr) or "already holds" in proc.stderr
    assert (root / "tokenizer" / "tokenizer.json").read_bytes() == before

    # a new base over the one SFT was trained on: needs --force, and then the adapter no longer loads on it
    pretrain = [py, "PreTrain/model.py", "--preset", "smoke", "--context-length", "128", "--max-steps", "3",
                "--checkpoint-dir", str(tmp_path / "ckpt"), "--log-file", str(tmp_path / "log")]
    proc = subprocess.run(pretrain, cwd=root, env=checkout_env(root), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "SFT/sft_output" in proc.stderr and "--force" in proc.stderr, proc.stderr
    proc = subprocess.run(pretrain + ["--force"], cwd=root, env=checkout_env(root), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([py, "SFT/inference.py", "--prompt", "hi", "--max-new-tokens", "4"], cwd=root, env=checkout_env(root),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "sft_output" in proc.stderr and "output" in proc.stderr and "qlora_fine_tune_trl.py" in proc.stderr


def retrain_tokenizer(root, other_tokenizer_dir):
    """Make root/tokenizer/ look retrained after the models: another tokenizer.json, with its own report.json."""
    shutil.copy(other_tokenizer_dir / "tokenizer.json", root / "tokenizer" / "tokenizer.json")
    report = read(root / "tokenizer" / "report.json")
    report.update(vocab_size=600, fingerprint=tokenizer_fingerprint(root / "tokenizer"))
    (root / "tokenizer" / "report.json").write_text(json.dumps(report))


def test_a_retrained_tokenizer_is_not_reported_as_the_models(smoke_repo, tmp_path, tiny_tokenizer_dir):
    """The report card used to show tokenizer/'s vocabulary beside models trained on another tokenizer."""
    root = tmp_path / "llm_train"
    shutil.copytree(smoke_repo[0], root, symlinks=True)
    models_vocab = read(root / "tokenizer" / "report.json")["vocab_size"]
    retrain_tokenizer(root, tiny_tokenizer_dir)
    proc = subprocess.run([str(root / ".venv" / "bin" / "python"), "report/build_report.py", "--no-samples"],
                          cwd=root, env=checkout_env(root), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (root / "report" / "report.md").read_text(encoding="utf-8")
    section = report.split("## Tokenizer")[1].split("##")[0]
    assert "holds another tokenizer (vocabulary 600)" in section and "Vocabulary 600" not in section
    assert f"vocabulary {models_vocab:,}, the copy saved in output/" in section
    metrics = read(root / "report" / "metrics.json")
    assert metrics["tokenizer"] is None and "another tokenizer" in metrics["tokenizer_mismatch"]


def f3(x):
    return f"{x:.3f}"


def table(report, heading):
    """{first cell: [other cells]} of the first table after `heading` (bold marks kept)."""
    section = report.split(heading, 1)[1]
    lines = section[section.index("\n|"):].strip("\n").split("\n\n")[0].splitlines()
    rows = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in lines[2:]]
    return {row[0]: row[1:] for row in rows}


def check_lessons(report, sft, rl):
    """The "what each stage taught" table: greedy exact match per held-out split (base and SFT from SFT/eval.json,
    GRPO from RLHF/eval.json), sampled exact match per split, the sampled error rates and their relative reduction
    with the 95% paired-bootstrap interval, the reward-model score and the KL (RLHF/eval.json)."""
    rows = table(report, "## What each stage taught")
    trained, wordings, both = "held-out problems, trained wordings", "held-out wordings", "both held-out splits"
    assert rows[f"exact match, {trained} (greedy)"] == [
        f3(sft["base"]["exact_match"]), f3(sft["sft"]["exact_match"]), f3(rl["grpo"]["exact_match"])]
    assert rows[f"exact match, {wordings} (greedy)"] == [f3(sft["base"]["exact_match_heldout_wordings"]),
                                                        f3(sft["sft"]["exact_match_heldout_wordings"]),
                                                        f3(rl["grpo"]["exact_match_heldout_wordings"])]
    assert rows[f"exact match, {both} (greedy)"] == [f3(sft["base"]["arithmetic"]["both"]["exact_match"]),
                                                    f3(sft["sft"]["arithmetic"]["both"]["exact_match"]),
                                                    f3(rl["grpo"]["exact_answer_accuracy"])]
    sampling = rl["sampling"]
    sampled = f"sampled at temperature {sampling['temperature']}, {sampling['samples_per_problem']} per problem"
    for split, label in (("heldout", trained), ("heldout_wordings", wordings)):
        assert rows[f"exact match, {label} ({sampled})"] == [
            "n/a", f3(rl["sft"]["sampled"][split]), f3(rl["grpo"]["sampled"][split])]
    assert rows[f"exact match, {both} ({sampled})"] == [
        "n/a", f3(rl["sft"]["sampled_exact_answer_accuracy"]), f3(rl["grpo"]["sampled_exact_answer_accuracy"])]
    cut = rl["sampled_error_reduction"]
    assert rows[f"error rate, {both} ({sampled})"] == ["n/a", f3(cut["error_before"]), f3(cut["error_after"])]
    low, high = cut["ci95"]
    assert rows["sampled error rate: relative reduction SFT → GRPO (95% paired-bootstrap interval)"] == [
        "n/a", "n/a", f"{cut['relative']:+.1%} ({low:+.1%} .. {high:+.1%})"]
    assert rows["reward-model score (held-out chat prompts)"] == [
        "n/a", f3(rl["sft"]["reward_model_score"]), f3(rl["grpo"]["reward_model_score"])]
    assert rows["logits' scale (the final norm's gain relative to SFT; 1 = as sure as SFT)"] == [
        "n/a", "n/a", f"{rl['logit_scale']:.2f}x"]
    for k in ("k1", "k3"):
        kl = rl[f"kl_{k}_per_token"]
        assert rows[f"KL to the SFT policy (per token, {k} estimate)"] == ["n/a", "n/a", f"{kl:.4f}"]
    # GRPO's greedy numbers count RLHF/eval.json's problems: the note gives the SFT policy's on the same ones
    assert (f"GRPO on RLHF/eval.json's {rl['grpo']['arithmetic']['heldout']['n']} per split, on which the SFT policy "
            f"answered {f3(rl['sft']['exact_match'])} ({trained}) and {f3(rl['sft']['exact_match_heldout_wordings'])}"
            in report)


def check_cells(report, models):
    """The per-cell table: one row per language x op x digits cell, both held-out splits pooled, each model's value
    from its evaluation file, each model's lowest cell bold and named below the table."""
    rows = table(report, "### Per cell")
    by_cell = {name: m["arithmetic"]["both"]["by_cell"] for name, m in models.items()}
    assert list(rows) == [c for c in CELLS if any(c in cells for cells in by_cell.values())]
    lowest = {name: min(cells.values()) for name, cells in by_cell.items()}
    for c, row in rows.items():
        for i, name in enumerate(models):
            value = by_cell[name].get(c)
            shown = "n/a" if value is None else f3(value)
            assert row[1 + i] == (f"**{shown}**" if value == lowest[name] else shown), (c, name, row)
    line = next(line for line in report.splitlines() if line.startswith("Lowest cell: "))
    for name, cells in by_cell.items():
        names = ", ".join(c for c in CELLS if cells.get(c) == lowest[name])
        assert f"{name} {names} ({f3(lowest[name])})" in line


def test_report_example_prompts_are_this_runs_greedy_answers(smoke_repo):
    """The report's example prompts (EXAMPLE_PROMPTS, what users meet first) with the SFT and GRPO models' greedy
    answers: the replies the GRPO evaluation's generation gives on this run's models (chat template, stop tokens,
    its reply length and compute dtype), each marked right or wrong by the answer rule."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm_train.engine import generate_completions
    from llm_train.runtime import dtype_name
    from llm_train.tokenizer import load_tokenizer

    root, _ = smoke_repo
    metrics = read(root / "report" / "metrics.json")
    report = (root / "report" / "report.md").read_text(encoding="utf-8")
    answers = metrics["example_answers"]
    assert answers["max_new_tokens"] == metrics["grpo"]["max_new_tokens"]
    assert answers["dtype"] == dtype_name(allow_fp16=True) and set(answers["models"]) == {"sft", "grpo"}
    section = report.split("### The example prompts")[1].split("\n## ")[0]
    for key, name, path in (("sft", "SFT", root / "SFT" / "sft_output" / "merged"),
                            ("grpo", "GRPO", root / "RLHF" / "grpo_output")):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        _, texts = generate_completions(model, load_tokenizer(path), [[{"role": "user", "content": p}]
                                                                      for p in EXAMPLE_PROMPTS],
                                        answers["max_new_tokens"], do_sample=False, batch_size=1,
                                        dtype=answers["dtype"])
        rows = answers["models"][key]
        assert [r["prompt"] for r in rows] == EXAMPLE_PROMPTS
        assert [r["reply"] for r in rows] == [t.strip() for t in texts]
        assert [r["answer"] for r in rows] == [arithmetic_answer(p) for p in EXAMPLE_PROMPTS]
        assert None not in [r["answer"] for r in rows]
        assert [r["right"] for r in rows] == [extract_answer(t) == arithmetic_answer(p)
                                              for t, p in zip(texts, EXAMPLE_PROMPTS)]
        assert f"{name} {sum(r['right'] for r in rows)}/{len(EXAMPLE_PROMPTS)} right" in section
        mine = [line for line in section.splitlines() if line.startswith(f"- {name}: ")]
        assert len(mine) == len(EXAMPLE_PROMPTS)
        for line, r in zip(mine, rows):
            verdict = "✓ right" if r["right"] else "✗ wrong (no answer)" if r["said"] is None else \
                f"✗ wrong (said {r['said']})"
            assert line.startswith(f"- {name}: {verdict}: ")
    for p in EXAMPLE_PROMPTS:
        assert f"**{p}** (answer {arithmetic_answer(p)})" in section


def test_report_card_tables_from_made_up_eval_files():
    """With eval files of known numbers: the right numbers land in the right rows and columns, the lowest cell of
    each model is the one marked, an example answer is marked right, wrong with its number, or wrong without one,
    and a missing GRPO stage leaves its column n/a without breaking the rest."""
    report_card = load_script("report/build_report.py")
    cells = {c: round(0.5 + i / 100, 4) for i, c in enumerate(CELLS)}

    def stage(shift, low_cell):
        by_cell = {c: round(v + shift, 4) for c, v in cells.items()}
        by_cell[low_cell] = 0.125
        arithmetic = {split: {"exact_match": round(0.6 + shift + i / 10, 4), "n": 400 if split != "both" else 800,
                              "by_cell": by_cell} for i, split in enumerate(("heldout", "heldout_wordings", "both"))}
        return {"exact_match": arithmetic["heldout"]["exact_match"],
                "exact_match_heldout_wordings": arithmetic["heldout_wordings"]["exact_match"],
                "exact_answer_accuracy": arithmetic["both"]["exact_match"], "arithmetic": arithmetic,
                "ends_with_im_end": 1.0, "reward_model_score": 0.25 + shift,
                "sampled_exact_answer_accuracy": 0.5 + shift, "sampled": {"heldout": 0.55 + shift,
                                                                          "heldout_wordings": 0.45 + shift}}

    sft = {"base": stage(0.0, "zh sub 22"), "sft": stage(0.01, "en add 21"), "n_heldout_tasks": 400}
    grpo = {"sft": stage(0.02, "en sub 11"), "grpo": stage(0.03, "zh add 11"), "kl_k1_per_token": 0.00123,
            "kl_k3_per_token": 0.00117, "logit_scale": 4.776, "sampling": {"temperature": 0.7, "samples_per_problem": 4},
            "sampled_error_reduction": {"relative": 0.1234, "ci95": [-0.0456, 0.2789], "error_before": 0.48,
                                        "error_after": 0.42}, "max_new_tokens": 56}
    said = {0: 7, 1: 53, 2: None}  # right, wrong with a number, no answer
    answers = {"max_new_tokens": 56, "dtype": "fp32", "models": {key: [
        {"prompt": p, "answer": arithmetic_answer(p), "reply": f"reply {i}\nline 2", "said": said.get(i % 3),
         "right": said.get(i % 3) == arithmetic_answer(p)} for i, p in enumerate(EXAMPLE_PROMPTS)]
        for key in ("sft", "grpo")}}
    m = {"machine": {"cpu": "cpu", "cpu_count": 2, "torch": "2", "python": "3.11"}, "timings": {}, "tokenizer": None,
         "chunks": None, "pretrain": None, "sft": sft, "reward_model": None, "grpo": grpo, "eval": None, "plots": {},
         "samples": {}, "example_answers": answers}
    report = report_card.render(m)
    check_lessons(report, sft, grpo)
    check_cells(report, {"base": sft["base"], "SFT": sft["sft"], "GRPO": grpo["grpo"]})
    assert "Lowest cell: base zh sub 22 (0.125); SFT en add 21 (0.125); GRPO zh add 11 (0.125)." in report
    assert "| sampled error rate: relative reduction SFT → GRPO (95% paired-bootstrap interval) | n/a | n/a | " \
           "+12.3% (-4.6% .. +27.9%) |" in report
    assert EXAMPLE_PROMPTS[0] == "Tom has 3 apples and gets 4 more. How many apples does Tom have now?"
    assert "- SFT: ✓ right: reply 0 ⏎ line 2" in report
    assert "- GRPO: ✗ wrong (said 53): reply 1 ⏎ line 2" in report
    assert "- SFT: ✗ wrong (no answer): reply 2 ⏎ line 2" in report
    right = sum(said.get(i % 3) == arithmetic_answer(p) for i, p in enumerate(EXAMPLE_PROMPTS))
    assert f"SFT {right}/7 right, GRPO {right}/7 right." in report

    no_grpo = report_card.render(dict(m, grpo=None))  # collect() reads a missing eval file as None
    rows = table(no_grpo, "## What each stage taught")
    assert rows["exact match, held-out wordings (greedy)"] == [f3(sft["base"]["exact_match_heldout_wordings"]),
                                                              f3(sft["sft"]["exact_match_heldout_wordings"]), "n/a"]
    assert "reward-model score (held-out chat prompts)" not in rows and "| cell | digits | base | SFT |" in no_grpo
    neither = report_card.render(dict(m, sft=None, grpo=None, example_answers={}))
    assert "## What each stage taught" not in neither and "### Per cell" not in neither
    assert "## Supervised fine-tuning (QLoRA)\n\nnot run" in neither


def test_example_answers_are_greedy_chat_replies_marked_by_the_answer_rule(tiny_tokenizer_dir):
    """example_answers() asks each example prompt alone, through the chat template, greedily, and marks a reply right
    only when the number after 'The answer is' / '答案是' is the exact answer."""
    from llm_train.tokenizer import load_tokenizer, render_messages

    report_card = load_script("report/build_report.py")
    tok = load_tokenizer(tiny_tokenizer_dir)
    asked = []

    class Engine:  # the engine's interface example_answers() uses; replies: right, wrong number, no number
        tokenizer = tok

        def generate_batch(self, ids, max_new_tokens, sampling, batch_size):
            assert len(ids) == 1 and max_new_tokens == 20 and sampling.greedy and batch_size == 1
            asked.append(tok.decode(ids[0]))
            return [[len(asked) - 1]]

        def decode(self, ids):
            answer = arithmetic_answer(EXAMPLE_PROMPTS[ids[0]])
            return [f" 3 + 4. The answer is {answer}.\n", f"答案是{answer + 1}。", "I do not know."][ids[0] % 3]

    rows = report_card.example_answers(Engine(), 20)
    assert asked == [render_messages([{"role": "user", "content": p}], add_generation_prompt=True)
                     for p in EXAMPLE_PROMPTS]
    assert [r["prompt"] for r in rows] == EXAMPLE_PROMPTS
    assert [r["answer"] for r in rows] == [arithmetic_answer(p) for p in EXAMPLE_PROMPTS]
    assert [(r["right"], r["said"]) for r in rows] == [
        [(True, a), (False, a + 1), (False, None)][i % 3] for i, a in enumerate(r["answer"] for r in rows)]
    assert rows[0]["reply"] == f"3 + 4. The answer is {rows[0]['answer']}."  # stripped
