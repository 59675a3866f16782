"""Verifiable tasks: addition and subtraction of whole numbers 0-99 (any mix of one- and two-digit operands, no
negative results) in English and Chinese, in many wordings: word problems of several shapes (names, items, verbs and
places varied) and bare expressions as people type them ("What is 47 + 38?", "47 + 38 = ?", "47加38等于多少？").
Reference answers work the columns out before the final sentence: a 3M-parameter model learns that, and learns next
to nothing from the bare number (57% vs 1.5% held-out exact match, measured).

Three splits, so that a score means the skill and not memory:
  train             problems in the trained wordings (SFT, mid-training, the reward model and GRPO train on these)
  heldout           other problems in the trained wordings, never trained on (a hash of the text decides)
  heldout_wordings  problems in wordings (whole templates) no training stage ever sees
SFT trains on them, RLHF rewards exact answers on them. Training problems can also come in COMPOSED wordings
(sentence parts combined: SFT's problems), which no evaluation asks."""
import hashlib
import itertools
import random
import re

SPLITS = ("train", "heldout", "heldout_wordings")
LANGS, OPS = ("en", "zh"), ("add", "sub")
DIGITS = ("22", "21", "11")  # both operands two-digit, one of them one-digit, both one-digit
DIGITS_NAMES = {"22": "both 2-digit", "21": "one 1-digit", "11": "both 1-digit"}
TRAIN_DIGITS_WEIGHTS = (0.5, 0.3, 0.2)  # training leans to the harder, more numerous two-digit problems

EN_ITEMS = ["apples", "books", "pencils", "coins", "stamps", "marbles", "cookies", "flowers", "cards", "balloons",
            "stickers", "eggs", "shells", "toy cars", "bottles", "candies"]
ZH_ITEMS = [("个", "苹果"), ("本", "书"), ("支", "铅笔"), ("枚", "硬币"), ("张", "邮票"), ("颗", "弹珠"), ("块", "饼干"),
            ("朵", "花"), ("张", "卡片"), ("个", "气球"), ("只", "小鸟"), ("个", "鸡蛋"), ("条", "鱼"), ("辆", "玩具车"),
            ("瓶", "水"), ("颗", "糖")]
EN_NAMES = ["Tom", "Anna", "Li Wei", "Maria", "Sam", "Priya", "Omar", "Kate", "Ben", "Lucy", "Carlos", "Mei",
            "Jack", "Sara", "Ravi", "Emma"]
ZH_NAMES = ["小明", "小红", "李华", "王芳", "张伟", "小刚", "刘洋", "陈静", "小丽", "王强", "赵敏", "小军", "妈妈",
            "爷爷", "老师", "小兰"]
EN_PLACES = ["box", "basket", "bag", "jar", "classroom", "garden"]
ZH_PLACES = ["盒子", "篮子", "书包", "罐子", "教室", "花园"]
EN_GAINED = ["bought", "found", "picked up", "was given", "won", "made"]  # verbs of the varied templates
EN_LOST = ["lost", "sold", "ate", "used", "gave away", "broke"]
ZH_GAINED = ["买了", "捡到了", "收到了", "做了", "赢了"]
ZH_LOST = ["用掉了", "吃了", "卖了", "弄丢了", "送出了"]
EN_SIGNS = {"add": "+", "sub": "-"}
ZH_SIGNS = {"add": "加", "sub": "减"}

