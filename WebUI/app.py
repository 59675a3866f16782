"""A web UI for the trained models: chat with them, compare the stages on one prompt, look at the training curves.

Reads:  output/ (the pretrained base), SFT/sft_output/ (the SFT policy: merged/ or base + LoRA adapter, checked to
        belong to output/ as SFT/inference.py checks it), RLHF/grpo_output/ (the GRPO policy, checked against the SFT
        policy and reward model it was built from), RLHF/reward_model/ (scores the Compare answers), the stages'
        history.jsonl files, tokenizer/report.json and report/metrics.json (the report card). Writes nothing.

    python WebUI/app.py                       # http://127.0.0.1:7860 (or: make chat)
    python WebUI/app.py --port 8080 --host 0.0.0.0
    python WebUI/app.py --share               # a public gradio.live link; off unless asked for

Tabs:
- Chat: a conversation with the SFT or the GRPO model through the chat template, streamed token by token, with
  temperature / top-k / top-p / max new tokens and a stop button. When the conversation outgrows the model's context,
  the oldest messages are left out and a note under the chat says so.
- Complete: plain text continuation by the pretrained base model.
- Compare: one prompt answered by base, SFT and GRPO side by side (all three through the chat template), each answer
  scored by the reward model, and marked right or wrong when the prompt is one of the arithmetic word problems.
- Training: the loss curves from the stages' history.jsonl, the report card's numbers and the tokenizer's
  bytes per token, as plots (refresh after a stage finishes).

The models are loaded once at start-up and shared by every request; a stage whose output is missing, or does not
belong with the others (e.g. an adapter of another base), is left out with the command that makes it, shown in the
page. Generation runs on the GPU when there is one. Requests go through gradio's queue, --concurrency at a time.
Everything is served locally: no analytics, no fonts or scripts from other hosts. The same functions are an API:

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860")
    history, _, note = client.predict("Hello!", [], "SFT", 0.7, 50, 0.95, 64, api_name="/chat")
"""
import argparse
import json
import os
import socket
import threading
import time
from pathlib import Path

# Before gradio is imported: no usage statistics or version checks, and nothing fetched from the hub.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from llm_train import runtime
from llm_train.arithmetic import arithmetic_answer, arithmetic_tasks, extract_answer
from llm_train.cli import positive_int
from llm_train.errors import UserError, run_main
from llm_train.lineage import check_lineage
from llm_train.paths import GRPO_OUTPUT_DIR, OUTPUT_DIR, REPO, REWARD_MODEL_DIR, SFT_OUTPUT_DIR, TOKENIZER_DIR
from llm_train.rl import find_policy, load_policy, load_reward_model, policy_parents, reward_model_scores
from llm_train.runtime import compute_dtype
from llm_train.tokenizer import EOT, IM_END, load_tokenizer, render_messages
from llm_train.trainer_runs import rerun_command

CHAT_MODELS = ("SFT", "GRPO")
SFT_CMD = "python SFT/qlora_fine_tune_trl.py --merge"


# ---------------------------------------------------------------------------------------------------------------
# Loading: every stage output once, with the same checks and messages as the stage scripts.
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines on the network too")
    p.add_argument("--port", type=positive_int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--concurrency", type=positive_int, default=4,
                   help="requests that generate at the same time; more wait in the queue")
    p.add_argument("--base-dir", type=Path, default=OUTPUT_DIR, help="the pretrained base model")
    p.add_argument("--sft-dir", type=Path, default=SFT_OUTPUT_DIR, help="the SFT adapter (and merged/)")
    p.add_argument("--grpo-dir", type=Path, default=GRPO_OUTPUT_DIR, help="the GRPO policy")
    p.add_argument("--reward-model", type=Path, default=REWARD_MODEL_DIR)
    p.add_argument("--tokenizer-dir", type=Path, default=TOKENIZER_DIR, help="for its report.json")
    p.add_argument("--report-dir", type=Path, default=REPO / "report", help="for the report card's metrics.json")
    return p.parse_args(argv)


def load_base(args, dtype):
    if not (args.base_dir / "config.json").is_file():
        raise UserError(f"no base model in {args.base_dir}: run `python PreTrain/model.py` (or `make all`)")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(args.base_dir), dtype=dtype, use_safetensors=True)
    return model, load_tokenizer(args.base_dir)


