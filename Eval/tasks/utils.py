"""Data and scoring of the offline lm-eval tasks in this folder; the task YAMLs name these functions (`!function`).

Every dataset is built in memory, at task load time, from what the repo already holds: the held-out corpus files
data/default_corpus/heldout_{en,zh,code}.jsonl.gz (never trained on, by the tokenizer or pretraining), the problems
of both held-out arithmetic splits of llm_train/arithmetic.py, and (llm_train_bpb_pretrain_val only) the val split of
pretrain_data_chunks/.
Nothing is downloaded and nothing is written.
"""
import json
import random
from pathlib import Path

from llm_train.arithmetic import cell, evaluation_tasks, extract_answer
from llm_train.chunks import check_format, chunk_rows
from llm_train.corpus import read_jsonl_gz
from llm_train.errors import UserError
from llm_train.paths import CHUNKS_DIR, DATA_DIR, TOKENIZER_DIR
from llm_train.tokenizer import tokenizer_fingerprint

PASSAGE_CHARS = 2000  # bits-per-byte documents: the held-out files cut at line ends, so --limit N means N passages
# Problems per held-out split: evaluation_tasks(ARITH_PROBLEMS, seed=0)'s. The problems of SFT/eval.json (--eval-tasks
# N per split) and RLHF/eval.json (--eval-arithmetic M, M/2 per split), both at --seed 0, are the first ones of the
# same streams: on the items they share, the replies and scores agree (tests/test_eval.py).
ARITH_PROBLEMS = 400
ARITH_FIELDS = ("prompt", "answer", "split", "lang", "op", "digits", "response")
CONTINUATIONS = 100  # multiple-choice items per language
CONTEXT_CHARS = {"en": 300, "zh": 100, "code": 300}  # text before the line to continue: ~300 bytes, ~100 tokens


def _test_split(rows):
    import datasets

    return {"test": datasets.Dataset.from_list(rows)}


def heldout_documents(lang):
    return [d["text"] for d in read_jsonl_gz(DATA_DIR / f"heldout_{lang}.jsonl.gz")]


def passages(text, size=PASSAGE_CHARS):
    """Consecutive pieces of a document, each cut at the first line end after `size` characters: joined, they are the
    document again, so the task scores every byte of the held-out files exactly once."""
    out, start = [], 0
    while start < len(text):
        cut = text.find("\n", start + size)
        end = len(text) if cut < 0 else cut + 1
        out.append(text[start:end])
        start = end
    return out


def heldout_text(lang, **_):
    """custom_dataset of llm_train_bpb_{en,zh,code} (lang comes from dataset_kwargs)."""
    return _test_split([{"text": p, "document": i}
                        for i, doc in enumerate(heldout_documents(lang)) for p in passages(doc)])


def pretrain_val_text(chunks_dir=None, tokenizer_dir=None, **_):
    """custom_dataset of llm_train_bpb_pretrain_val: the val split of pretrain_data_chunks/ as its documents. The
    split's rows are consecutive pieces of one token stream (each document's tokens, then <|endoftext|>), so the
    stream is cut at <|endoftext|> and each piece decoded; the last document ends where the rows end."""
    import numpy as np
    from tokenizers import Tokenizer

    chunks_dir = Path(chunks_dir or CHUNKS_DIR)
    tokenizer_dir = Path(tokenizer_dir or TOKENIZER_DIR)
    manifest_file = chunks_dir / "manifest.json"
    if not manifest_file.is_file():
        raise UserError(f"{manifest_file} not found: task llm_train_bpb_pretrain_val reads the val split of "
                               "the pretraining chunks; run PreTrain/preprocess_dataset_for_pretrain_map.py first")
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    check_format(manifest, manifest_file, "task llm_train_bpb_pretrain_val", "re-run the chunks stage")
    if tokenizer_fingerprint(tokenizer_dir) != manifest["tokenizer_fingerprint"]:
        raise UserError(f"{chunks_dir} was tokenized with another tokenizer than the one in {tokenizer_dir}: "
                               "re-run the chunks stage")
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    rows = chunk_rows(chunks_dir, manifest, "val", manifest["row_length"] - 1, tokenizer.get_vocab_size())
    ids = rows[:].reshape(-1)  # whole rows, in order: the split's token stream
    eot = manifest["eot_id"]
    pieces = np.split(ids, np.flatnonzero(ids == eot) + 1)  # each ends with its <|endoftext|>, but the last
    docs = [p[:-1] if len(p) and p[-1] == eot else p for p in pieces]
    return _test_split([{"text": tokenizer.decode(d.tolist(), skip_special_tokens=False)} for d in docs if len(d)])


def arithmetic(split, **_):
    """custom_dataset of llm_train_arith (split heldout: held-out problems in the trained wordings) and
    llm_train_arith_heldout_wordings (split heldout_wordings: wordings no training stage sees): that split's
    ARITH_PROBLEMS problems of evaluation_tasks, in stream order, each with its language x op x digits cell."""
    return _test_split([{**{k: t[k] for k in ARITH_FIELDS}, "cell": cell(t)}
                        for t in evaluation_tasks(ARITH_PROBLEMS, seed=0) if t["split"] == split])


def arithmetic_exact_match(doc, results):
    """process_results: 1 when the number after 'The answer is' / '答案是' is the answer (SFT/eval.json's rule)."""
    return {"exact_match": int(extract_answer(results[0]) == doc["answer"])}


def _candidate_lines(text):
    """(start offset, line) of the lines that make a fair choice: 24-300 bytes (8+ Chinese characters), not blank."""
    out, start = [], 0
    for line in text.splitlines(keepends=True):
        if 24 <= len(line.strip().encode("utf-8")) <= 300:
            out.append((start, line))
        start += len(line)
    return out


def continuations(**_):
    """custom_dataset of llm_train_continuation: for held-out English, Chinese and code documents, the text before a
    line (CONTEXT_CHARS, from a line start when there is one) and four choices: that line and three lines of other
    documents of the same language. Languages alternate, so --limit N still mixes them. Fixed seed."""
    rng = random.Random(0)
    per_lang = {}
    for lang in ("en", "zh", "code"):
        docs = heldout_documents(lang)
        lines = [_candidate_lines(d) for d in docs]
        items, with_lines = [], [i for i, candidates in enumerate(lines) if candidates]
        while len(items) < CONTINUATIONS:
            d = rng.choice(with_lines)
            start, gold = rng.choice(lines[d])
            if start < CONTEXT_CHARS[lang]:
                continue
            before = docs[d][start - CONTEXT_CHARS[lang]:start]
            context = before[before.find("\n") + 1:]  # from the first line start on, unless that leaves nothing
            context = context if context.strip() else before
            if not context.strip():
                continue
            others = list(dict.fromkeys(line for o in range(len(docs)) if o != d for _, line in lines[o]))
            others = [line for line in others if line != gold]  # distinct texts, in file order (seeded sample)
            choices = rng.sample(others, 3) + [gold]
            rng.shuffle(choices)
            items.append({"context": context, "choices": choices, "label": choices.index(gold), "lang": lang})
        per_lang[lang] = items
    return _test_split([item for group in zip(*per_lang.values()) for item in group])
