"""The report card: reads what each stage wrote on disk and writes report/report.md, report/metrics.json and PNG plots.

Reads:  tokenizer/report.json, pretrain_data_chunks/manifest.json, output/pretrain_summary.json + history.jsonl,
        SFT/eval.json + SFT/sft_output/history.jsonl, RLHF/reward_eval.json, RLHF/eval.json,
        RLHF/grpo_output/history.jsonl, Eval/results.json (lm-eval, every model on the same tasks),
        report/timings/*.json (stage wall times written by `make all`), and the models in output/, SFT/sft_output/
        and RLHF/grpo_output/ for sample generations and the SFT and GRPO models' greedy answers to the example
        prompts users meet first (llm_train.arithmetic.EXAMPLE_PROMPTS), marked right or wrong.
Writes: report/report.md, report/metrics.json, report/pretrain_loss.png, report/sft_loss.png, report/grpo.png,
        report/eval.png.

    python report/build_report.py          # after `make all` (which runs it as its last step)

Every number in the report is read from those files (or, for the example prompts, generated from this run's
models); nothing is typed in. A stage whose files are missing is reported as "not run".

The arithmetic evaluations have two held-out splits (llm_train/arithmetic.py): held-out problems in the wordings
training uses, and problems in wordings no training stage sees. The report shows both, per language x operation x
digits cell too, and GRPO's sampled error-rate reduction over SFT with its 95% paired-bootstrap interval.
"""
import argparse
import platform
from pathlib import Path

from llm_train import runtime
from llm_train.arithmetic import DIGITS, DIGITS_NAMES, EXAMPLE_PROMPTS, LANGS, OPS, arithmetic_answer, extract_answer
from llm_train.atomic import atomic_write_bytes, atomic_write_json
from llm_train.cli import positive_int
from llm_train.engine import GREEDY, Engine, Sampling, prompt_token_ids
from llm_train.errors import run_main
from llm_train.paths import CHUNKS_DIR, GRPO_OUTPUT_DIR, OUTPUT_DIR, REPO, SFT_OUTPUT_DIR, TOKENIZER_DIR
from llm_train.runtime import dtype_name
from llm_train.stage_files import read_json, read_jsonl, series, tokenizer_report
from llm_train.tokenizer import IM_END, load_tokenizer, render_messages

REPORT_DIR = REPO / "report"
STAGES = ["tokenizer", "chunks", "pretrain", "sft", "reward_model", "grpo", "eval", "report"]  # in pipeline order
PROMPTS = ["The history of the United States", "子曰：学而时习之",
           "Tom has 47 apples and gets 38 more. How many apples does Tom have now?", "def fibonacci(n):"]


