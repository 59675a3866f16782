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

from llm_train.arithmetic import EXAMPLE_PROMPTS, arithmetic_answer, arithmetic_tasks, extract_answer
from llm_train.engine import Engine, Sampling
from llm_train.rl import load_reward_model
from llm_train.tokenizer import load_chat_tokenizer, load_tokenizer, render_messages, tokenizer_fingerprint

import pytest

from conftest import PY, REPO, checkout_env, free_port, load_script

APP = REPO / "WebUI" / "app.py"
SCREENSHOT = REPO / "WebUI" / "screenshots" / "compare.png"  # git-ignored: for a person to look at
ARITH = "Tom has 47 apples and gets 38 more. How many apples does Tom have now?"
FREE_SAMPLING = (1.0, 0, 1.0)  # temperature, top-k off, top-p off: the tiny models write some text
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff]")
FONT_NAME = "Noto Sans CJK SC"  # the name inside WebUI/fonts/*.woff2, as Chromium reports the fonts it draws with


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


def ask_until(ask, ok, tries=3):
    """ask()'s first answer that ok() accepts, of up to `tries` (a smoke model may end a sampled reply at its first
    token: then it is asked again), else its last answer."""
    for _ in range(tries):
        answer = ask()
        if ok(answer):
            break
    return answer


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


def test_the_examples_are_the_arithmetic_examples_and_the_greetings(app_module):
    assert app_module.EXAMPLES == [*EXAMPLE_PROMPTS, "Hello, how are you?", "你好"]
    answers = {"Tom has 3 apples and gets 4 more. How many apples does Tom have now?": 7,
               "Anna has 43 apples and gets 9 more. How many apples does Anna have now?": 52,
               "A shop had 54 bottles and sold 25. How many bottles are left?": 29, "What is 29 + 82?": 111,
               "小明有25本书，送给别人8本书。还剩多少本书？": 17, "39加15等于多少？": 54, "6加7等于多少？": 13}
    assert {p: arithmetic_answer(p) for p in EXAMPLE_PROMPTS} == answers  # every example is marked, correctly
    assert arithmetic_answer("Hello, how are you?") is None and arithmetic_answer("你好") is None
    assert arithmetic_answer("47+38") == arithmetic_answer("47加38") == 85
    for answer in answers.values():
        assert app_module.verdict(answer, f"The answer is {answer}.") == f"✓ right ({answer})"


