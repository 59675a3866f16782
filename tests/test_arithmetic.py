"""The arithmetic task family (llm_train/arithmetic.py): problems, splits, answers, scores."""
import random
import re

import pytest

from llm_train.arithmetic import (
    COMPOSED,
    DIGITS,
    EXAMPLE_PROMPTS,
    SPLITS,
    WORDINGS,
    arithmetic_answer,
    arithmetic_split,
    arithmetic_tasks,
    cell,
    evaluation_tasks,
    exact_match_scores,
    extract_answer,
    fill,
    problem_split,
    worked_answer,
)
from llm_train.rl import paired_bootstrap_error_reduction


@pytest.mark.parametrize("split", SPLITS)
def test_every_problem_is_right_in_range_and_in_its_split(split):
    tasks = arithmetic_tasks(3000, split, seed=5)
    assert len({t["prompt"] for t in tasks}) == len(tasks)
    for t in tasks:
        assert 0 <= t["a"] <= 99 and 0 <= t["b"] <= 99 and t["answer"] >= 0
        assert t["answer"] == (t["a"] + t["b"] if t["op"] == "add" else t["a"] - t["b"])
        assert extract_answer(t["response"]) == t["answer"]
        assert arithmetic_answer(t["prompt"]) == t["answer"], t["prompt"]  # every wording is recognized when typed
        assert problem_split(t["prompt"]) == split, t["prompt"]  # held-out wordings never leak into training
    # every language x op x digits cell occurs (subtraction has no '1-digit minus 2-digit' without going negative)
    assert {(t["lang"], t["op"], t["digits"]) for t in tasks} == {(la, op, d) for la in ("en", "zh")
                                                                  for op in ("add", "sub") for d in DIGITS}


def test_held_out_wordings_are_whole_templates_of_both_kinds_in_both_languages():
    held = [(lang, text) for lang, _, text, held_out in WORDINGS if held_out]
    trained = {text for _, _, text, held_out in WORDINGS if not held_out}
    assert not trained & {text for _, text in held}
    for lang in ("en", "zh"):
        texts = [t for la, t in held if la == lang]
        assert any("{name}" in t for t in texts) and any("{name}" not in t and "{items}" not in t and "{item}" not in t
                                                        for t in texts), texts  # word problems and bare expressions


def test_composed_wordings_are_trained_answered_and_each_shape_comes_with_both_operations():
    """Every composed wording, filled, is read back with its own answer and is no held-out wording; every question
    (a word problem's last sentence, a bare expression with its sign masked) is asked of both operations, so only the
    event or the sign tells which."""
    rng, a, b = random.Random(0), 57, 8
    by_shape = {}
    for lang, op, template in COMPOSED:
        prompt = fill(rng, template, lang, a, b)
        assert arithmetic_answer(prompt) == (a + b if op == "add" else a - b), prompt
        assert problem_split(prompt) != "heldout_wordings", prompt
        question = re.split(r"(?<=[.。])\s*(?=.)", template)[-1]  # the last sentence, its sign masked
        by_shape.setdefault((lang, re.sub(r"[+-]|plus|minus|加|减", "~", question)), set()).add(op)
    assert all(ops == {"add", "sub"} for ops in by_shape.values()), by_shape


def test_one_digit_operands_work_their_columns_the_same_way():
    assert worked_answer(43, 9, "add", "en") == "43 + 9: 3 + 9 = 12, write 2 carry 1; 4 + 0 + 1 = 5. The answer is 52."
    assert worked_answer(3, 4, "add", "en") == "3 + 4: 3 + 4 = 7, write 7; 0 + 0 = 0. The answer is 7."
    assert worked_answer(25, 8, "sub", "zh") == "25 - 8：5 - 8 不够减，借1：15 - 8 = 7，写7；2 - 1 - 0 = 1。答案是17。"


def test_the_examples_users_see_are_held_out_and_cover_one_digit_operands_and_bare_expressions():
    trained = {t["prompt"] for t in arithmetic_tasks(20000, "train", seed=0)}
    assert all(arithmetic_split(p) == "heldout" and p not in trained for p in EXAMPLE_PROMPTS)
    assert all(arithmetic_answer(p) is not None for p in EXAMPLE_PROMPTS)
    for zh in (False, True):
        prompts = [p for p in EXAMPLE_PROMPTS if bool(re.search(r"[\u4e00-\u9fff]", p)) == zh]
        numbers = [list(map(int, re.findall(r"\d+", p))) for p in prompts]
        assert any(min(n) < 10 for n in numbers)  # a one-digit operand
        assert any(len(re.sub(r"\d+|[+\-=?？]|What is|加|减|等于多少|\s", "", p)) == 0 for p in prompts)  # bare


def test_typed_prompts_are_answered():
    assert arithmetic_answer("What is 29 + 82?") == 111
    assert arithmetic_answer("39加15等于多少？") == 54
    assert arithmetic_answer("  47+38 ") == 85
    assert arithmetic_answer("Subtract 8 from 30.") == 22  # the operands in the template's order, not the text's
    assert arithmetic_answer("Hello, how are you?") is None


def test_evaluation_tasks_fill_every_cell_and_scores_break_down_by_split_and_cell():
    tasks = evaluation_tasks(400, seed=0)
    assert [t["split"] for t in tasks].count("heldout") == 400 and len(tasks) == 800
    assert len({cell(t) for t in tasks if t["split"] == "heldout_wordings"}) == 12
    said = [t["answer"] if t["split"] == "heldout" else None for t in tasks]
    scores = exact_match_scores(tasks, said)
    assert scores["heldout"]["exact_match"] == 1.0 and scores["heldout_wordings"]["exact_match"] == 0.0
    assert scores["both"]["exact_match"] == 0.5 and scores["both"]["n"] == 800
    assert set(scores["heldout"]["by_cell"].values()) == {1.0} and set(scores["heldout_wordings"]["by_cell"].values()) == {0}
    assert len(scores["both"]["by_cell"]) == 12 and all(0 < v < 1 for v in scores["both"]["by_cell"].values())


def test_paired_bootstrap_error_reduction():
    before = [0.5] * 100 + [1.0] * 100
    same = paired_bootstrap_error_reduction(before, before)
    assert same["relative"] == 0 and same["ci95"][0] <= 0 <= same["ci95"][1]
    better = paired_bootstrap_error_reduction(before, [1.0] * 200)
    assert better["relative"] == 1 and better["ci95"] == [1.0, 1.0]
    half = paired_bootstrap_error_reduction(before, [0.75] * 100 + [1.0] * 100)
    assert half["relative"] == 0.5 and 0 < half["ci95"][0] <= 0.5 <= half["ci95"][1]
    assert half["error_before"] == 0.25 and half["error_after"] == 0.125