def machine():
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": __import__("os").cpu_count()}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def plot(path, series, title, xlabel="step"):
    """series: list of (label, xs, ys, axis) with axis 0 = left, 1 = right. Returns the file name or None."""
    series = [s for s in series if s[1]]
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    right = ax.twinx() if any(s[3] for s in series) else None
    for label, xs, ys, axis in series:
        (right if axis else ax).plot(xs, ys, label=label, color=None if not axis else "tab:red")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    handles = ax.get_legend_handles_labels()
    if right:
        handles = [a + b for a, b in zip(handles, right.get_legend_handles_labels())]
    ax.legend(*handles, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


SAMPLINGS = (("greedy", GREEDY), ("sampled", Sampling(temperature=0.8, top_k=50, top_p=1.0)))


def generate_samples(max_new_tokens, answer_tokens=64, seed=0, base_dir=OUTPUT_DIR, sft_dir=SFT_OUTPUT_DIR,
                     grpo_dir=GRPO_OUTPUT_DIR):
    """(samples, example answers). Samples: continuations of the same prompts by the base, SFT and GRPO models
    (those that exist): greedy, and sampled at temperature 0.8 (top-k 50, fixed seed), since greedy decoding of a
    small model loops. The base continues the plain text, and answers it as a user message through the chat template
    too (it was mid-trained on chats); the SFT and GRPO models answer through the chat template. Each model with the
    tokenizer saved with it. Example answers: example_answers() of the SFT and GRPO models, answer_tokens long."""
    from transformers import AutoModelForCausalLM

    # On a GPU the models sample there, as the evaluations that wrote eval.json generate (fp32 weights under the compute
    # dtype's autocast); on CPU in fp32.
    dev = runtime.device()
    dtype = dtype_name(allow_fp16=True) if dev.type == "cuda" else "fp32"
    # full models only: SFT's merged/ copy, GRPO's output dir (it saves the merged policy there); the base twice
    runs = [("pretrained", base_dir, False), ("pretrained, chat template", base_dir, True),
            ("sft", Path(sft_dir) / "merged", True), ("grpo", grpo_dir, True)]
    samples, loaded = {}, None
    answers = {"max_new_tokens": answer_tokens, "dtype": dtype_name(allow_fp16=True), "models": {}}
    for label, path, chat in runs:
        if not (Path(path) / "config.json").is_file():
            continue
        if path != loaded:
            tok = load_tokenizer(path)
            model = AutoModelForCausalLM.from_pretrained(str(path)).to(dev).eval()  # fp32 weights
            engine, loaded = Engine(model, tok, dtype), path
        samples[label] = {prompt: prompt_samples(engine, prompt, chat, max_new_tokens, seed) for prompt in PROMPTS}
        if label in ("sft", "grpo"):
            answers["models"][label] = example_answers(Engine(model, tok, answers["dtype"]), answer_tokens)
    return samples, answers


def example_answers(engine, max_new_tokens):
    """The greedy answer of engine's model to each of EXAMPLE_PROMPTS (the prompts users meet first: README, web UI,
    inference scripts; all held out from training), through the chat template, one prompt at a time as a user
    asks it, with the compute dtype the evaluations use: [{"prompt", "answer" (the exact one), "reply", "said" (the
    number after 'The answer is' / '答案是', or None), "right"}]."""
    out = []
    for prompt in EXAMPLE_PROMPTS:
        ids = prompt_token_ids(engine.tokenizer, [[{"role": "user", "content": prompt}]])
        reply = engine.decode(engine.generate_batch(ids, max_new_tokens, GREEDY, batch_size=1)[0]).strip()
        answer, said = arithmetic_answer(prompt), extract_answer(reply)
        out.append({"prompt": prompt, "answer": answer, "reply": reply, "said": said,
                    "right": said is not None and said == answer})
    return out


def prompt_samples(engine, prompt, chat, max_new_tokens, seed):
    """{mode: reply} of one prompt, each sampling mode from the same seed."""
    import torch

    text = render_messages([{"role": "user", "content": prompt}], True) if chat else prompt
    ids = engine.fit(engine.tokenizer(text, add_special_tokens=False).input_ids, max_new_tokens)
    out = {}
    for mode, sampling in SAMPLINGS:
        torch.manual_seed(seed)
        new = engine.generate(torch.tensor([ids], device=engine.device), max_new_tokens, sampling)[0]
        reply = engine.decode(new)
        # an empty line would read as a failure to generate: say which token ended it
        out[mode] = reply if reply.strip() else f"(nothing: its first token is {engine.tokenizer.decode(new[:1])})"
    return out


def eval_rows(results):
    """(task, metric, {model: (value, stderr)}) for every task metric of Eval/results.json, in its order."""
    models = results.get("models", {}) if results else {}
    rows = {}
    for model, entry in models.items():
        for task, metrics in entry.get("results", {}).items():
            for metric, v in metrics.items():
                if isinstance(v.get("value"), (int, float)):
                    rows.setdefault((task, metric), {})[model] = (v["value"], v.get("stderr"))
    return [(task, metric, by_model) for (task, metric), by_model in rows.items()]


def eval_chart(path, results):
    """Grouped bars, one bar per model: bits per byte on the left panel (lower is better), accuracies and exact
    matches on the right (higher is better). Returns the file name or None."""
    rows = eval_rows(results)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    panels = [("bits per byte (lower is better)", [r for r in rows if r[1] == "bits_per_byte"]),
              ("accuracy / exact match (higher is better)", [r for r in rows if r[1] != "bits_per_byte"])]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    width = 0.8 / len(models)
    for ax, (title, panel) in zip(axes[0], panels):
        for i, model in enumerate(models):
            values = [by_model.get(model, (0.0, None))[0] for _, _, by_model in panel]
            ax.bar([x + (i - (len(models) - 1) / 2) * width for x in range(len(panel))], values, width, label=model)
        ax.set_xticks(range(len(panel)))
        ax.set_xticklabels([f"{task.removeprefix('llm_train_')}" + ("" if metric in ("bits_per_byte", "acc",
                            "exact_match") else f" {metric}") for task, metric, _ in panel], rotation=30, ha="right")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"lm-eval {results.get('lm_eval_version', '')}: every model on the same tasks")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


