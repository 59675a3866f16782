"""What the web UI's (WebUI/app.py) Training tab shows: the loss curves (the stages' history.jsonl), the report
card's numbers (report/metrics.json) and the tokenizer's bytes per token (tokenizer/report.json) as matplotlib
figures, and which stage outputs are missing; and server paths made fit to show in the page (repo-relative, or the
last parts)."""
import re
from pathlib import Path

from llm_train.paths import REPO
from llm_train.stage_files import read_json, read_jsonl, series, tokenizer_report

SFT_CMD = "python SFT/qlora_fine_tune_trl.py --merge"


def shown(path):
    """A path as the page shows it: relative to the repo when inside it, else "…/" and its last part: the page never
    shows where the server keeps its files."""
    path = Path(path).absolute()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else f"…/{path.name}"


ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~…-])/(?:[\w.~+-]+/)*[\w.~+-]+/?")


def public(text, *paths):
    """text with the given paths, the repo's own and any other absolute path as shown() shows them (for messages
    that name server directories, e.g. a stage's UserError)."""
    for path in sorted({str(Path(p).absolute()) for p in paths}, key=len, reverse=True):
        text = text.replace(path, shown(path))
    text = text.replace(f"{REPO}/", "")
    return ABSOLUTE_PATH.sub(lambda m: shown(m.group(0)), text)


def missing_axis(ax, title, what):
    ax.set_title(title)
    ax.text(0.5, 0.5, what, ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)
    ax.set_axis_off()