def load_sft(args, dtype):
    _, path = find_policy(args.sft_dir, args.base_dir)  # merged/ if there, else base + adapter
    rerun = rerun_command("SFT/qlora_fine_tune_trl.py --merge",
                                      model_dir=(args.base_dir, OUTPUT_DIR),
                                      output_dir=(args.sft_dir, SFT_OUTPUT_DIR))
    check_lineage(path, rerun, base=args.base_dir)
    return load_policy(args.sft_dir, args.base_dir, dtype)


def load_grpo(args, dtype):
    if not (args.grpo_dir / "config.json").is_file():
        raise UserError(f"no GRPO model in {args.grpo_dir}: train it with `python RLHF/grpo_trl.py`")
    try:  # the parents it must still belong to; without an SFT policy there is nothing to check against
        parents = policy_parents(args.sft_dir, args.base_dir)
    except UserError:
        parents = {}
    if (args.reward_model / "config.json").is_file():
        parents["reward_model"] = args.reward_model
    rerun = rerun_command("RLHF/grpo_trl.py", sft_dir=(args.sft_dir, SFT_OUTPUT_DIR),
                                      base_dir=(args.base_dir, OUTPUT_DIR),
                                      out_dir=(args.grpo_dir.parent, GRPO_OUTPUT_DIR.parent))
    check_lineage(args.grpo_dir, rerun, **parents)
    return load_policy(args.grpo_dir, args.base_dir, dtype)  # a full model dir: loaded as it is


def load_reward(args):
    if not (args.reward_model / "config.json").is_file():
        raise UserError(f"no reward model in {args.reward_model}: run `python RLHF/reward_model.py`")
    rebuild = rerun_command("RLHF/reward_model.py", sft_dir=(args.sft_dir, SFT_OUTPUT_DIR),
                                        out_dir=(args.reward_model.parent, REWARD_MODEL_DIR.parent))
    try:
        parents = policy_parents(args.sft_dir, args.base_dir)
    except UserError:
        parents = {}
    check_lineage(args.reward_model, rebuild, **parents)
    return load_reward_model(args.reward_model, runtime.device())


def load_all(args):
    """({name: (model, tokenizer)} of the stages that loaded, {name: why not} of the others)."""
    dev = runtime.device()
    dtype = compute_dtype(allow_fp16=True)
    models, problems = {}, {}
    for name, load in (("base", lambda: load_base(args, dtype)), ("SFT", lambda: load_sft(args, dtype)),
                       ("GRPO", lambda: load_grpo(args, dtype)), ("reward model", lambda: load_reward(args))):
        try:
            model, tok = load()
        except UserError as e:
            problems[name] = str(e)
            continue
        models[name] = (model.to(dev).eval(), tok)
    return models, problems


# ---------------------------------------------------------------------------------------------------------------
# Generation, streamed: model.generate runs in a thread and TextIteratorStreamer hands the text to the request.
def sampling_kwargs(temperature, top_k, top_p):
    if temperature <= 0:
        return dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    return dict(do_sample=True, temperature=float(temperature), top_k=int(top_k) or None, top_p=float(top_p))


def stream_generate(model, tok, ids, max_new_tokens, temperature, top_k, top_p):
    """Yield (text so far, tokens generated so far) while the model continues `ids` (a list of token ids that fits
    its context with max_new_tokens more). Stops at <|im_end|> or <|endoftext|>; closing the generator (the stop
    button, a client gone) stops the generation thread too."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    class Stop(StoppingCriteria):  # called once per generated token: counts them and ends on request
        def __init__(self):
            self.steps, self.event = 0, threading.Event()

        def __call__(self, input_ids, scores, **kwargs):
            self.steps += 1
            return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)

    stop = Stop()
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    input_ids = torch.tensor([ids], device=model.device)
    stops = [i for i in (tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(EOT))
             if i is not None and i != tok.unk_token_id]
    errors = []

    def run():
        try:
            with torch.no_grad():
                model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                               max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=tok.pad_token_id,
                               streamer=streamer, stopping_criteria=StoppingCriteriaList([stop]),
                               **sampling_kwargs(temperature, top_k, top_p))
        except Exception as e:  # shown to the user; the streamer must still end or the request would hang
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True, name="generate")
    thread.start()
    text = ""
    try:
        for piece in streamer:  # a piece per token: "" until a word is complete (see TextStreamer)
            if piece:
                text += piece
                yield text, stop.steps
    finally:
        stop.event.set()
        thread.join()
    if errors:
        raise errors[0]
    yield text, stop.steps


def reply_budget(context, max_new_tokens):
    """How many tokens a reply may have: at most half the context, so that the prompt keeps the other half."""
    return max(1, min(int(max_new_tokens), context // 2))


def chat_ids(tok, messages, room):
    """(chat-template ids of the conversation, messages dropped): the oldest messages are dropped until it fits in
    `room` tokens (the rest still starts with a user message); a last message alone too long keeps its end."""
    dropped = 0
    while True:
        ids = tok(render_messages(messages[dropped:], add_generation_prompt=True),
                  add_special_tokens=False).input_ids
        if len(ids) <= room or dropped == len(messages) - 1:
            return ids, dropped
        dropped += 1
        while messages[dropped]["role"] != "user":
            dropped += 1


def text_of(content):
    """The text of a gradio chat message's content (a string, or a list of {"type": "text", "text"} parts)."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


