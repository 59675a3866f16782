"""The web UI (WebUI/app.py) on the smoke pipeline's models, as a person uses it: in a real headless Chromium (Debian's
chromium + chromium-driver, driven by selenium; the test fails if the browser cannot start) and through
gradio_client, plus a start with missing and mismatched stage outputs. The app runs as a subprocess with every
outgoing connection but localhost sent to a dead proxy, so anything it fetched from the internet would fail."""
import contextlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from llm_train.arithmetic import arithmetic_answer, arithmetic_tasks, extract_answer
from llm_train.engine import Engine, Sampling
from llm_train.rl import load_reward_model, reward_model_scores
from llm_train.tokenizer import load_chat_tokenizer, load_tokenizer, render_messages

import pytest
from test_pipeline import retrain_tokenizer

from conftest import PY, REPO, checkout_env, free_port, load_script

APP = REPO / "WebUI" / "app.py"
SCREENSHOT = REPO / "WebUI" / "screenshots" / "compare.png"  # git-ignored: for a person to look at
ARITH = "Tom has 47 apples and gets 38 more. How many apples does Tom have now?"
FREE_SAMPLING = (1.0, 0, 1.0)  # temperature, top-k off, top-p off: the tiny models write some text


@pytest.fixture(scope="module")
def app_module():
    return load_script("WebUI/app.py")


def dirs_of(root):
    root = Path(root)
    return ["--base-dir", root / "output", "--sft-dir", root / "SFT" / "sft_output",
            "--grpo-dir", root / "RLHF" / "grpo_output", "--reward-model", root / "RLHF" / "reward_model",
            "--tokenizer-dir", root / "tokenizer", "--report-dir", root / "report"]


@contextlib.contextmanager
def running_app(args, log):
    """Start WebUI/app.py on a free port; yield its URL once the page is served; stop it afterwards."""
    port = free_port()
    env = {**os.environ, "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        proc = subprocess.Popen([PY, str(APP), "--port", str(port), *map(str, args)], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, f"the app exited ({proc.returncode}):\n{Path(log).read_text()[-4000:]}"
            assert time.time() < deadline, f"the app did not serve {url} in time:\n{Path(log).read_text()[-4000:]}"
            try:
                if opener.open(url, timeout=5).status == 200:
                    break
            except OSError:
                time.sleep(1)
        yield url
        assert proc.poll() is None, f"the app died:\n{Path(log).read_text()[-4000:]}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def app_url(smoke_repo, tmp_path_factory):
    root, _ = smoke_repo
    with running_app(dirs_of(root), tmp_path_factory.mktemp("webui") / "app.log") as url:
        yield url


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def reply_of(history):
    """The text of the last (assistant) message of a chatbot value returned by the API."""
    content = history[-1]["content"]
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


# ---------------------------------------------------------------------------------------------------------------
def test_arithmetic_prompts_are_recognised_and_checked(app_module):
    tasks = [t for split in ("train", "heldout") for t in arithmetic_tasks(200, split)]
    assert {arithmetic_answer(t["prompt"]) for t in tasks[:5]} == {t["answer"] for t in tasks[:5]}
    assert all(arithmetic_answer(t["prompt"]) == t["answer"] for t in tasks)
    assert {t["op"] for t in tasks} == {"add", "sub"} and {t["lang"] for t in tasks} == {"en", "zh"}
    assert arithmetic_answer("Hello, how are you?") is None
    assert arithmetic_answer("Tom has 3 apples and gets 4 more. How many apples does Tom have now?") == 7
    t = tasks[0]
    assert app_module.verdict(t["answer"], t["response"]).startswith("✓ right")
    assert app_module.verdict(t["answer"], f"The answer is {t['answer'] + 1}.").startswith("✗ wrong")
    assert app_module.verdict(t["answer"], "I don't know").startswith("✗ no final answer")
    assert app_module.verdict(None, "anything") == ""


def test_long_conversations_drop_their_oldest_messages(app_module, smoke_repo):
    tok = load_chat_tokenizer(smoke_repo[0] / "SFT" / "sft_output")
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i}: what is the weather like?"},
                  {"role": "assistant", "content": f"answer {i}: sunny and warm today."}]
    messages = turns + [{"role": "user", "content": "and tomorrow?"}]
    whole = len(tok(render_messages(messages, True), add_special_tokens=False).input_ids)
    ids, dropped = app_module.chat_ids(tok, messages, whole)
    assert dropped == 0 and len(ids) == whole
    ids, dropped = app_module.chat_ids(tok, messages, whole // 2)
    assert 0 < dropped < len(messages) and len(ids) <= whole // 2
    assert messages[dropped]["role"] == "user"  # what the model sees still starts with a user turn
    assert ids == tok(render_messages(messages[dropped:], True), add_special_tokens=False).input_ids
    ids, dropped = app_module.chat_ids(tok, messages, 3)  # not even the last message fits: it is kept (and cut later)
    assert dropped == len(messages) - 1


def test_closing_the_stream_stops_generation(app_module, smoke_repo):
    import torch
    from transformers import AutoModelForCausalLM

    base = smoke_repo[0] / "output"
    model, tok = AutoModelForCausalLM.from_pretrained(str(base)).eval(), load_tokenizer(base)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))  # one forward pass per generated token
    ids = tok("The history of").input_ids
    engine = Engine(model, tok)
    torch.manual_seed(0)
    full = list(engine.stream_text(ids, 64, Sampling(*FREE_SAMPLING)))  # left alone
    texts = [t for t, _ in full]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])) and len(set(texts)) > 2  # streamed, growing
    assert full[-1][1] == len(forwards) == 64  # with this seed the base does not end the text within 64 tokens
    forwards.clear()
    torch.manual_seed(0)  # the same tokens again, but stopped after the first word
    stream = engine.stream_text(ids, 64, Sampling(*FREE_SAMPLING))
    assert next(stream)[0] == texts[0]
    stream.close()  # what gradio does when the stop button cancels the request
    assert not [t for t in threading.enumerate() if t.name == "generate"], "generation still running"
    assert len(forwards) < 64, "closing the stream did not stop the generation"


