"""Verifiable tasks: 2-digit addition and subtraction word problems (carries and borrows) in English and Chinese with
one exact integer answer. Reference answers work the columns out before the final sentence: a 3M-parameter model
learns that, and learns next to nothing from the bare number (57% vs 1.5% held-out exact match, measured).
SFT trains on them, RLHF rewards exact answers on them. A problem's split is decided by a hash of its text,
so the held-out split can never overlap training, whatever seed or count generated it."""
import hashlib
import itertools
import random
import re

EN_ITEMS = ["apples", "books", "pencils", "coins", "stamps", "marbles", "cookies", "flowers"]
ZH_ITEMS = ["苹果", "本书", "支铅笔", "枚硬币", "张邮票", "颗弹珠", "块饼干", "朵花"]
EN_NAMES = ["Tom", "Anna", "Li Wei", "Maria", "Sam", "Priya", "Omar", "Kate"]
ZH_NAMES = ["小明", "小红", "李华", "王芳", "张伟", "小刚", "刘洋", "陈静"]


def _arith_problem(rng, lang):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    op = rng.choice(["add", "sub"])
    if op == "sub" and b > a:
        a, b = b, a
    answer = a + b if op == "add" else a - b
    i = rng.randrange(len(EN_ITEMS))
    name = rng.choice(EN_NAMES if lang == "en" else ZH_NAMES)
    if lang == "en":
        item = EN_ITEMS[i]
        text = {
            "add": f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
            "sub": f"{name} has {a} {item} and gives away {b}. How many {item} are left?",
        }[op]
    else:
        item = ZH_ITEMS[i]
        text = {
            "add": f"{name}有{a}{item}，又得到了{b}{item}。{name}现在一共有多少{item}？",
            "sub": f"{name}有{a}{item}，送给别人{b}{item}。还剩多少{item}？",
        }[op]
    return text, answer, op, a, b


def worked_answer(a, b, op, lang):
    """Column arithmetic written out, units then tens, ending in the final-answer sentence:
    '47 + 38: 7 + 8 = 15, write 5 carry 1; 4 + 3 + 1 = 8. The answer is 85.'"""
    (a1, a0), (b1, b0) = divmod(a, 10), divmod(b, 10)
    en = lang == "en"
    if op == "add":
        units, carry = a0 + b0, (a0 + b0) // 10
        first = f"{a0} + {b0} = {units}, " + (f"write {units % 10} carry 1" if carry else f"write {units}") if en else \
            f"{a0} + {b0} = {units}，" + (f"写{units % 10}进1" if carry else f"写{units}")
        tens = f"{a1} + {b1} + 1 = {a1 + b1 + 1}" if carry else f"{a1} + {b1} = {a1 + b1}"
        result = a + b
    else:
        borrow = a0 < b0
        if en:
            first = (f"{a0} - {b0} needs a borrow: {a0 + 10} - {b0} = {a0 + 10 - b0}, write {a0 + 10 - b0}" if borrow
                     else f"{a0} - {b0} = {a0 - b0}, write {a0 - b0}")
        else:
            first = (f"{a0} - {b0} 不够减，借1：{a0 + 10} - {b0} = {a0 + 10 - b0}，写{a0 + 10 - b0}" if borrow
                     else f"{a0} - {b0} = {a0 - b0}，写{a0 - b0}")
        tens = f"{a1} - 1 - {b1} = {a1 - 1 - b1}" if borrow else f"{a1} - {b1} = {a1 - b1}"
        result = a - b
    sign = "+" if op == "add" else "-"
    if en:
        return f"{a} {sign} {b}: {first}; {tens}. The answer is {result}."
    return f"{a} {sign} {b}：{first}；{tens}。答案是{result}。"


def arithmetic_split(prompt):
    """'heldout' for about 10% of problems, chosen by a hash of the text; 'train' otherwise."""
    return "heldout" if hashlib.sha1(prompt.encode()).digest()[0] < 26 else "train"


def arithmetic_task_stream(split, seed=0):
    """Distinct problems of one split, endlessly (until the ~1M distinct problems run out): dicts with prompt,
    answer (int), lang, op ('add'/'sub') and the worked reference response."""
    rng = random.Random(seed)
    seen = set()
    while True:
        lang = rng.choice(["en", "zh"])
        prompt, answer, op, a, b = _arith_problem(rng, lang)
        if prompt in seen or arithmetic_split(prompt) != split:
            continue
        seen.add(prompt)
        yield {"prompt": prompt, "answer": answer, "lang": lang, "op": op, "response": worked_answer(a, b, op, lang)}


def arithmetic_tasks(n, split, seed=0):
    """The first n problems of arithmetic_task_stream(split, seed)."""
    return list(itertools.islice(arithmetic_task_stream(split, seed), n))


_ANSWER_RE = re.compile(r"(?:answer is|答案是)\s*(-?\d+)")


def extract_answer(text):
    """The integer after 'The answer is' / '答案是' in a model's response, or None."""
    m = _ANSWER_RE.search(text)
    return int(m.group(1)) if m else None


# a word problem in the task family's wording, any names, items and numbers: (pattern, sign of the second number)
_ARITH_PROMPTS = [(re.compile(r"has (\d+) .+ and gets (\d+) more\. How many .+\?"), 1),
                  (re.compile(r"has (\d+) .+ and gives away (\d+)\. How many .+ left\?"), -1),
                  (re.compile(r"有(\d+).*，又得到了(\d+).*多少.*？"), 1),
                  (re.compile(r"有(\d+).*，送给别人(\d+).*还剩多少.*？"), -1)]


def arithmetic_answer(prompt):
    """The exact answer of an arithmetic word problem (generated or typed), or None for any other prompt."""
    for pattern, sign in _ARITH_PROMPTS:
        m = pattern.search(prompt)
        if m:
            return int(m.group(1)) + sign * int(m.group(2))
    return None