SPLIT_NAMES = {"heldout": "held-out problems, trained wordings", "heldout_wordings": "held-out wordings",
               "both": "both held-out splits"}


def get(d, *keys):
    """d[k1][k2]... or None where a level is missing."""
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def percent(x):
    return f"{x:+.1%}" if isinstance(x, (int, float)) else "n/a"


def stage_lessons(m):
    """What each stage taught, on held-out problems: rows (metric, base, sft, grpo) read from the eval files. Greedy
    exact match per held-out split: base and SFT from SFT/eval.json, GRPO from RLHF/eval.json. Sampled exact match,
    the sampled error rate and its relative reduction (95% paired-bootstrap interval), the reward-model score and
    the KL to the SFT policy: SFT vs GRPO from RLHF/eval.json."""
    sft, grpo = m.get("sft") or {}, m.get("grpo") or {}
    rows = []
    for split, key in (("heldout", "exact_match"), ("heldout_wordings", "exact_match_heldout_wordings")):
        rows.append((f"exact match, {SPLIT_NAMES[split]} (greedy)", get(sft, "base", key), get(sft, "sft", key),
                     get(grpo, "grpo", key)))
    rows.append((f"exact match, {SPLIT_NAMES['both']} (greedy)", get(sft, "base", "arithmetic", "both", "exact_match"),
                 get(sft, "sft", "arithmetic", "both", "exact_match"), get(grpo, "grpo", "exact_answer_accuracy")))
    temperature, k = get(grpo, "sampling", "temperature"), get(grpo, "sampling", "samples_per_problem")
    sampled = f"sampled at temperature {temperature}, {k} per problem"
    for split in ("heldout", "heldout_wordings"):
        rows.append((f"exact match, {SPLIT_NAMES[split]} ({sampled})", None, get(grpo, "sft", "sampled", split),
                     get(grpo, "grpo", "sampled", split)))
    rows.append((f"exact match, {SPLIT_NAMES['both']} ({sampled})", None,
                 get(grpo, "sft", "sampled_exact_answer_accuracy"), get(grpo, "grpo", "sampled_exact_answer_accuracy")))
    cut = grpo.get("sampled_error_reduction") or {}
    rows.append((f"error rate, {SPLIT_NAMES['both']} ({sampled})", None, cut.get("error_before"),
                 cut.get("error_after")))
    if cut.get("relative") is not None:
        low, high = (cut.get("ci95") or [None, None])[:2]
        rows.append(("sampled error rate: relative reduction SFT → GRPO (95% paired-bootstrap interval)", None, None,
                     f"{percent(cut['relative'])} ({percent(low)} .. {percent(high)})"))
    rows.append((f"replies ending with {IM_END}", get(sft, "base", "ends_with_im_end"),
                 get(sft, "sft", "ends_with_im_end"), get(grpo, "grpo", "ends_with_im_end")))
    rows.append(("reward-model score (held-out chat prompts)", None, get(grpo, "sft", "reward_model_score"),
                 get(grpo, "grpo", "reward_model_score")))
    scale = get(grpo, "logit_scale")  # what the logit-scale lr trained: how much surer GRPO made the policy
    rows.append(("logits' scale (the final norm's gain relative to SFT; 1 = as sure as SFT)", None, None,
                 None if scale is None else f"{scale:.2f}x"))
    for estimator in ("k1", "k3"):
        kl = get(grpo, f"kl_{estimator}_per_token")
        rows.append((f"KL to the SFT policy (per token, {estimator} estimate)", None, None,
                     None if kl is None else f"{kl:.4f}"))
    return [r for r in rows if any(v is not None for v in r[1:])]