def test_the_served_font_covers_the_projects_chinese(app_module, app_url):
    """WebUI/fonts/: the committed, OFL-licensed subset of Noto Sans CJK SC the page's text falls back to; the app
    serves it as it is, and it has every character the project's own Chinese text uses."""
    import gzip

    from fontTools.ttLib import TTFont  # matplotlib's dependency; only the test reads the font

    font = app_module.FONT_FILE
    assert font.parent == REPO / "WebUI" / "fonts" and 100_000 < font.stat().st_size <= 2_000_000
    assert "SIL OPEN FONT LICENSE Version 1.1" in (font.parent / "OFL.txt").read_text()
    assert "build_font.py" in (font.parent / "README.md").read_text()
    ignored = subprocess.run(["git", "check-ignore", str(font), str(font.parent / "OFL.txt")], cwd=REPO,
                             capture_output=True, text=True)
    assert ignored.returncode == 1 and not ignored.stdout, f"git-ignored: {ignored.stdout}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{app_url}/{app_module.FONT_URL}", timeout=30) as response:
        assert response.headers["Content-Type"] == "font/woff2" and response.read() == font.read_bytes()

    cmap = set(TTFont(font).getBestCmap())
    lacking = lambda text: "".join(sorted({c for c in text if c.isprintable() and ord(c) not in cmap}))
    level1 = "".join(bytes([row, cell]).decode("gb2312") for row in range(0xB0, 0xD8) for cell in range(0xA1, 0xFF)
                     if (row, cell) <= (0xD7, 0xF9))
    assert len(level1) == 3755 and not lacking(level1)
    own = [(REPO / "llm_train" / "arithmetic.py").read_text(encoding="utf-8"), "".join(app_module.EXAMPLES),
           "".join(map(chr, range(0x20, 0x7F))), "，。、；：？！“”‘’（）《》【】…—·￥"]
    for path in [REPO / "SFT" / "data" / "chatterbot_sft.jsonl.gz", *sorted((REPO / "RLHF" / "data").glob("*.gz"))]:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            own.append(f.read())
    assert not lacking("".join(own))
    corpus = []
    for path in sorted((REPO / "data" / "default_corpus").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            corpus.append(f.read())
    # the corpus's poetry has a few very rare characters (CJK extension B-F) that Noto Sans CJK SC lacks
    assert all(ord(c) >= 0x20000 or c == "\ufffd" for c in lacking("".join(corpus))), lacking("".join(corpus))


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
    # the user's messages alone overflow the window (context 256 - 64 for the reply), however short the replies are
    for i in range(3):
        history, _, note = c.predict(f"Tell me more about topic number {i}, please. " * 4, history, "GRPO",
                                     *FREE_SAMPLING, 64, api_name="/chat")
    assert "oldest messages were left out" in note and len(history) == 10

    out = ask_until(lambda: c.predict(ARITH, *FREE_SAMPLING, 24, api_name="/compare"),
                    lambda out: all(a.strip() for a in out[:3]), tries=5)
    answers, verdicts = out[:3], out[3:]
    assert all(a.strip() for a in answers), answers
    # the scores shown are the reward model's scores of these answers
    scores = load_reward_model(smoke_repo[0] / "RLHF" / "reward_model").scores(
        [[{"role": "user", "content": ARITH}]] * 3, list(answers))
    for v, s, a in zip(verdicts, scores, answers):
        assert f"reward-model score **{s:+.3f}**" in v, (v, s)
        assert ("✓ right" if extract_answer(a) == 85 else "✗") in v and "85" in v

    # (the smoke base ends the text at its first token ~0.4% of the time)
    text, note = ask_until(lambda: c.predict("Once upon a time", *FREE_SAMPLING, 20, api_name="/complete"),
                           lambda out: len(out[0]) > len("Once upon a time"))
    assert text.startswith("Once upon a time") and len(text) > len("Once upon a time") and "tokens/s" in note

    status, *plots = c.predict(api_name="/training")
    assert "All stage outputs found" in status
    assert all(p and p["type"] == "matplotlib" and p["plot"].startswith("data:image") for p in plots), plots


def test_compare_marks_the_example_prompts(app_module, app_url):
    """Every arithmetic example, English, Chinese or a bare expression, gets its right / wrong mark in Compare;
    the greetings get none."""
    c = client(app_url)
    for prompt in app_module.EXAMPLES:
        out = c.predict(prompt, *FREE_SAMPLING, 8, api_name="/compare")
        answer = arithmetic_answer(prompt)
        for text, note in zip(out[:3], out[3:]):
            assert "reward-model score" in note, (prompt, note)
            if answer is None:
                assert "✓" not in note and "✗" not in note, (prompt, note)
            else:
                assert app_module.verdict(answer, text) in note and str(answer) in note, (prompt, text, note)


def test_two_clients_chat_at_the_same_time(app_url):
    """Two sessions chat at once: both get answers, and they are generated together, not one after the other
    (shown on a round where both replies are long enough for their times to overlap; the smoke model ends a reply
    when it likes, often within a few tokens, and a 17-token reply can end in the ~20 ms before the other's first
    token, so up to eight rounds; a server that serves one session after the other overlaps none)."""
    clients = {name: client(app_url) for name in ("Ann", "Bob")}
    for _ in range(8):
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
            if a_first < b_end and b_first < a_end:
                return
    pytest.fail(f"no round where both replies had 16 tokens or more and were generated together: {results}")


@contextlib.contextmanager
def chromium():
    """A real headless Chromium (Debian's, no CJK font installed) driven by selenium, logging every request the page
    makes; no skip: a browser that cannot start fails the test."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "no chromium/chromedriver: apt-get install -y chromium chromium-driver (make test does)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,1100"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    browser = webdriver.Chrome(options=options, service=Service(driver))
    try:
        yield browser
    finally:
        browser.quit()


def free_sampling(browser, wait, tab):
    """Open a tab's "Sampling" and set temperature 1, top-k off: the tiny models then write some text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.find_element(By.CSS_SELECTOR, f"#{tab}-sampling .label-wrap").click()
    for slider, value in ((f"{tab}-temperature", "1"), (f"{tab}-top-k", "0")):
        number = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, f"#{slider} input[type=number]"))
        number.send_keys(Keys.CONTROL, "a")
        number.send_keys(value, Keys.TAB)