# (lang, op, template, held out?): word problems and bare expressions; op None means either, written with {s}
# (the sign: + / - in English, 加 / 减 in Chinese, or +/- where the template says {sign}). Slots: {a} {b} the
# operands, {name} {name2} people, {items} / {cl}{item} things (Chinese with their measure word), {place}, and verbs
# {gained} {lost} {zh_gained} {zh_lost}.
# Some templates of each language, word problems and bare expressions alike, are held out whole.
TEMPLATES = [
    # English additions
    ("en", "add", "{name} has {a} {items} and gets {b} more. How many {items} does {name} have now?", False),
    ("en", "add", "{name} had {a} {items}. Then {name} {gained} {b} more. How many {items} does {name} have now?", False),
    ("en", "add", "There are {a} {items} in the {place}. Someone puts in {b} more. How many {items} are in the "
                  "{place} now?", False),
    ("en", "add", "A shop had {a} {items} and received {b} more. How many {items} does the shop have now?", False),
    ("en", "add", "{name} has {a} {items}. {name2} has {b} {items}. How many {items} do they have altogether?", False),
    ("en", "add", "{name} found {a} {items} in the morning and {b} in the afternoon. How many {items} did {name} find "
                  "in all?", False),
    ("en", "add", "There were {a} people on a bus. At the next stop {b} more got on. How many people are on the bus "
                  "now?", False),
    ("en", "add", "{name} read {a} pages yesterday and {b} pages today. How many pages did {name} read?", False),
    ("en", "add", "How many {items} are there if a {place} holds {a} and another holds {b}?", False),
    ("en", "add", "{name} scored {a} points in the first game and {b} points in the second. What is the total "
                  "score?", False),
    ("en", "add", "{name} walked {a} steps, rested, then walked {b} more steps. How many steps in all?", False),
    ("en", "add", "If you have {a} {items} and someone gives you {b} more, how many {items} do you have?", True),
    ("en", "add", "{name} collected {a} {items} last week and {b} {items} this week. What is the total number of "
                  "{items}?", True),
    # English subtractions
    ("en", "sub", "{name} has {a} {items} and gives away {b}. How many {items} are left?", False),
    ("en", "sub", "{name} had {a} {items} and {lost} {b} of them. How many {items} does {name} have left?", False),
    ("en", "sub", "There are {a} {items} in the {place}. {name} takes out {b}. How many {items} are left in the "
                  "{place}?", False),
    ("en", "sub", "A shop had {a} {items} and sold {b}. How many {items} are left?", False),
    ("en", "sub", "{name} has {a} {items}. {name2} has {b} {items}. How many more {items} does {name} have than "
                  "{name2}?", False),
    ("en", "sub", "{name} needs {a} {items} and already has {b}. How many more {items} does {name} need?", False),
    ("en", "sub", "There were {a} people on a bus. At the next stop {b} got off. How many people are still on the "
                  "bus?", False),
    ("en", "sub", "A book has {a} pages. {name} has read {b} of them. How many pages are left to read?", False),
    ("en", "sub", "{name} is {a} years old and {name2} is {b}. How much older is {name}?", False),
    ("en", "sub", "{name} picked {a} {items} and handed {b} of them to {name2}. How many {items} does {name} "
                  "still have?", False),
    ("en", "sub", "Start with {a} and remove {b}. What number is left?", False),
    ("en", "sub", "If you have {a} {items} and you use {b} of them, how many {items} remain?", True),
    ("en", "sub", "{name} bought {a} {items}, then gave {b} to {name2}. How many {items} does {name} keep?", True),
    # English bare expressions
    ("en", None, "What is {a} {s} {b}?", False),
    ("en", None, "{a} {s} {b} = ?", False),
    ("en", None, "Calculate {a} {s} {b}.", False),
    ("en", None, "{a}{s}{b}=?", False),
    ("en", None, "What's {a}{s}{b}?", False),
    ("en", "add", "What is {a} plus {b}?", False),
    ("en", "sub", "What is {a} minus {b}?", False),
    ("en", "add", "What is the sum of {a} and {b}?", False),
    ("en", "sub", "Subtract {b} from {a}.", False),
    ("en", None, "{a} {s} {b}", False),
    ("en", None, "Solve: {a} {s} {b}", False),
    ("en", None, "Can you tell me what {a} {s} {b} is?", False),
    ("en", "add", "What is {a} added to {b}?", False),
    ("en", "sub", "What is {a} take away {b}?", False),
    ("en", None, "Compute {a} {s} {b}.", False),
    ("en", None, "Find {a} {s} {b}.", False),
    ("en", None, "Evaluate {a} {s} {b}, please.", False),
    ("en", "add", "Find the total of {a} and {b}.", False),
    ("en", "sub", "Find the difference between {a} and {b}.", False),
    ("en", None, "How much is {a} {s} {b}?", True),
    ("en", None, "Please work out {a} {s} {b}.", True),
    ("en", "add", "Add {a} and {b}.", True),
    ("en", "sub", "What do you get if you take {b} away from {a}?", True),
    # Chinese additions
    ("zh", "add", "{name}有{a}{cl}{item}，又得到了{b}{cl}{item}。{name}现在一共有多少{cl}{item}？", False),
    ("zh", "add", "{name}有{a}{cl}{item}，又{zh_gained}{b}{cl}。{name}现在有多少{cl}{item}？", False),
    ("zh", "add", "{place}里有{a}{cl}{item}，又放进去{b}{cl}。{place}里现在有多少{cl}{item}？", False),
    ("zh", "add", "商店有{a}{cl}{item}，又运来了{b}{cl}。商店现在有多少{cl}{item}？", False),
    ("zh", "add", "{name}有{a}{cl}{item}，{name2}有{b}{cl}{item}。他们一共有多少{cl}{item}？", False),
    ("zh", "add", "车上有{a}人，到站后又上来了{b}人。车上现在有多少人？", False),
    ("zh", "add", "{name}昨天看了{a}页书，今天看了{b}页。{name}两天一共看了多少页？", False),
    ("zh", "add", "{place}里有{a}{cl}{item}和{b}{cl}别的东西，一共有多少{cl}？", False),
    ("zh", "add", "{name}早上摘了{a}{cl}{item}，晚上又摘了{b}{cl}，一共摘了多少{cl}？", False),
    ("zh", "add", "{name}上午拿到{a}{cl}{item}，下午又拿到{b}{cl}。{name}今天总共拿到几{cl}{item}？", True),
    ("zh", "add", "一个{place}里原来有{a}{cl}{item}，后来增加了{b}{cl}，现在共有多少{cl}？", True),
    # Chinese subtractions
    ("zh", "sub", "{name}有{a}{cl}{item}，送给别人{b}{cl}{item}。还剩多少{cl}{item}？", False),
    ("zh", "sub", "{name}有{a}{cl}{item}，{zh_lost}{b}{cl}。{name}还剩多少{cl}{item}？", False),
    ("zh", "sub", "{place}里有{a}{cl}{item}，{name}拿走了{b}{cl}。{place}里还剩多少{cl}{item}？", False),
    ("zh", "sub", "商店有{a}{cl}{item}，卖出了{b}{cl}。还剩多少{cl}{item}？", False),
    ("zh", "sub", "{name}有{a}{cl}{item}，{name2}有{b}{cl}{item}。{name}比{name2}多多少{cl}？", False),
    ("zh", "sub", "车上有{a}人，到站后下去了{b}人。车上还有多少人？", False),
    ("zh", "sub", "一本书有{a}页，{name}已经看了{b}页。还有多少页没看？", False),
    ("zh", "sub", "{name}今年{a}岁，{name2}今年{b}岁。{name}比{name2}大几岁？", False),
    ("zh", "sub", "{name}有{a}{cl}{item}，分了{b}{cl}给{name2}，{name}还有多少{cl}？", False),
    ("zh", "sub", "{name}做了{a}{cl}{item}，吃掉{b}{cl}，剩下多少{cl}？", False),
    ("zh", "sub", "{place}里本来有{a}{cl}{item}，拿出{b}{cl}之后，还有多少{cl}？", False),
    ("zh", "sub", "{name}原来有{a}{cl}{item}，丢了{b}{cl}以后，还有几{cl}{item}？", True),
    ("zh", "sub", "一共有{a}{cl}{item}，分给{name}{b}{cl}，剩下多少{cl}？", True),
    # Chinese bare expressions
    ("zh", None, "{a}{s}{b}等于多少？", False),
    ("zh", None, "计算{a}{s}{b}。", False),
    ("zh", None, "{a} {sign} {b} = ？", False),
    ("zh", None, "{a}{sign}{b}等于几？", False),
    ("zh", "add", "{a}和{b}的和是多少？", False),
    ("zh", "sub", "{a}减去{b}得多少？", False),
    ("zh", None, "{a}{s}{b}是多少？", False),
    ("zh", None, "{a} {sign} {b}", False),
    ("zh", None, "算一算：{a}{sign}{b}", False),
    ("zh", "add", "{a}加上{b}是多少？", False),
    ("zh", "sub", "从{a}里减去{b}，得多少？", False),
    ("zh", None, "帮我算算{a}{s}{b}。", False),
    ("zh", "add", "{a}与{b}的和是多少？", False),
    ("zh", "sub", "{a}和{b}相差多少？", False),
    ("zh", "sub", "{a}与{b}的差是多少？", False),
    ("zh", None, "请算一下{a}{s}{b}。", True),
    ("zh", None, "{a}{sign}{b}的结果是什么？", True),
    ("zh", "sub", "{a}比{b}多多少？", True),
]