def lessons_note(m):
    """Which problems each column's greedy numbers count, and the SFT policy's greedy numbers on GRPO's problems (the
    paired comparison), or [] when there is nothing to say."""
    sft, grpo = m.get("sft") or {}, m.get("grpo") or {}
    parts = []
    if get(sft, "sft", "arithmetic", "heldout", "n"):
        parts.append(f"base and SFT on SFT/eval.json's {sft['sft']['arithmetic']['heldout']['n']} problems per split")
    if get(grpo, "grpo", "arithmetic", "heldout", "n"):
        text = f"GRPO on RLHF/eval.json's {grpo['grpo']['arithmetic']['heldout']['n']} per split"
        scores = [get(grpo, "sft", "arithmetic", split, "exact_match") for split in ("heldout", "heldout_wordings")]
        if all(v is not None for v in scores):
            text += (f", on which the SFT policy answered {fmt(scores[0])} ({SPLIT_NAMES['heldout']}) and "
                     f"{fmt(scores[1])} ({SPLIT_NAMES['heldout_wordings']})")
        parts.append(text)
    return [f"Greedy exact match: {'; '.join(parts)}. Sampled numbers, the error-rate reduction (resampling the "
            "problems, each problem's SFT and GRPO numbers together) and the KL: RLHF/eval.json.", ""] if parts else []


def ordered_cells(*by_cells):
    """The language x op x digits cells of the given {cell: accuracy} dicts, in LANGS x OPS x DIGITS order (others
    after)."""
    known = [f"{lang} {op} {digits}" for lang in LANGS for op in OPS for digits in DIGITS]
    present = {c for by_cell in by_cells for c in by_cell}
    return [c for c in known if c in present] + sorted(present - set(known))


def cell_table(m):
    """Exact match per language x op x digits cell, both held-out splits pooled: base and SFT (SFT/eval.json), GRPO
    (RLHF/eval.json); each model's lowest cell in bold, and named below. [] when neither file has cells."""
    models = [("base", get(m.get("sft"), "base", "arithmetic", "both", "by_cell")),
              ("SFT", get(m.get("sft"), "sft", "arithmetic", "both", "by_cell")),
              ("GRPO", get(m.get("grpo"), "grpo", "arithmetic", "both", "by_cell"))]
    models = [(name, cells) for name, cells in models if cells]
    if not models:
        return []
    lowest = {name: min(cells.values()) for name, cells in models}
    n = max(get(m.get(key), model, "arithmetic", "both", "n") or 0 for key, model in (("sft", "sft"), ("grpo", "grpo")))
    cells = ordered_cells(*(c for _, c in models))
    lines = ["### Per cell (both held-out splits pooled, greedy)", "",
             f"Exact match per language x operation x digits cell ({n} problems over {len(cells)} cells): "
             "base and SFT from SFT/eval.json, GRPO from RLHF/eval.json. **Bold**: each model's lowest cell.", "",
             "| cell | digits | " + " | ".join(name for name, _ in models) + " |", "|---|---|" + "---|" * len(models)]
    for c in cells:
        values = []
        for name, by_cell in models:
            v = by_cell.get(c)
            values.append(f"**{fmt(v)}**" if v is not None and v == lowest[name] else fmt(v))
        digits = DIGITS_NAMES.get(c.rsplit(" ", 1)[-1], "")
        lines.append(f"| {c} | {digits} | " + " | ".join(values) + " |")
    low = [f"{name} {', '.join(c for c in cells if by_cell.get(c) == lowest[name])} ({fmt(lowest[name])})"
           for name, by_cell in models]
    return lines + ["", "Lowest cell: " + "; ".join(low) + ".", ""]