def test_gradio_client_chat_streams_and_compare_scores(app_url, smoke_repo):
    c = client(app_url)
    for _ in range(5):  # the tiny model may end a reply after its first word: then there is nothing to stream
        updates = list(c.submit("Hello, how are you?", [], "SFT", *FREE_SAMPLING, 48, api_name="/chat"))
        texts = [reply_of(u[0]) for u in updates if u[0] and u[0][-1]["role"] == "assistant"]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # each update extends the previous one
        if len(set(texts)) >= 3:
            break
    else:
        pytest.fail(f"five replies, none streamed in three or more steps: {texts}")
    history, box, note = updates[-1]
    assert texts[-1].strip() and box == "" and "tokens/s" in note and note.startswith("SFT:")

    # the conversation goes on with the history the API returned; a long one drops its oldest messages, with a note
    history, _, note = c.predict("And then?", history, "GRPO", *FREE_SAMPLING, 16, api_name="/chat")
    # (a long sampled first reply may already push the window: the note then starts with what was left out)
    assert [m["role"] for m in history] == ["user", "assistant"] * 2 and "GRPO: " in note
    for i in range(3):
        history, _, note = c.predict(f"Tell me more about topic number {i}, please.", history, "GRPO",
                                     *FREE_SAMPLING, 64, api_name="/chat")
    assert "oldest messages were left out" in note and len(history) == 10

    for _ in range(5):  # a sampled reply of a smoke model may end at its first token: ask again
        out = c.predict(ARITH, *FREE_SAMPLING, 24, api_name="/compare")
        answers, verdicts = out[:3], out[3:]
        if all(a.strip() for a in answers):
            break
    assert all(a.strip() for a in answers), answers
    # the scores shown are the reward model's scores of these answers
    rm, rm_tok = load_reward_model(smoke_repo[0] / "RLHF" / "reward_model")
    scores = reward_model_scores(rm, rm_tok, [[{"role": "user", "content": ARITH}]] * 3, list(answers))
    for v, s, a in zip(verdicts, scores, answers):
        assert f"reward-model score **{s:+.3f}**" in v, (v, s)
        assert ("✓ right" if extract_answer(a) == 85 else "✗") in v and "85" in v

    text, note = c.predict("Once upon a time", *FREE_SAMPLING, 20, api_name="/complete")
    assert text.startswith("Once upon a time") and len(text) > len("Once upon a time") and "tokens/s" in note

    status, *plots = c.predict(api_name="/training")
    assert "All stage outputs found" in status
    assert all(p and p["type"] == "matplotlib" and p["plot"].startswith("data:image") for p in plots), plots