# Composed wordings, trained only (SFT's problems: arithmetic_tasks(..., composed_share)): a setup sentence with {a},
# an event sentence with {b} that alone decides the operation and a question that fits either (word problems); an
# opener and an expression around a sign (bare expressions). Each question comes with both operations, so that the
# event's verb or the sign decides, not the template (SFT's errors in held-out wordings: the wrong operation or
# operands in ~35% of replies, wrong columns in ~5%).
EN_SETUPS = {"person": ["{name} has {a} {items}.", "{name} had {a} {items}.", "{name} bought {a} {items}.",
                        "{name} made {a} {items}.", "{name} started with {a} {items}.", "{name} owns {a} {items}."],
             "place": ["There are {a} {items} in the {place}.", "A {place} holds {a} {items}.",
                       "The {place} had {a} {items}."]}
EN_EVENTS = {("person", "add"): ["Then {name} {gained} {b} more.", "{name2} gives {name} {b} more.",
                                 "Later {name} gets {b} more.", "After that {name} adds {b} more."],
             ("person", "sub"): ["Then {name} {lost} {b} of them.", "{name} gives {b} to {name2}.",
                                 "Later {name} uses {b} of them.", "After that {name} gives away {b}."],
             ("place", "add"): ["Someone puts in {b} more.", "Then {b} more are added.", "{name} puts {b} more in."],
             ("place", "sub"): ["{name} takes out {b}.", "Then {b} are taken out.", "{b} of them are removed."]}