def examples_list(m):
    """EXAMPLE_PROMPTS with the SFT and GRPO models' greedy answers of this run, each marked right or wrong."""
    answers = m.get("example_answers") or {}
    models = [(name, answers["models"][key]) for key, name in (("sft", "SFT"), ("grpo", "GRPO"))
              if key in answers.get("models", {})]
    if not models:
        return []
    lines = ["### The example prompts", "",
             "The prompts users meet first (README, web UI, inference scripts), all held out from training, answered "
             f"greedily through the chat template by this run's models ({answers.get('max_new_tokens')} new tokens at "
             f"most, {answers.get('dtype')}); right when the number after \"The answer is\" / \"答案是\" is the "
             "exact answer. " + ", ".join(f"{name} {sum(a['right'] for a in rows)}/{len(rows)} right"
                                          for name, rows in models) + ".", ""]
    for i, prompt in enumerate(EXAMPLE_PROMPTS):
        rows = [(name, rows[i]) for name, rows in models if i < len(rows) and rows[i]["prompt"] == prompt]
        if not rows:
            continue
        lines += [f"**{prompt}** (answer {rows[0][1]['answer']})", ""]
        for name, a in rows:
            verdict = ("✓ right" if a["right"] else
                       "✗ wrong (no answer)" if a["said"] is None else f"✗ wrong (said {a['said']})")
            lines.append(f"- {name}: {verdict}: {one_line(a['reply']) or '(blank reply)'}")
        lines.append("")
    return lines


def one_line(text):
    return text.replace("\n", " ⏎ ")


def fmt(x, digits=3):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def collect():
    """Every stage's numbers, read from the files it wrote."""
    timings = REPORT_DIR / "timings"
    metrics = {
        "machine": machine(),
        "timings": {stage: read_json(timings / f"{stage}.json") for stage in STAGES
                    if (timings / f"{stage}.json").is_file()},
        "tokenizer": None,
        "chunks": read_json(CHUNKS_DIR / "manifest.json"),
        "pretrain": read_json(OUTPUT_DIR / "pretrain_summary.json"),
        "sft": read_json(REPO / "SFT" / "eval.json"),
        "reward_model": read_json(REPO / "RLHF" / "reward_eval.json"),
        "grpo": read_json(REPO / "RLHF" / "eval.json"),
        "eval": read_json(REPO / "Eval" / "results.json"),
    }
    # tokenizer/ retrained after the models: its report describes another tokenizer than theirs
    metrics["tokenizer"], mismatch = tokenizer_report(TOKENIZER_DIR, OUTPUT_DIR)
    if mismatch:
        metrics["tokenizer_mismatch"] = mismatch
    return metrics