# ---------------------------------------------------------------------------------------------------------------
# Arithmetic prompts (arithmetic_answer: typed problems in the task family's wording are checked too).
def verdict(answer, reply):
    """Right / wrong mark of a reply to an arithmetic problem ('' for other prompts)."""
    if answer is None:
        return ""
    said = extract_answer(reply)
    if said == answer:
        return f"✓ right ({answer})"
    if said is None:
        return f"✗ no final answer (expected \"The answer is {answer}.\")"
    return f"✗ wrong: {said} (the answer is {answer})"


# ---------------------------------------------------------------------------------------------------------------
# Training curves and the report card, as matplotlib figures.
def read_jsonl(path):
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def series(rows, key):
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


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
        rows = read_jsonl(path)
        if not rows:
            missing_axis(ax, title, f"no {path.name} in {path.parent}:\nrun `{cmd}`")
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
    m = read_json(args.report_dir / "metrics.json")
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
    """Held-out bytes per token of each language (tokenizer/report.json); None if there is none."""
    r = read_json(args.tokenizer_dir / "report.json")
    bpt = (r or {}).get("bytes_per_token_heldout")
    if not bpt:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3), layout="constrained")
    ax = fig.subplots()
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
            notes.append(f"- `{path}` is missing: run `{cmd}` (`make all` runs every stage)")
    status = "\n".join(notes) or "All stage outputs found. Press **Refresh** after a stage finishes."
    return status, loss_figure(args), report_figure(args), tokenizer_figure(args)


