"""A web UI for the trained models: chat with them, compare the stages on one prompt, look at the training curves.

Reads:  output/ (the pretrained base), SFT/sft_output/ (the SFT policy: merged/ or base + LoRA adapter, checked to
        belong to output/ as SFT/inference.py checks it), RLHF/grpo_output/ (the GRPO policy, checked against the SFT
        policy and reward model it was built from), RLHF/reward_model/ (scores the Compare answers), the stages'
        history.jsonl files, tokenizer/report.json and report/metrics.json (the report card), and serves
        WebUI/fonts/NotoSansCJKsc-Regular-subset.woff2 (the page's CJK font). Writes nothing.

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
page (server paths shown repo-relative). Generation (llm_train.engine) runs on the GPU when there is
one; a NaN or out-of-range sampling setting is answered with a message. Requests go through gradio's queue,
--concurrency at a time.
Everything is served locally: no analytics, no fonts or scripts from other hosts. The page's text falls back to a
subset of Noto Sans CJK SC that the app serves itself (WebUI/fonts/, SIL OFL 1.1, see its README.md), so Chinese
shows on machines without a CJK font. The same functions are an API:

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860")
    history, _, note = client.predict("Hello!", [], "SFT", 0.7, 50, 0.95, 64, api_name="/chat")
"""
import argparse
import os
import socket
import time
from pathlib import Path

# Before gradio is imported: no usage statistics or version checks, and nothing fetched from the hub.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from llm_train import runtime
from llm_train.arithmetic import EXAMPLE_PROMPTS, arithmetic_answer, extract_answer
from llm_train.cli import positive_int
from llm_train.engine import Engine, Sampling, new_token_count, reply_budget
from llm_train.errors import UserError, run_main
from llm_train.lineage import check_lineage
from llm_train.paths import GRPO_OUTPUT_DIR, OUTPUT_DIR, REPO, REWARD_MODEL_DIR, SFT_OUTPUT_DIR, TOKENIZER_DIR
from llm_train.rl import find_policy, load_policy, load_reward_model, policy_parents
from llm_train.runtime import compute_dtype, dtype_name
from llm_train.tokenizer import load_tokenizer, render_messages
from llm_train.trainer_runs import rerun_command
from llm_train.webui_views import public, training_view

CHAT_MODELS = ("SFT", "GRPO")
COMPARED = ("base", "SFT", "GRPO")
EXAMPLES = [*EXAMPLE_PROMPTS, "Hello, how are you?", "你好"]  # the example buttons of Chat and Compare
# The font of the page's Chinese (and any other text its first fonts lack): a subset of Noto Sans CJK SC made by
# WebUI/fonts/build_font.py, served by the app at FONT_URL (relative to the page, like gradio's own fonts).
FONT_FILE = Path(__file__).resolve().parent / "fonts" / "NotoSansCJKsc-Regular-subset.woff2"
FONT_URL = "webui/fonts/NotoSansCJKsc-Regular-subset.woff2"
FONT_FAMILY = "Noto Sans CJK SC WebUI"