def make_plots(results):
    """The PNG plots of the stages' history.jsonl files and of the lm-eval results: {name: file name or None}."""
    def curves(path, keys):  # [(label, steps, values, axis)]
        rows = read_jsonl(path)
        return [(label, *series(rows, key), axis) for key, label, axis in keys]

    return {
        "pretrain_loss": plot(REPORT_DIR / "pretrain_loss.png", curves(OUTPUT_DIR / "history.jsonl", [
            ("loss", "train loss", 0), ("val_loss", "val loss", 0)]), "Pretraining loss"),
        "sft_loss": plot(REPORT_DIR / "sft_loss.png", curves(SFT_OUTPUT_DIR / "history.jsonl", [
            ("loss", "train loss", 0), ("eval_loss", "eval loss", 0)]), "SFT loss (assistant tokens)"),
        "grpo": plot(REPORT_DIR / "grpo.png", curves(GRPO_OUTPUT_DIR / "history.jsonl", [
            ("reward", "reward", 0), ("heldout/exact_answer", "held-out exact answer", 0),
            ("heldout/sampled_exact_answer", "held-out, sampled", 0), ("kl", "KL", 1)]), "GRPO reward and KL"),
        "eval": eval_chart(REPORT_DIR / "eval.png", results),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-new-tokens", type=positive_int, default=48, help="length of each sample generation")
    ap.add_argument("--max-answer-tokens", type=positive_int,
                    help="length of the greedy answers to the example prompts (default: the reply length of "
                         "RLHF/eval.json's evaluation, else 64)")
    ap.add_argument("--no-samples", action="store_true",
                    help="skip loading models for sample generations and the example prompts' answers")
    args = ap.parse_args()
    REPORT_DIR.mkdir(exist_ok=True)
    metrics = collect()
    metrics["plots"] = make_plots(metrics["eval"])
    answer_tokens = args.max_answer_tokens or get(metrics["grpo"], "max_new_tokens") or 64
    metrics["samples"], metrics["example_answers"] = ({}, {}) if args.no_samples else generate_samples(
        args.max_new_tokens, answer_tokens)
    atomic_write_json(REPORT_DIR / "metrics.json", metrics)
    atomic_write_bytes(REPORT_DIR / "report.md", render(metrics).encode("utf-8"))
    print(f"wrote {REPORT_DIR / 'report.md'} and metrics.json")


def render(m):
    """report.md's text: one section after the other."""
    sections = (header, timings_section, lessons_section, tokenizer_section, pretraining_sections, sft_section,
                reward_model_section, grpo_section, eval_section, samples_section)
    return "\n".join(line for section in sections for line in section(m)) + "\n"


def header(m):
    mach = m["machine"]
    return ["# llm_train report card", "",
            "Every number below was read from the files the stages wrote (see report/metrics.json).", "",
            f"Machine: {mach['cpu']}, {mach['cpu_count']} cores"
            + (f", GPUs: {', '.join(mach['gpus'])}" if mach.get("gpus") else ", no GPU")
            + f"; torch {mach['torch']}, Python {mach['python']}.", ""]


def timings_section(m):
    if not m["timings"]:
        return []
    return (["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
            + [f"| {k} | {fmt(v.get('seconds'), 1)} |" for k, v in m["timings"].items() if v]
            + [f"| total | {fmt(sum(v.get('seconds', 0) for v in m['timings'].values() if v), 1)} |", ""])


def lessons_section(m):
    lessons = stage_lessons(m)
    if not lessons:
        return []
    return (["## What each stage taught (held-out problems)", "", "| metric | base | SFT | GRPO |", "|---|---|---|---|"]
            + [f"| {name.replace('|', chr(92) + '|')} | {fmt(b)} | {fmt(s)} | {fmt(g)} |" for name, b, s, g in lessons]
            + [""] + lessons_note(m) + cell_table(m) + examples_list(m))


def tokenizer_section(m):
    tok = m["tokenizer"]
    if m.get("tokenizer_mismatch"):
        return ["## Tokenizer", "", m["tokenizer_mismatch"] + ".", ""]
    if not tok:
        return ["## Tokenizer", "", "not run", ""]
    bpt = tok.get("bytes_per_token_heldout", {})
    return ["## Tokenizer", "", f"Vocabulary {tok['vocab_size']:,}, trained on {tok['train_bytes'] / 1e6:.1f} MB in "
            f"{fmt(tok['train_seconds'], 1)} s. Held-out bytes per token: "
            + ", ".join(f"{k} {fmt(v, 2)}" for k, v in bpt.items()) + ".", ""]


def pretraining_sections(m):
    lines, ch, pre = [], m["chunks"], m["pretrain"]
    if ch:
        tr, va = ch["splits"]["train"], ch["splits"]["val"]
        lines += ["## Pretraining data", "", f"{tr['tokens']:,} train tokens / {va['tokens']:,} validation tokens "
                  f"in rows of {ch['row_length']} tokens.", ""]
    lines += ["## Pretraining", ""]
    if pre:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {fmt(v)} |" for k, v in pre.items() if not isinstance(v, (dict, list))] + [""]
    else:
        lines += ["not run", ""]
    return lines + image(m, "pretrain_loss", "pretraining loss")


def image(m, plot_name, alt):
    return [f"![{alt}]({m['plots'][plot_name]})", ""] if m["plots"].get(plot_name) else []


def sft_section(m):
    return ["## Supervised fine-tuning (QLoRA)", ""] + table_base_vs(m["sft"], "base", "sft") + image(m, "sft_loss",
                                                                                                      "SFT loss")


def reward_model_section(m):
    rm = m["reward_model"]
    if not rm:
        return ["## Reward model", "", "not run", ""]
    return ["## Reward model", "", "| metric | value |", "|---|---|"] + [
        f"| {k} | {fmt(v)} |" for k, v in flatten(rm).items()] + [""]


def grpo_section(m):
    return ["## GRPO", ""] + table_base_vs(m["grpo"], "sft", "grpo") + image(m, "grpo", "GRPO reward and KL")


def eval_section(m):
    return (["## Evaluation with lm-evaluation-harness (every model, the same tasks)", ""] + eval_table(m["eval"])
            + image(m, "eval", "lm-eval results"))


def samples_section(m):
    if not m["samples"]:
        return []
    lines = ["## Samples (same prompts; greedy, and sampled at temperature 0.8 with a fixed seed)", ""]
    for prompt in PROMPTS:
        lines += [f"**{prompt}**", ""]
        for stage, outs in m["samples"].items():
            lines += [f"- {stage}, {mode}: {out.replace(chr(10), ' ⏎ ')}" for mode, out in outs.get(prompt, {}).items()]
        lines += [""]
    return lines


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def eval_table(results):
    """Rows task | metric | one column per model, value ± stderr, from Eval/results.json."""
    rows = eval_rows(results)
    if not rows:
        return ["not run", ""]
    models = list(results["models"])
    limit = results.get("settings", {}).get("limit")
    out = [f"lm-eval {results.get('lm_eval_version')}, {'the first ' + str(limit) if limit else 'all'} documents of "
           f"each task (Eval/results.json, per-document records in Eval/samples/). Bits per byte: lower is better; "
           f"generation tasks ran through the chat template.", "",
           "| task | metric | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for task, metric, by_model in rows:
        cells = []
        for model in models:
            value, stderr = by_model.get(model, (None, None))
            cells.append(fmt(value) + (f" ± {fmt(stderr)}" if isinstance(stderr, (int, float)) and stderr else ""))
        out.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return out + [""]


def table_base_vs(d, before, after):
    """Rows metric | before | after for a {before: {...}, after: {...}, ...} eval file."""
    if not d:
        return ["not run", ""]
    if isinstance(d.get(before), dict) and isinstance(d.get(after), dict):
        keys = [k for k in d[after] if not isinstance(d[after][k], (dict, list))]
        rows = [f"| metric | {before} | {after} |", "|---|---|---|"]
        rows += [f"| {k} | {fmt(d[before].get(k))} | {fmt(d[after][k])} |" for k in keys]
        rest = {k: v for k, v in d.items() if k not in (before, after)}
        rows += [""] + [f"- {k}: {fmt(v)}" for k, v in flatten(rest).items()]
        return rows + [""]
    return ["| metric | value |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in flatten(d).items()] + [""]


if __name__ == "__main__":
    run_main(main)