EN_QUESTIONS = {"person": ["How many {items} does {name} have now?", "How many does {name} have in the end?",
                           "How many {items} now?", "Now how many {items} does {name} have?"],
                "place": ["How many {items} are in the {place} now?", "How many {items} are there now?",
                          "How many are in the {place} in the end?"]}
ZH_SETUPS = {"person": ["{name}有{a}{cl}{item}，", "{name}原来有{a}{cl}{item}，", "{name}买了{a}{cl}{item}，",
                        "{name}做了{a}{cl}{item}，", "{name}手里有{a}{cl}{item}，"],
             "place": ["{place}里有{a}{cl}{item}，", "{place}里放着{a}{cl}{item}，"]}
ZH_EVENTS = {("person", "add"): ["又{zh_gained}{b}{cl}。", "{name2}又给了{name}{b}{cl}。", "后来又得到{b}{cl}。",
                                 "又多了{b}{cl}。"],
             ("person", "sub"): ["{zh_lost}{b}{cl}。", "送给{name2}{b}{cl}。", "后来少了{b}{cl}。", "又用去{b}{cl}。"],
             ("place", "add"): ["又放进去{b}{cl}。", "{name}又放了{b}{cl}进去。"],
             ("place", "sub"): ["{name}拿走了{b}{cl}。", "又拿出了{b}{cl}。"]}