# ---------------------------------------------------------------------------------------------------------------
# Loading: every stage output once, with the same checks and messages as the stage scripts.
def port_number(text):
    """argparse type of --port: a TCP port, 1 to 65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 1 to 65535, got {text}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines on the network too")
    p.add_argument("--port", type=port_number, default=7860)
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
    rerun = rerun_command("SFT/qlora_fine_tune_trl.py --merge", model_dir=(args.base_dir, OUTPUT_DIR),
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
                          base_dir=(args.base_dir, OUTPUT_DIR), out_dir=(args.grpo_dir.parent, GRPO_OUTPUT_DIR.parent))
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
    """(engines {name: Engine} of base / SFT / GRPO, the RewardModel or None, {name: why not loaded}) of
    the stages that loaded; the others' messages name server paths (the page shows them through public())."""
    import torch

    dev = runtime.device()
    # On a GPU as the evaluations that wrote eval.json generate: fp32 weights under the compute dtype's autocast. On
    # CPU the weights are loaded in the compute dtype, with no autocast.
    on_gpu = dev.type == "cuda"
    dtype = torch.float32 if on_gpu else compute_dtype(allow_fp16=True)
    loaded, problems = {}, {}
    for name, load in (("base", lambda: load_base(args, dtype)), ("SFT", lambda: load_sft(args, dtype)),
                       ("GRPO", lambda: load_grpo(args, dtype)), ("reward model", lambda: load_reward(args))):
        try:
            loaded[name] = load()
        except UserError as e:
            problems[name] = str(e)
    reward = loaded.pop("reward model", None)  # a RewardModel, on its device already
    engine_dtype = dtype_name(allow_fp16=True) if on_gpu else "fp32"  # "fp32": no autocast
    return ({name: Engine(model.to(dev).eval(), tok, engine_dtype) for name, (model, tok) in loaded.items()}, reward,
            problems)


def server_dirs(args):
    return (args.base_dir, args.sft_dir, args.grpo_dir, args.reward_model, args.tokenizer_dir, args.report_dir)


# ---------------------------------------------------------------------------------------------------------------
# Generation settings from the page, and the prompt that fits the context.
def request_settings(temperature, top_k, top_p, max_new_tokens):
    """(Sampling, max new tokens) from the sliders' values, or a UserError saying which value is wrong (a NaN or
    out-of-range value sent through the API)."""
    return Sampling(temperature, top_k, top_p), new_token_count(max_new_tokens)


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


def verdict(answer, reply):
    """Right / wrong mark of a reply to an arithmetic problem ('' for other prompts); arithmetic_answer also knows
    typed problems in the task family's wording."""
    if answer is None:
        return ""
    said = extract_answer(reply)
    if said == answer:
        return f"✓ right ({answer})"
    if said is None:
        return f"✗ no final answer (expected \"The answer is {answer}.\")"
    return f"✗ wrong: {said} (the answer is {answer})"


def stats(n, seconds):
    return f"{n} tokens in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} tokens/s)"