# ---------------------------------------------------------------------------------------------------------------
# The app.
def build_app(args, models, problems):
    import gradio as gr

    device = next(iter(models.values()))[0].device if models else "nothing loaded"
    chat_models = [n for n in CHAT_MODELS if n in models]

    def unavailable(name):
        return f"**{name}** is not available: {problems.get(name, 'not loaded')}"

    def stats(n, seconds):
        return f"{n} tokens in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} tokens/s)"

    def chat(message, history, model_name, temperature, top_k, top_p, max_new_tokens):
        """One chat turn: yields (conversation, input box, note) as the reply streams in."""
        messages = [{"role": m["role"], "content": text_of(m["content"])} for m in history or []]

        def shown():  # content as text parts: gradio dedents a plain string (inspect.cleandoc), changing the text
            return [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]

        if model_name not in models:
            yield shown(), message, unavailable(model_name or "a chat model")
            return
        if not message.strip():
            yield shown(), "", "Type a message first."
            return
        model, tok = models[model_name]
        context = model.config.n_positions
        max_new = reply_budget(context, max_new_tokens)
        messages.append({"role": "user", "content": message})
        ids, dropped = chat_ids(tok, messages, context - max_new)
        notes = []
        if dropped:
            notes.append(f"The {dropped} oldest messages were left out: {model_name} sees at most {context} tokens, "
                         f"{max_new} of them for the reply.")
        if len(ids) > context - max_new:
            ids = ids[-(context - max_new):]
            notes.append(f"Your message was cut to its last {context - max_new} tokens to fit the context.")
        messages.append({"role": "assistant", "content": ""})
        start = time.perf_counter()
        for text, n in stream_generate(model, tok, ids, max_new, temperature, top_k, top_p):
            messages[-1]["content"] = text
            yield shown(), "", " ".join(notes + [f"{model_name} is writing… ({n} tokens)"])
        yield shown(), "", " ".join(notes + [f"{model_name}: {stats(n, time.perf_counter() - start)}"])

    def complete(prompt, temperature, top_k, top_p, max_new_tokens):
        """Plain continuation by the base model: yields (prompt + continuation, note) as it streams."""
        if "base" not in models:
            yield prompt, unavailable("base")
            return
        model, tok = models["base"]
        context = model.config.n_positions
        whole = tok(prompt).input_ids or [tok.eos_token_id]  # an empty prompt starts a new document
        max_new = reply_budget(context, max_new_tokens)
        ids = whole[-(context - max_new):]
        cut = f"The prompt was cut to its last {len(ids)} tokens (context {context}). " if len(ids) < len(whole) else ""
        start = time.perf_counter()
        for text, n in stream_generate(model, tok, ids, max_new, temperature, top_k, top_p):
            yield prompt + text, cut + f"writing… ({n} tokens)"
        yield prompt + text, cut + stats(n, time.perf_counter() - start)

    def compare(prompt, temperature, top_k, top_p, max_new_tokens):
        """Base, SFT and GRPO answer the same prompt (in turn, streamed); then the reward model scores each answer
        and arithmetic answers are checked. Yields 6 values: the three answers, then the three verdicts."""
        names = ("base", "SFT", "GRPO")
        answers = {n: "" for n in names}
        notes = {n: "" if n in models else unavailable(n) for n in names}

        def out():
            return [answers[n] for n in names] + [notes[n] for n in names]

        if not prompt.strip():
            yield ["", "", ""] + ["Type a prompt first."] * 3
            return
        messages = [{"role": "user", "content": prompt}]
        for name in names:
            if name not in models:
                continue
            model, tok = models[name]
            max_new = reply_budget(model.config.n_positions, max_new_tokens)
            ids = tok(render_messages(messages, add_generation_prompt=True),
                      add_special_tokens=False).input_ids[-(model.config.n_positions - max_new):]
            notes[name] = "generating…"
            start = time.perf_counter()
            for text, n in stream_generate(model, tok, ids, max_new, temperature, top_k, top_p):
                answers[name] = text
                yield out()
            notes[name] = stats(n, time.perf_counter() - start) if text.strip() else \
                f"(no text: {n} tokens, the model ended its turn or wrote only spaces)"
        done = [n for n in names if n in models]
        scores = {}
        if "reward model" in models and done:
            rm, rm_tok = models["reward model"]
            scores = dict(zip(done, reward_model_scores(rm, rm_tok, [messages] * len(done),
                                                                    [answers[n] for n in done])))
        answer = arithmetic_answer(prompt)
        for n in done:
            score = f"reward-model score **{scores[n]:+.3f}**" if n in scores else \
                f"no reward-model score ({problems.get('reward model', '')})"
            notes[n] = " · ".join(x for x in (score, verdict(answer, answers[n]), notes[n]) if x)
        yield out()

    def sampling(tab, max_tokens):
        with gr.Accordion("Sampling", open=False, elem_id=f"{tab}-sampling"):
            with gr.Row():
                temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="temperature (0 = greedy)",
                                        elem_id=f"{tab}-temperature")
                top_k = gr.Slider(0, 200, value=50, step=1, label="top-k (0 = off)", elem_id=f"{tab}-top-k")
                top_p = gr.Slider(0.05, 1, value=0.95, step=0.05, label="top-p", elem_id=f"{tab}-top-p")
                max_new = gr.Slider(1, 1024, value=max_tokens, step=1, elem_id=f"{tab}-max-new",
                                    label="max new tokens (at most half the model's context)")
        return [temperature, top_k, top_p, max_new]

    status = "\n".join([f"- **{n}**: loaded" for n in models] + [f"- **{n}**: {why}" for n, why in problems.items()])
    examples = [t["prompt"] for t in arithmetic_tasks(2, "heldout", seed=7)] + ["Hello, how are you?", "你好"]

    with gr.Blocks(title="llm_train", analytics_enabled=False) as demo:
        gr.Markdown(f"# llm_train: the models of each stage\nRunning on {device}.")
        with gr.Accordion("Stage outputs", open=bool(problems)):
            gr.Markdown(status, elem_id="stage-status")
        with gr.Tab("Chat", id="chat"):
            model = gr.Dropdown(list(CHAT_MODELS), value=(chat_models or CHAT_MODELS)[-1], label="model",
                                elem_id="chat-model")
            if len(chat_models) < len(CHAT_MODELS):
                gr.Markdown("\n".join(unavailable(n) for n in CHAT_MODELS if n not in models))
            chatbot = gr.Chatbot(elem_id="chatbot", height=380, label="conversation", buttons=["copy", "copy_all"])
            note = gr.Markdown(elem_id="chat-note")
            with gr.Row():
                msg = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=6,
                                 elem_id="chat-input")
                send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                stop = gr.Button("Stop", variant="stop", scale=1, elem_id="chat-stop")
                clear = gr.Button("Clear", scale=1)
            gr.Examples(examples, msg)
            chat_inputs = [msg, chatbot, model, *sampling("chat", 128)]
            chat_events = [msg.submit(chat, chat_inputs, [chatbot, msg, note], api_name="chat"),
                           send.click(chat, chat_inputs, [chatbot, msg, note], api_visibility="private")]
            stop.click(None, cancels=chat_events)
            clear.click(lambda: ([], ""), None, [chatbot, note], api_visibility="private")
        with gr.Tab("Complete", id="complete"):
            if "base" not in models:
                gr.Markdown(unavailable("base"))
            prompt = gr.Textbox("Once upon a time", lines=3, label="text to continue", elem_id="complete-input")
            with gr.Row():
                go = gr.Button("Continue", variant="primary", elem_id="complete-go")
                stop = gr.Button("Stop", variant="stop")
            completion = gr.Textbox(lines=8, label="prompt + continuation (base model)", elem_id="complete-output")
            complete_note = gr.Markdown()
            event = go.click(complete, [prompt, *sampling("complete", 100)], [completion, complete_note],
                             api_name="complete")
            stop.click(None, cancels=[event])
        with gr.Tab("Compare", id="compare"):
            gr.Markdown("One prompt, answered by each stage through the chat template. The reward model scores "
                        "each answer; arithmetic word problems are checked against their exact answer.")
            cmp_prompt = gr.Textbox(examples[0], label="prompt", elem_id="compare-input")
            with gr.Row():
                cmp_go = gr.Button("Compare", variant="primary", elem_id="compare-go")
                cmp_stop = gr.Button("Stop", variant="stop")
            gr.Examples(examples, cmp_prompt)
            boxes, verdicts = [], []
            with gr.Row():
                for name, where in (("base", args.base_dir), ("SFT", args.sft_dir), ("GRPO", args.grpo_dir)):
                    with gr.Column(min_width=200):
                        boxes.append(gr.Textbox(lines=6, max_lines=6, label=f"{name} ({where.name}/)",
                                                elem_id=f"answer-{name}"))
                        verdicts.append(gr.Markdown(elem_id=f"verdict-{name}"))
            event = cmp_go.click(compare, [cmp_prompt, *sampling("compare", 64)], boxes + verdicts, api_name="compare")
            cmp_stop.click(None, cancels=[event])
        with gr.Tab("Training", id="training") as training_tab:
            refresh = gr.Button("Refresh")
            train_status = gr.Markdown(elem_id="training-status")
            loss_plot = gr.Plot(label="loss curves", elem_id="loss-plot")
            report_plot = gr.Plot(label="report card", elem_id="report-plot")
            tok_plot = gr.Plot(label="tokenizer", elem_id="tokenizer-plot")
            def view():
                return training_view(args)

            refresh.click(view, None, [train_status, loss_plot, report_plot, tok_plot], api_name="training")
            training_tab.select(view, None, [train_status, loss_plot, report_plot, tok_plot], api_visibility="private")
    return demo


def main(argv=None):
    args = parse_args(argv)
    with socket.socket() as s:  # before the slow part: a port in use fails at once
        try:
            s.bind((args.host, args.port))
        except OSError as e:
            raise UserError(f"cannot serve on {args.host}:{args.port} ({e.strerror}): pass another --port") from None
    import gradio as gr

    print("loading the stage outputs...", flush=True)
    models, problems = load_all(args)
    for name, why in problems.items():
        print(f"{name}: not available: {why}", flush=True)
    demo = build_app(args, models, problems)
    demo.queue(default_concurrency_limit=args.concurrency)
    # Default theme: its fonts are served by the app itself, like every other file of the page.
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, theme=gr.themes.Default(),
                footer_links=["api", "settings"])


if __name__ == "__main__":
    run_main(main)