ZH_QUESTIONS = {"person": ["{name}现在有多少{cl}{item}？", "现在有几{cl}？", "{name}最后有多少{cl}？"],
                "place": ["{place}里现在有多少{cl}？", "现在{place}里有几{cl}{item}？"]}
EN_OPENERS = ["", "Hi! ", "Quick question: ", "Hey, ", "Math help: ", "Can you do this? "]
EN_EXPRESSIONS = ["What is {a} {sign} {b}?", "{a} {sign} {b} = ?", "{a}{sign}{b}", "what's {a} {sign} {b}",
                  "{a} {sign} {b} equals?", "What is {a} {word} {b}?", "{a} {word} {b} = ?"]
ZH_OPENERS = ["", "你好，", "请问", "问一下：", "老师，", "帮个忙，"]
ZH_EXPRESSIONS = ["{a}{s}{b}等于多少？", "{a}{sign}{b}=？", "{a}{s}{b}得几？", "{a}{sign}{b}等于几？", "{a}{s}{b}是几？"]
EN_WORDS = {"add": "plus", "sub": "minus"}


def with_sign(lang, op, template):
    """The template with its sign slots filled for op: {s} (+/- in English, 加/减 in Chinese), {sign} (+/-), {word}
    (plus/minus)."""
    signs = EN_SIGNS if lang == "en" else ZH_SIGNS
    return template.replace("{s}", signs[op]).replace("{sign}", EN_SIGNS[op]).replace("{word}", EN_WORDS[op])


def _composed_templates():
    """[(lang, op, template)] of every composed wording."""
    out = []
    for lang, setups, events, questions, join in (("en", EN_SETUPS, EN_EVENTS, EN_QUESTIONS, " "),
                                                  ("zh", ZH_SETUPS, ZH_EVENTS, ZH_QUESTIONS, "")):
        for kind, op in itertools.product(setups, OPS):
            out += [(lang, op, join.join(parts)) for parts in
                    itertools.product(setups[kind], events[(kind, op)], questions[kind])]
    for lang, openers, expressions in (("en", EN_OPENERS, EN_EXPRESSIONS), ("zh", ZH_OPENERS, ZH_EXPRESSIONS)):
        out += [(lang, op, with_sign(lang, op, o + e))
                for op in OPS for o, e in itertools.product(openers, expressions)]
    return out


COMPOSED = _composed_templates()


def _expanded_templates():
    """TEMPLATES with each either-op template as one per op: [(lang, op, template, held out)]."""
    return [(lang, o, with_sign(lang, o, text), held_out) for lang, op, text, held_out in TEMPLATES
            for o in (OPS if op is None else (op,))]


WORDINGS = _expanded_templates()


def wordings(lang, op, held_out):
    return [t for la, o, t, h in WORDINGS if la == lang and o == op and h == held_out]


def operands(rng, op, digits):
    """(a, b) for one op and digits class, with a >= b for subtraction (no negative results)."""
    one, two = (lambda: rng.randint(0, 9)), (lambda: rng.randint(10, 99))
    if digits == "22":
        a, b = two(), two()
    elif digits == "11":
        a, b = one(), one()
    else:
        a, b = two(), one()
        if op == "add" and rng.random() < 0.5:
            a, b = b, a
    if op == "sub" and b > a:
        a, b = b, a
    return a, b


def digits_class(a, b):
    return "22" if min(a, b) >= 10 else "11" if max(a, b) < 10 else "21"