# ---------------------------------------------------------------------------------------------------------------
# The requests: each a generator of what the page shows as the reply streams in.
class Handlers:
    """The app's requests on the loaded stages: engines {name: Engine} of base / SFT / GRPO, the reward model (or
    None) and {name: why not loaded} (already fit to show)."""

    def __init__(self, engines, reward, problems):
        self.engines, self.reward, self.problems = engines, reward, problems

    def unavailable(self, name):
        return f"**{name}** is not available: {self.problems.get(name, 'not loaded')}"

    def chat(self, message, history, model_name, temperature, top_k, top_p, max_new_tokens):
        """One chat turn: yields (conversation, input box, note) as the reply streams in."""
        messages = [{"role": m["role"], "content": text_of(m["content"])} for m in history or []]

        def shown():  # content as text parts: gradio dedents a plain string (inspect.cleandoc), changing the text
            return [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]

        if model_name not in self.engines:
            yield shown(), message, self.unavailable(model_name or "a chat model")
            return
        if not message.strip():
            yield shown(), "", "Type a message first."
            return
        try:
            sampling, max_new = request_settings(temperature, top_k, top_p, max_new_tokens)
        except UserError as e:
            yield shown(), message, f"Not sent: {e}."
            return
        engine = self.engines[model_name]
        context = engine.context
        max_new = reply_budget(engine.model, max_new)
        messages.append({"role": "user", "content": message})
        ids, dropped = chat_ids(engine.tokenizer, messages, context - max_new)
        notes = []
        if dropped:
            notes.append(f"The {dropped} oldest messages were left out: {model_name} sees at most {context} tokens, "
                         f"{max_new} of them for the reply.")
        if len(ids) > context - max_new:
            notes.append(f"Your message was cut to its last {context - max_new} tokens to fit the context.")
        messages.append({"role": "assistant", "content": ""})
        start = time.perf_counter()
        for text, n in engine.stream_text(ids, max_new, sampling):
            messages[-1]["content"] = text
            yield shown(), "", " ".join(notes + [f"{model_name} is writing… ({n} tokens)"])
        yield shown(), "", " ".join(notes + [f"{model_name}: {stats(n, time.perf_counter() - start)}"])

    def complete(self, prompt, temperature, top_k, top_p, max_new_tokens):
        """Plain continuation by the base model: yields (prompt + continuation, note) as it streams."""
        if "base" not in self.engines:
            yield prompt, self.unavailable("base")
            return
        try:
            sampling, max_new = request_settings(temperature, top_k, top_p, max_new_tokens)
        except UserError as e:
            yield prompt, f"Not sent: {e}."
            return
        engine = self.engines["base"]
        whole = engine.tokenizer(prompt).input_ids or [engine.tokenizer.eos_token_id]  # "" starts a new document
        max_new = reply_budget(engine.model, max_new)
        ids = engine.fit(whole, max_new)
        cut = f"The prompt was cut to its last {len(ids)} tokens (context {engine.context}). " \
            if len(ids) < len(whole) else ""
        start = time.perf_counter()
        for text, n in engine.stream_text(ids, max_new, sampling):
            yield prompt + text, cut + f"writing… ({n} tokens)"
        yield prompt + text, cut + stats(n, time.perf_counter() - start)

    def compare(self, prompt, temperature, top_k, top_p, max_new_tokens):
        """Base, SFT and GRPO answer the same prompt (in turn, streamed); then the reward model scores each answer
        and arithmetic answers are checked. Yields 6 values: the three answers, then the three verdicts."""
        answers = {n: "" for n in COMPARED}
        notes = {n: "" if n in self.engines else self.unavailable(n) for n in COMPARED}

        def out():
            return [answers[n] for n in COMPARED] + [notes[n] for n in COMPARED]

        if not prompt.strip():
            yield ["", "", ""] + ["Type a prompt first."] * 3
            return
        try:
            sampling, max_new_tokens = request_settings(temperature, top_k, top_p, max_new_tokens)
        except UserError as e:
            yield ["", "", ""] + [f"Not sent: {e}."] * 3
            return
        messages = [{"role": "user", "content": prompt}]
        done = [n for n in COMPARED if n in self.engines]
        for name in done:
            engine = self.engines[name]
            max_new = reply_budget(engine.model, max_new_tokens)
            ids = engine.fit(engine.tokenizer(render_messages(messages, add_generation_prompt=True),
                                              add_special_tokens=False).input_ids, max_new)
            notes[name] = "generating…"
            start = time.perf_counter()
            for text, n in engine.stream_text(ids, max_new, sampling):
                answers[name] = text
                yield out()
            notes[name] = stats(n, time.perf_counter() - start) if text.strip() else \
                f"(no text: {n} tokens, the model ended its turn or wrote only spaces)"
        self.judge(prompt, messages, done, answers, notes)
        yield out()

    def judge(self, prompt, messages, names, answers, notes):
        """Add the reward model's score and the arithmetic verdict to each answer's note."""
        scores = {}
        if self.reward is not None and names:
            scores = dict(zip(names, self.reward.scores([messages] * len(names), [answers[n] for n in names])))
        answer = arithmetic_answer(prompt)
        for n in names:
            score = f"reward-model score **{scores[n]:+.3f}**" if n in scores else \
                f"no reward-model score ({self.problems.get('reward model', '')})"
            notes[n] = " · ".join(x for x in (score, verdict(answer, answers[n]), notes[n]) if x)