def test_two_clients_chat_at_the_same_time(app_url):
    """Two sessions chat at once: both get answers, and they are generated together, not one after the other
    (shown on a round where both replies are long enough for their times to overlap; the model ends a reply when
    it likes, so up to three rounds)."""
    clients = {name: client(app_url) for name in ("Ann", "Bob")}
    for _ in range(3):
        results, errors, barrier = {}, [], threading.Barrier(2)

        def chat(name):
            try:
                barrier.wait()
                start, times = time.perf_counter(), []
                job = clients[name].submit(f"Hi, I am {name}.", [], "SFT", *FREE_SAMPLING, 64, api_name="/chat")
                for update in job:
                    times.append(time.perf_counter() - start)
                history, _, note = update
                results[name] = (times[0], times[-1], reply_of(history), int(re.search(r"(\d+) tokens", note)[1]))
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=chat, args=(name,)) for name in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert set(results) == {"Ann", "Bob"}, results  # both answered (a sampled reply may end at once: retry)
        if min(r[3] for r in results.values()) >= 16:
            assert all(r[2].strip() for r in results.values()), results
            (a_first, a_end, *_), (b_first, b_end, *_) = results["Ann"], results["Bob"]
            assert a_first < b_end and b_first < a_end, f"served one after the other, not together: {results}"
            return
    pytest.fail(f"no round where both replies had 16 tokens or more: {results}")