def fill(rng, template, lang, a, b):
    """A template with its slots filled: the operands, and names, items and places drawn from rng."""
    names = rng.sample(EN_NAMES if lang == "en" else ZH_NAMES, 2)
    cl, item = rng.choice(ZH_ITEMS)
    return template.format(a=a, b=b, name=names[0], name2=names[1], items=rng.choice(EN_ITEMS), cl=cl, item=item,
                           place=rng.choice(EN_PLACES if lang == "en" else ZH_PLACES), gained=rng.choice(EN_GAINED),
                           lost=rng.choice(EN_LOST), zh_gained=rng.choice(ZH_GAINED), zh_lost=rng.choice(ZH_LOST))


def worked_answer(a, b, op, lang):
    """Column arithmetic written out, units then tens (a one-digit operand has tens digit 0), ending in the
    final-answer sentence: '47 + 38: 7 + 8 = 15, write 5 carry 1; 4 + 3 + 1 = 8. The answer is 85.'"""
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


# What users meet first (README, inference scripts, web UI, report card): each language's word problem with a one-digit
# operand and bare expression. Held out (arithmetic_split), so that a right answer shows the skill, not memory.
EXAMPLE_PROMPTS = [
    "Tom has 3 apples and gets 4 more. How many apples does Tom have now?",
    "Anna has 43 apples and gets 9 more. How many apples does Anna have now?",
    "A shop had 54 bottles and sold 25. How many bottles are left?",
    "What is 29 + 82?",
    "小明有25本书，送给别人8本书。还剩多少本书？",
    "39加15等于多少？",
    "6加7等于多少？",
]


def arithmetic_split(prompt):
    """Of a problem in a trained wording: 'heldout' for about 10% of problems, chosen by a hash of the text, and for
    the EXAMPLE_PROMPTS; 'train' otherwise."""
    return "heldout" if prompt in EXAMPLE_PROMPTS or hashlib.sha1(prompt.encode()).digest()[0] < 26 else "train"


def arithmetic_task_stream(split, seed=0, digits_weights=None, composed_share=0.0):
    """Distinct problems of one split (SPLITS), endlessly: dicts with prompt, answer (int), lang, op ('add'/'sub'),
    digits (DIGITS), a, b and the worked reference response. Language, op and wording are drawn uniformly (for train,
    a COMPOSED wording with probability composed_share, else one of the TEMPLATES' trained wordings); the
    digits class with digits_weights (default: TRAIN_DIGITS_WEIGHTS for train, uniform for the held-out splits, so
    every language x op x digits cell of an evaluation has its share)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    weights = digits_weights or (TRAIN_DIGITS_WEIGHTS if split == "train" else (1, 1, 1))
    held_out = split == "heldout_wordings"
    rng = random.Random(f"{split}/{seed}")
    seen = set()
    while True:
        lang, op = rng.choice(LANGS), rng.choice(OPS)
        digits = rng.choices(DIGITS, weights)[0]
        if split == "train" and composed_share and rng.random() < composed_share:  # no draw at 0: the same stream
            template = rng.choice([t for la, o, t in COMPOSED if la == lang and o == op])
        else:
            template = rng.choice(wordings(lang, op, held_out))
        a, b = operands(rng, op, digits)
        prompt = fill(rng, template, lang, a, b)
        if prompt in seen or (not held_out and arithmetic_split(prompt) != split):
            continue
        seen.add(prompt)
        yield {"prompt": prompt, "answer": a + b if op == "add" else a - b, "lang": lang, "op": op,
               "digits": digits_class(a, b), "a": a, "b": b, "response": worked_answer(a, b, op, lang)}


def arithmetic_tasks(n, split, seed=0, digits_weights=None, composed_share=0.0):
    """The first n problems of arithmetic_task_stream(split, seed)."""
    return list(itertools.islice(arithmetic_task_stream(split, seed, digits_weights, composed_share), n))


def cell(task):
    """The evaluation cell of a task: 'en add 21' (language, operation, digits class)."""
    return f"{task['lang']} {task['op']} {task['digits']}"


_ANSWER_RE = re.compile(r"(?:answer is|答案是)\s*(-?\d+)")


def extract_answer(text):
    """The integer after 'The answer is' / '答案是' in a model's response, or None."""
    m = _ANSWER_RE.search(text)
    return int(m.group(1)) if m else None