# ---------------------------------------------------------------------------------------------------------------
# The page: one function per tab.
def sampling_controls(tab, max_tokens):
    import gradio as gr

    with gr.Accordion("Sampling", open=False, elem_id=f"{tab}-sampling"):
        with gr.Row():
            temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="temperature (0 = greedy)",
                                    elem_id=f"{tab}-temperature")
            top_k = gr.Slider(0, 200, value=50, step=1, label="top-k (0 = off)", elem_id=f"{tab}-top-k")
            top_p = gr.Slider(0.05, 1, value=0.95, step=0.05, label="top-p", elem_id=f"{tab}-top-p")
            max_new = gr.Slider(1, 1024, value=max_tokens, step=1, elem_id=f"{tab}-max-new",
                                label="max new tokens (at most half the model's context)")
    return [temperature, top_k, top_p, max_new]


def chat_tab(ui, examples):
    import gradio as gr

    chat_models = [n for n in CHAT_MODELS if n in ui.engines]
    model = gr.Dropdown(list(CHAT_MODELS), value=(chat_models or CHAT_MODELS)[-1], label="model",
                        elem_id="chat-model")
    if len(chat_models) < len(CHAT_MODELS):
        gr.Markdown("\n".join(ui.unavailable(n) for n in CHAT_MODELS if n not in ui.engines))
    chatbot = gr.Chatbot(elem_id="chatbot", height=380, label="conversation", buttons=["copy", "copy_all"])
    note = gr.Markdown(elem_id="chat-note")
    with gr.Row():
        msg = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=6,
                         elem_id="chat-input")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        stop = gr.Button("Stop", variant="stop", scale=1, elem_id="chat-stop")
        clear = gr.Button("Clear", scale=1)
    gr.Examples(examples, msg)
    inputs = [msg, chatbot, model, *sampling_controls("chat", 128)]
    events = [msg.submit(ui.chat, inputs, [chatbot, msg, note], api_name="chat"),
              send.click(ui.chat, inputs, [chatbot, msg, note], api_visibility="private")]
    stop.click(None, cancels=events)
    clear.click(lambda: ([], ""), None, [chatbot, note], api_visibility="private")


def complete_tab(ui):
    import gradio as gr

    if "base" not in ui.engines:
        gr.Markdown(ui.unavailable("base"))
    prompt = gr.Textbox("Once upon a time", lines=3, label="text to continue", elem_id="complete-input")
    with gr.Row():
        go = gr.Button("Continue", variant="primary", elem_id="complete-go")
        stop = gr.Button("Stop", variant="stop")
    completion = gr.Textbox(lines=8, label="prompt + continuation (base model)", elem_id="complete-output")
    note = gr.Markdown()
    event = go.click(ui.complete, [prompt, *sampling_controls("complete", 100)], [completion, note],
                     api_name="complete")
    stop.click(None, cancels=[event])


def compare_tab(ui, args, examples):
    import gradio as gr

    gr.Markdown("One prompt, answered by each stage through the chat template. The reward model scores "
                "each answer; arithmetic word problems are checked against their exact answer.")
    prompt = gr.Textbox(examples[0], label="prompt", elem_id="compare-input")
    with gr.Row():
        go = gr.Button("Compare", variant="primary", elem_id="compare-go")
        stop = gr.Button("Stop", variant="stop")
    gr.Examples(examples, prompt)
    boxes, verdicts = [], []
    with gr.Row():
        for name, where in zip(COMPARED, (args.base_dir, args.sft_dir, args.grpo_dir)):
            with gr.Column(min_width=200):
                boxes.append(gr.Textbox(lines=6, max_lines=6, label=f"{name} ({where.name}/)",
                                        elem_id=f"answer-{name}"))
                verdicts.append(gr.Markdown(elem_id=f"verdict-{name}"))
    event = go.click(ui.compare, [prompt, *sampling_controls("compare", 64)], boxes + verdicts, api_name="compare")
    stop.click(None, cancels=[event])


def training_tab(args, tab):
    import gradio as gr

    refresh = gr.Button("Refresh")
    outputs = [gr.Markdown(elem_id="training-status"), gr.Plot(label="loss curves", elem_id="loss-plot"),
               gr.Plot(label="report card", elem_id="report-plot"), gr.Plot(label="tokenizer", elem_id="tokenizer-plot")]

    def view():
        return training_view(args)

    refresh.click(view, None, outputs, api_name="training")
    tab.select(view, None, outputs, api_visibility="private")