def test_browser_chat_streams_and_compare_shows_three_scored_answers(app_url):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "no chromium/chromedriver: apt-get install -y chromium chromium-driver (make test does)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,1100"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    browser = webdriver.Chrome(options=options, service=Service(driver))  # no skip: a browser that can't start fails
    try:
        browser.get(app_url)
        wait = WebDriverWait(browser, 90, poll_frequency=0.1)
        box = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#chat-input textarea"))
        # record every state of the assistant's message as the page updates it
        browser.execute_script("""
            window.replies = [];
            new MutationObserver(() => {
              const bot = document.querySelectorAll('#chatbot [data-testid="bot"]');
              const text = bot.length ? bot[bot.length - 1].innerText : '';
              if (text && window.replies[window.replies.length - 1] !== text) window.replies.push(text);
            }).observe(document.querySelector('#chatbot'), {childList: true, subtree: true, characterData: true});""")
        browser.find_element(By.CSS_SELECTOR, "#chat-sampling .label-wrap").click()  # open "Sampling"
        for slider, value in (("chat-temperature", "1"), ("chat-top-k", "0")):  # free sampling: the tiny model writes
            number = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, f"#{slider} input[type=number]"))
            number.send_keys(Keys.CONTROL, "a")
            number.send_keys(value, Keys.TAB)
        for turn in range(5):  # the tiny model may end a reply after its first word: then nothing streams
            browser.execute_script("window.replies = []")
            box.send_keys(f"Hello! What can you do? ({turn})", Keys.ENTER)
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]')) == turn + 1
                       and "tokens/s" in b.find_element(By.ID, "chat-note").text)  # this reply is finished
            replies = browser.execute_script("return window.replies")
            assert replies and replies[-1].strip(), "no reply appeared in the page"
            if len(replies) >= 2:
                break
        else:
            pytest.fail(f"five replies appeared at once, none streamed: {replies}")

        next(t for t in browser.find_elements(By.CSS_SELECTOR, "[role=tab]") if t.text == "Compare").click()
        prompt = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#compare-input textarea"))
        prompt.clear()
        prompt.send_keys(ARITH)
        browser.find_element(By.ID, "compare-go").click()
        verdicts = lambda b: [b.find_element(By.ID, f"verdict-{n}").text for n in ("base", "SFT", "GRPO")]
        wait.until(lambda b: all("reward-model score" in v for v in verdicts(b)))
        for name, v in zip(("base", "SFT", "GRPO"), verdicts(browser)):
            answer = browser.find_element(By.CSS_SELECTOR, f"#answer-{name} textarea").get_attribute("value")
            assert answer.strip() or "(no text" in v, (name, answer, v)
            assert ("✓ right" in v or "✗" in v) and "85" in v, v
        SCREENSHOT.parent.mkdir(exist_ok=True)
        browser.execute_script("document.getElementById('compare-input').scrollIntoView()")
        browser.save_screenshot(str(SCREENSHOT))

        requested = {json.loads(e["message"])["message"].get("params", {}).get("request", {}).get("url", "")
                     for e in browser.get_log("performance")}
        outside = [u for u in requested if u and not u.startswith((app_url, "data:", "blob:", "ws://127.0.0.1"))]
        assert len(requested) > 10 and not outside, f"the page fetched from other hosts: {outside}"
    finally:
        browser.quit()