_VERBS = {"gained": EN_GAINED, "lost": EN_LOST, "zh_gained": ZH_GAINED, "zh_lost": ZH_LOST}


def _template_pattern(template):
    """A regex for a filled template: the operands captured, other slots any text, spaces optional."""
    parts = re.split(r"(\{\w+\})", template.rstrip("?？.。= "))
    out = []
    for part in parts:
        if part in ("{a}", "{b}"):
            out.append(rf"(?P<{part[1]}>\d+)")
        elif part[1:-1] in _VERBS:  # the verbs decide the operation: only the listed ones match
            out.append("(?:" + "|".join(map(re.escape, _VERBS[part[1:-1]])) + ")")
        elif part.startswith("{"):
            out.append(r".+?")
        else:
            out.append(r"\s*".join(map(re.escape, part.split(" "))))
    return re.compile("".join(out) + r"[\s=?？.。]*$")


_PATTERNS = [(_template_pattern(t), op) for _, op, t, *_ in WORDINGS + COMPOSED]
_HELD_OUT_PATTERNS = [_template_pattern(t) for _, _, t, held_out in WORDINGS if held_out]
# a bare expression as typed, anywhere in the prompt: '47+38', '47 - 38', '47加38', '47减去38'
_EXPRESSION = re.compile(r"(\d+)\s*(\+|-|−|加上?|减去?)\s*(\d+)")


def problem_split(prompt):
    """The split a problem's text belongs to: 'heldout_wordings' if it is in a held-out wording, else
    arithmetic_split's ('train' or 'heldout')."""
    if any(p.search(prompt.strip()) for p in _HELD_OUT_PATTERNS):
        return "heldout_wordings"
    return arithmetic_split(prompt)


def arithmetic_answer(prompt):
    """The exact answer of an arithmetic problem in one of the task family's wordings (generated or typed, any names,
    items and numbers) or a bare 'a + b' / 'a - b' / 'a加b' / 'a减b' expression, or None for any other prompt."""
    prompt = prompt.strip()
    for pattern, op in _PATTERNS:
        m = pattern.search(prompt)
        if m:
            a, b = int(m.group("a")), int(m.group("b"))
            return a + b if op == "add" else a - b
    m = _EXPRESSION.search(prompt)
    if m:
        a, b = int(m.group(1)), int(m.group(3))
        return a + b if m.group(2) in ("+", "加", "加上") else a - b
    return None


def evaluation_tasks(n_per_split, seed=0):
    """The held-out problems an evaluation asks: n_per_split of each held-out split, each task with its 'split'."""
    return [dict(t, split=split) for split in SPLITS[1:] for t in arithmetic_tasks(n_per_split, split, seed)]


def exact_match_scores(tasks, said):
    """Exact match of the answers said (ints or None, or a fraction right, one per task of evaluation_tasks) per
    held-out split, and per
    language x op x digits cell within each split and over both: {split or 'both': {"exact_match", "n",
    "by_cell": {cell: accuracy}}}."""
    groups = {}
    for t, answer in zip(tasks, said):
        for split in (t["split"], "both"):
            right = answer if isinstance(answer, float) else float(answer == t["answer"])
            groups.setdefault(split, {}).setdefault(t.get("cell") or cell(t), []).append(right)
    out = {}
    for split, cells in groups.items():
        flat = [ok for oks in cells.values() for ok in oks]
        out[split] = {"exact_match": round(sum(flat) / len(flat), 4), "n": len(flat),
                      "by_cell": {c: round(sum(v) / len(v), 4) for c, v in sorted(cells.items())}}
    return out