def build_app(args, engines, reward, problems):
    """The gradio Blocks: the stage status, then the Chat, Complete, Compare and Training tabs."""
    import gradio as gr

    problems = {name: public(why, *server_dirs(args)) for name, why in problems.items()}
    ui = Handlers(engines, reward, problems)
    device = next(iter(engines.values())).device if engines else "nothing loaded"
    loaded = list(engines) + (["reward model"] if reward is not None else [])
    status = "\n".join([f"- **{n}**: loaded" for n in loaded] + [f"- **{n}**: {why}" for n, why in problems.items()])
    with gr.Blocks(title="llm_train", analytics_enabled=False) as demo:
        gr.Markdown(f"# llm_train: the models of each stage\nRunning on {device}.")
        with gr.Accordion("Stage outputs", open=bool(problems)):
            gr.Markdown(status, elem_id="stage-status")
        with gr.Tab("Chat", id="chat"):
            chat_tab(ui, EXAMPLES)
        with gr.Tab("Complete", id="complete"):
            complete_tab(ui)
        with gr.Tab("Compare", id="compare"):
            compare_tab(ui, args, EXAMPLES)
        with gr.Tab("Training", id="training") as tab:
            training_tab(args, tab)
    return demo


# ---------------------------------------------------------------------------------------------------------------
# The font: served by the app, in every font-family chain of the theme.
def font_face_css():
    """The @font-face rule of the served CJK font (one regular face: the browser makes the bold)."""
    return (f"@font-face {{\n  font-family: '{FONT_FAMILY}';\n  src: url('{FONT_URL}') format('woff2');\n"
            f"  font-weight: 400;\n  font-style: normal;\n  font-display: swap;\n}}")


def theme():
    """gradio's default theme with the served CJK font after its Latin fonts, in both the text and the monospace
    font chains: the Latin text looks as before and every character those lack comes from the served font."""
    import gradio as gr
    from gradio.themes.utils import fonts

    class ServedFont(fonts.Font):
        def stylesheet(self):
            return {"url": None, "css": font_face_css()}

    return gr.themes.Default(
        font=(fonts.LocalFont("Source Sans Pro", weights=(400, 600)), ServedFont(FONT_FAMILY), "ui-sans-serif",
              "system-ui", "sans-serif"),
        font_mono=(fonts.LocalFont("IBM Plex Mono", weights=(400, 600)), fonts.Font(FONT_FAMILY),  # (rule above)
                   "ui-monospace", "Consolas", "monospace"))


def font_routes():
    """The route that serves the font file (before gradio's own routes), for launch(app_kwargs={"routes": ...})."""
    from starlette.responses import FileResponse
    from starlette.routing import Route

    def font(request):
        return FileResponse(FONT_FILE, media_type="font/woff2", headers={"Cache-Control": "public, max-age=86400"})

    return [Route(f"/{FONT_URL}", font, methods=["GET", "HEAD"])]


def main(argv=None):
    args = parse_args(argv)
    with socket.socket() as s:  # before the slow part: a port in use fails at once
        try:
            s.bind((args.host, args.port))
        except OSError as e:
            raise UserError(f"cannot serve on {args.host}:{args.port} ({e.strerror}): pass another --port") from None
    print("loading the stage outputs...", flush=True)
    engines, reward, problems = load_all(args)
    for name, why in problems.items():
        print(f"{name}: not available: {why}", flush=True)
    demo = build_app(args, engines, reward, problems)
    demo.queue(default_concurrency_limit=args.concurrency)
    # Default theme plus the CJK font: its fonts are served by the app itself, like every other file of the page.
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, theme=theme(),
                app_kwargs={"routes": font_routes()}, footer_links=["api", "settings"])


if __name__ == "__main__":
    run_main(main)