def fonts_drawing(browser, element):
    """The fonts Chromium drew the element's text with, as DevTools reports them (CSS.getPlatformFontsForNode, asked
    of each element that holds some of the text): [{familyName, isCustomFont (a web font of the page), glyphCount}].
    What is really on the screen, whatever fonts the machine has: a character that no font of the page has is drawn
    with a local font, or as a box (tofu) when the machine has none."""
    count = browser.execute_script("""
        const holders = new Set(), walk = document.createTreeWalker(arguments[0], NodeFilter.SHOW_TEXT);
        while (walk.nextNode()) if (walk.currentNode.data.trim()) holders.add(walk.currentNode.parentElement);
        [...holders].forEach(e => e.setAttribute('data-font-probe', ''));
        return holders.size;""", element)
    try:
        browser.execute_cdp_cmd("DOM.enable", {})
        browser.execute_cdp_cmd("CSS.enable", {})
        root = browser.execute_cdp_cmd("DOM.getDocument", {})["root"]["nodeId"]
        nodes = browser.execute_cdp_cmd("DOM.querySelectorAll", {"nodeId": root, "selector": "[data-font-probe]"})
        assert len(nodes["nodeIds"]) == count > 0
        glyphs = {}
        for node in nodes["nodeIds"]:  # (the fonts of each element's own text nodes, not its children's)
            for f in browser.execute_cdp_cmd("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]:
                key = f["familyName"], f["isCustomFont"]
                glyphs[key] = glyphs.get(key, 0) + f["glyphCount"]
        return [{"familyName": name, "isCustomFont": custom, "glyphCount": n} for (name, custom), n in glyphs.items()]
    finally:
        browser.execute_script("""
            for (const e of arguments[0].querySelectorAll('[data-font-probe]')) e.removeAttribute('data-font-probe');
            arguments[0].removeAttribute('data-font-probe');""", element)


def common_hanzi(text):
    """The characters of text among the 3,755 GB2312 level-1 hanzi (the served font has every one of them)."""
    def level1(c):
        try:
            code = c.encode("gb2312")
        except UnicodeEncodeError:
            return False
        return len(code) == 2 and 0xB0 <= code[0] <= 0xD7
    return [c for c in text if HAN.match(c) and level1(c)]


def test_browser_chat_streams_and_compare_shows_three_scored_answers(app_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium() as browser:
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
        free_sampling(browser, wait, "chat")
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


def test_browser_shows_chinese_in_the_served_font(app_url, app_module):
    """This Chromium has no CJK font: the page's Chinese must come from the font the app serves (WebUI/fonts/), or it
    is tofu. A Chinese example prompt is sent in Chat until the (tiny, freely sampling) model's reply has common
    hanzi; the served font must be loaded and be the one Chromium drew the echoed prompt's and the reply's hanzi
    with. Fails when the @font-face rule, the font route or the font's place in the font-family chain is missing."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    family = app_module.FONT_FAMILY
    with chromium() as browser:
        browser.get(app_url)
        wait = WebDriverWait(browser, 90, poll_frequency=0.1)
        box = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#chat-input textarea"))
        # the example buttons: the arithmetic EXAMPLE_PROMPTS and two greetings (long ones shown cut, with "...")
        buttons = [b for b in browser.find_elements(By.CSS_SELECTOR, "button.gallery-item") if b.is_displayed()]
        shown = [b.text for b in buttons]
        assert len(shown) == len(app_module.EXAMPLES), shown
        assert all(e == s or (s.endswith("...") and e.startswith(s[:-3])) for e, s in zip(app_module.EXAMPLES, shown))
        free_sampling(browser, wait, "chat")
        chinese = [(b, e) for b, e in zip(buttons, app_module.EXAMPLES) if HAN.search(e)]
        for turn in range(8):  # a reply of the tiny model has some hanzi more often than not: a few tries
            button, prompt = chinese[turn % len(chinese)]
            button.click()
            wait.until(lambda b: box.get_attribute("value") == prompt)  # the example button fills the input box
            box.send_keys(Keys.ENTER)
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]')) == turn + 1
                       and "tokens/s" in b.find_element(By.ID, "chat-note").text)  # this reply is finished
            reply = browser.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]')[-1]
            if common_hanzi(reply.text):
                break
        else:
            pytest.fail(f"eight replies, none with a common hanzi: the last was {reply.text!r}")
        echoed = browser.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="user"]')[-1]
        assert echoed.text == prompt

        # the page's font: declared, fetched from the app and loaded, and first in line for Chinese
        faces = browser.execute_script(
            "return [...document.fonts].filter(f => f.family.replace(/[\"']/g, '') === arguments[0])"
            ".map(f => f.status)", family)
        assert faces and set(faces) == {"loaded"}, f"the page's {family!r} faces: {faces}"
        assert browser.execute_script("return document.fonts.check(`16px \"${arguments[0]}\"`, arguments[1])",
                                      family, prompt + reply.text)
        for element in (echoed, reply):
            assert family in element.value_of_css_property("font-family")

        # what Chromium drew: the prompt all in the page's own fonts (its digits in the Latin one), every hanzi of
        # both in the served font
        drawn = fonts_drawing(browser, echoed)
        assert all(f["isCustomFont"] for f in drawn), f"{prompt!r} partly drawn in the machine's fonts: {drawn}"
        served = [f for f in drawn if f["familyName"] == FONT_NAME and f["isCustomFont"]]
        assert served and served[0]["glyphCount"] == sum(not c.isascii() for c in prompt), drawn
        hanzi = common_hanzi(reply.text)
        drawn = fonts_drawing(browser, reply)
        served = [f for f in drawn if f["familyName"] == FONT_NAME and f["isCustomFont"]]
        assert served and served[0]["glyphCount"] >= len(hanzi), (reply.text, drawn)  # (and its other CJK characters)
        SCREENSHOT.parent.mkdir(exist_ok=True)
        browser.execute_script("arguments[0].scrollIntoView()", reply)
        browser.save_screenshot(str(SCREENSHOT.with_name("chinese.png")))

        requested = {json.loads(e["message"])["message"].get("params", {}).get("request", {}).get("url", "")
                     for e in browser.get_log("performance")}
        assert f"{app_url}/{app_module.FONT_URL}" in requested  # from the app, nowhere else
        outside = [u for u in requested if u and not u.startswith((app_url, "data:", "blob:", "ws://127.0.0.1"))]
        assert not outside, f"the page fetched from other hosts: {outside}"


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
        # (the smoke base ends a chat reply at its first token ~1% of the time)
        out = ask_until(lambda: c.predict(ARITH, *FREE_SAMPLING, 16, api_name="/compare"), lambda out: out[0].strip())
        assert out[0].strip() and out[1:3] == ("", "")  # the base answers; SFT and GRPO are explained instead
        assert "no reward-model score (no reward model in" in out[3] and "python RLHF/reward_model.py" in out[3]
        assert "different base" in out[4] and "train it with `python RLHF/grpo_trl.py`" in out[5]
        status, loss, report, tokenizer = c.predict(api_name="/training")
        assert "history.jsonl` is missing: run `python RLHF/grpo_trl.py`" in status
        assert "metrics.json` is missing: run `python report/build_report.py`" in status
        assert loss and tokenizer and report is None
        text, _ = ask_until(lambda: c.predict("Once upon a time", *FREE_SAMPLING, 8, api_name="/complete"),
                            lambda out: len(out[0]) > len("Once upon a time"))
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


def retrain_tokenizer(root, other_tokenizer_dir):
    """Make root/tokenizer/ look retrained after the models: another tokenizer.json, with its own report.json."""
    shutil.copy(other_tokenizer_dir / "tokenizer.json", root / "tokenizer" / "tokenizer.json")
    report = json.loads((root / "tokenizer" / "report.json").read_text(encoding="utf-8"))
    report.update(vocab_size=600, fingerprint=tokenizer_fingerprint(root / "tokenizer"))
    (root / "tokenizer" / "report.json").write_text(json.dumps(report))


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