def loss_figure(args):
    """Pretraining loss, SFT loss and GRPO reward / KL per step, from the stages' history.jsonl."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.4), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = [("Pretraining loss", args.base_dir / "history.jsonl", [("loss", "train loss"), ("val_loss", "val loss")],
               "python PreTrain/model.py"),
              ("SFT loss (assistant tokens)", args.sft_dir / "history.jsonl",
               [("loss", "train loss"), ("eval_loss", "eval loss")], SFT_CMD),
              ("GRPO reward", args.grpo_dir / "history.jsonl", [("reward", "reward")], "python RLHF/grpo_trl.py")]
    for ax, (title, path, keys, cmd) in zip(axes, panels):
        rows = read_jsonl(path, lenient=True)
        if not rows:
            missing_axis(ax, title, f"no {path.name} in {shown(path.parent)}:\nrun `{cmd}`")
            continue
        for key, label in keys:
            x, y = series(rows, key)
            if x:
                ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=label)
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        if title.startswith("GRPO"):
            x, y = series(rows, "kl")
            if x:
                kl = ax.twinx()
                kl.plot(x, y, color="tab:red", label="KL to SFT")
                kl.set_ylabel("KL", color="tab:red")
        ax.legend(fontsize=8)
    return fig


def report_figure(args):
    """The report card's numbers (report/metrics.json): what SFT, the reward model and GRPO changed, and the stage
    wall times. None if there is no report card yet."""
    m = read_json(args.report_dir / "metrics.json", lenient=True)
    if not m:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6), layout="constrained")
    axes = fig.subplots(1, 4)

    def bars(ax, title, groups, labels):  # groups: {metric: [value per label]}
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            values = [v[i] if v[i] is not None else 0 for v in groups.values()]
            pos = [j + i * width for j in range(len(groups))]
            ax.bar(pos, values, width, label=label)
            for x, v in zip(pos, values):
                ax.annotate(f"{v:.2f}", (x, v), ha="center", va="bottom" if v >= 0 else "top", fontsize=7)
        ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(groups))], list(groups), fontsize=8)
        ax.set_title(title)
        ax.axhline(0, color="black", lw=0.5)
        ax.legend(fontsize=8)

    def get(d, *keys):
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return d

    sft = m.get("sft") or {}
    if sft:
        loss = [get(sft, k, "val_loss_assistant_tokens") for k in ("base", "sft")]
        bars(axes[0], "SFT: val loss " + " → ".join(f"{x:.2f}" for x in loss if x is not None), {
            "exact match": [get(sft, "base", "exact_match"), get(sft, "sft", "exact_match")],
            "ends turn": [get(sft, "base", "ends_with_im_end"), get(sft, "sft", "ends_with_im_end")]},
            ["base", "SFT"])
    else:
        missing_axis(axes[0], "SFT", "no SFT eval in the report")
    by_kind = get(m, "reward_model", "heldout", "accuracy_by_kind") or {}
    if by_kind:
        axes[1].barh(list(by_kind), list(by_kind.values()), color="tab:green")
        accuracy = get(m, "reward_model", "heldout", "accuracy")
        axes[1].set(title=f"reward model: pair accuracy {accuracy:.2f}", xlim=(0, 1))
        axes[1].tick_params(labelsize=8)
    else:
        missing_axis(axes[1], "reward model", "no reward-model eval in the report")
    grpo = m.get("grpo") or {}
    if grpo:
        kl = grpo.get("kl_k1_per_token")
        bars(axes[2], "GRPO" + (f": KL to SFT {kl:.2f}/token" if kl is not None else ""), {
            "reward-model score": [get(grpo, "sft", "reward_model_score"), get(grpo, "grpo", "reward_model_score")],
            "exact answers": [get(grpo, "sft", "exact_answer_accuracy"), get(grpo, "grpo", "exact_answer_accuracy")]},
            ["SFT", "GRPO"])
    else:
        missing_axis(axes[2], "GRPO", "no GRPO eval in the report")
    timings = {k: v["seconds"] for k, v in (m.get("timings") or {}).items() if v}
    if timings:
        axes[3].barh(list(timings), list(timings.values()), color="tab:gray")
        axes[3].set(title="wall time per stage (s)")
        axes[3].tick_params(labelsize=8)
    else:
        missing_axis(axes[3], "wall time", "no stage timings (made by `make all`)")
    return fig


def tokenizer_figure(args):
    """Held-out bytes per token of each language (tokenizer/report.json), if it is the models' tokenizer (else a
    note saying it is not); None if there is no report."""
    from matplotlib.figure import Figure

    r, mismatch = tokenizer_report(args.tokenizer_dir, args.base_dir)
    fig = Figure(figsize=(5, 3), layout="constrained")
    ax = fig.subplots()
    if mismatch:
        missing_axis(ax, "tokenizer", public(mismatch, args.tokenizer_dir, args.base_dir))
        return fig
    bpt = (r or {}).get("bytes_per_token_heldout")
    if not bpt:
        return None
    bars = ax.bar(list(bpt), list(bpt.values()), color="tab:purple")
    ax.bar_label(bars, fmt="%.2f")
    ax.set(title=f"tokenizer ({r.get('vocab_size')} tokens): held-out bytes per token", ylabel="bytes / token")
    return fig


def training_view(args):
    """(status markdown, loss figure, report card figure, tokenizer figure)."""
    notes = []
    for path, cmd in ((args.base_dir / "history.jsonl", "python PreTrain/model.py"),
                      (args.sft_dir / "history.jsonl", SFT_CMD),
                      (args.grpo_dir / "history.jsonl", "python RLHF/grpo_trl.py"),
                      (args.report_dir / "metrics.json", "python report/build_report.py"),
                      (args.tokenizer_dir / "report.json", "python PreTrain/train_byte_level_bpe_tokenizer.py")):
        if not path.is_file():
            notes.append(f"- `{shown(path)}` is missing: run `{cmd}` (`make all` runs every stage)")
    mismatch = tokenizer_report(args.tokenizer_dir, args.base_dir)[1]
    if mismatch:
        notes.append(f"- {public(mismatch, args.tokenizer_dir, args.base_dir)}")
    status = "\n".join(notes) or "All stage outputs found. Press **Refresh** after a stage finishes."
    return status, loss_figure(args), report_figure(args), tokenizer_figure(args)