def test_missing_and_mismatched_stages_are_explained_not_fatal(smoke_repo, tmp_path):
    """A base that is not the one the SFT adapter was trained on, and no RLHF outputs or report at all: the app
    starts, says what is wrong and which command fixes it, and the base model still works."""
    import torch
    from safetensors.torch import load_file, save_file

    root = smoke_repo[0]
    base = tmp_path / "output"
    shutil.copytree(root / "output", base)
    weights = load_file(base / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + torch.full_like(weights[name], 1e-3)  # "retrained": other weights, same shape
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    args = dirs_of(root)
    for flag, value in (("--base-dir", base), ("--grpo-dir", tmp_path / "none" / "grpo_output"),
                        ("--reward-model", tmp_path / "none" / "reward_model"), ("--report-dir", tmp_path / "none")):
        args[args.index(flag) + 1] = value
    with running_app(args, tmp_path / "app.log") as url:
        c = client(url)
        history, box, note = c.predict("Hello", [], "SFT", *FREE_SAMPLING, 16, api_name="/chat")
        assert history == [] and box == "Hello"
        # no server path in the page: repo-relative names, "…/" and the last part elsewhere
        assert "was built from a different base than the one in …/output" in note
        assert "Rebuild it with `python SFT/qlora_fine_tune_trl.py --merge --model-dir …/output" in note
        out = c.predict(ARITH, *FREE_SAMPLING, 16, api_name="/compare")
        assert out[0].strip() and out[1:3] == ("", "")  # the base answers; SFT and GRPO are explained instead
        assert "no reward-model score (no reward model in" in out[3] and "python RLHF/reward_model.py" in out[3]
        assert "different base" in out[4] and "train it with `python RLHF/grpo_trl.py`" in out[5]
        status, loss, report, tokenizer = c.predict(api_name="/training")
        assert "history.jsonl` is missing: run `python RLHF/grpo_trl.py`" in status
        assert "metrics.json` is missing: run `python report/build_report.py`" in status
        assert loss and tokenizer and report is None
        text, _ = c.predict("Once upon a time", *FREE_SAMPLING, 8, api_name="/complete")
        assert len(text) > len("Once upon a time")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        page = opener.open(f"{url}/config", timeout=30).read().decode()
        shown = json.dumps([note, out, status], ensure_ascii=False) + page
        assert "grpo_output" in page and "`python RLHF/grpo_trl.py`" in page  # the stage status is in the page
        assert str(tmp_path) not in shown and str(root) not in shown and str(REPO) not in shown
    log = (tmp_path / "app.log").read_text()
    assert "Traceback" not in log, log[-3000:]


def test_a_port_in_use_is_one_clear_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([PY, str(APP), "--port", str(port)], capture_output=True, text=True, timeout=120,
                              env=checkout_env(REPO))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"cannot serve on 127.0.0.1:{port}" in proc.stderr and "--port" in proc.stderr


def call_raw(url, api, data):
    """The last value a request to /gradio_api/call/API returns, sent as raw JSON: gradio_client refuses to send NaN,
    a browser's or any other client's request need not."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"{url}/gradio_api/call/{api}", json.dumps({"data": data}).encode(),
                                     {"Content-Type": "application/json"})
    event = json.loads(opener.open(request, timeout=30).read())["event_id"]
    events = opener.open(f"{url}/gradio_api/call/{api}/{event}", timeout=120).read().decode()
    kind, data = re.findall(r"event: (\w+)\ndata: (.*)", events)[-1]
    return kind, json.loads(data)


def test_nan_or_out_of_range_settings_are_a_clear_message(app_url):
    """NaN sliders sent through the API used to reach generate(): top-p NaN was used as is, the others failed with
    {"error": null}. (Values beyond a slider's range gradio refuses itself.)"""
    nan = float("nan")
    for settings, what in (((nan, 50, 0.95, 8), "temperature"), ((0.7, 50, nan, 8), "top_p"),
                           ((0.7, nan, 0.95, 8), "top_k"), ((0.7, 2.5, 0.95, 8), "top_k"),
                           ((0.7, 50, 0.95, nan), "max_new_tokens")):
        kind, (history, box, note) = call_raw(app_url, "chat", ["Hello", [], "SFT", *settings])
        assert kind == "complete" and history == [] and box == "Hello", (settings, note)
        assert note.startswith(f"Not sent: {what} must be"), (settings, note)
        kind, (text, note) = call_raw(app_url, "complete", ["Once", *settings])
        assert kind == "complete" and text == "Once" and f"{what} must be" in note
        kind, out = call_raw(app_url, "compare", ["Hi", *settings])
        assert kind == "complete" and out[:3] == ["", "", ""] and all(f"{what} must be" in v for v in out[3:])
    assert call_raw(app_url, "complete", ["Once", 0.7, 50, 0.95, 4])[1][0] != "Once"  # the same call, valid values


def test_the_port_must_be_a_tcp_port():
    proc = subprocess.run([PY, str(APP), "--port", "70000"], capture_output=True, text=True, timeout=120,
                          env=checkout_env(REPO))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "argument --port: must be a TCP port, 1 to 65535, got 70000" in proc.stderr


def test_a_retrained_tokenizer_is_named_not_shown(app_module, smoke_repo, tmp_path, tiny_tokenizer_dir):
    """The Training tab used to plot tokenizer/'s report beside models trained on another tokenizer."""
    from llm_train import webui_views as views

    root = tmp_path / "llm_train"
    shutil.copytree(smoke_repo[0] / "tokenizer", root / "tokenizer")
    args = app_module.parse_args([str(a) for a in dirs_of(smoke_repo[0])] + ["--tokenizer-dir", str(root / "tokenizer")])
    status, _, _, figure = views.training_view(args)
    assert "another tokenizer" not in status and figure is not None
    retrain_tokenizer(root, tiny_tokenizer_dir)
    status, _, _, figure = views.training_view(args)
    assert "tokenizer/ holds another tokenizer (vocabulary 600)" in status and "the copy saved in output/" in status
    assert str(root) not in status
    assert "holds another tokenizer" in figure.axes[0].texts[0].get_text()
