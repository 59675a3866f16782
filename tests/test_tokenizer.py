"""Stage 1: the byte-level BPE tokenizer round-trips any string, loads with AutoTokenizer, carries the special tokens
and chat template, writes its report, and refuses bad input with one clear error."""
import json

from llm_train.corpus import default_corpus_files, read_jsonl_gz
from llm_train.lineage import read_lineage
from llm_train.sources import stackexchange_text
from llm_train.tokenizer import EOT, PAD, SPECIAL_TOKENS, load_tokenizer, tokenizer_fingerprint

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import load_script, run_script, sample_texts

stage = load_script("PreTrain/train_byte_level_bpe_tokenizer.py")


def test_round_trip_examples(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    for text in ["", " ", "  leading and trailing  ", "tabs\t\tand\r\nCRLF\n\n\n", "天地玄黄，宇宙洪荒。",
                 "emoji 😀👍🏽 and ZWJ 👩‍👩‍👧", "def f(x):\n    return x  # comment\n", "١٢٣ ＡＢＣ ﬁ é é",
                 "mixed 中文 English 代码 code 12345", "\x00\x01 control \u200b"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_round_trip_any_unicode(tiny_tokenizer_dir, text):
    tok = _cached_tokenizer(tiny_tokenizer_dir)
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


_cache = {}


def _cached_tokenizer(path):
    if path not in _cache:
        _cache[path] = load_tokenizer(path)
    return _cache[path]


def test_digits_are_single_tokens(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    pieces = [tok.decode([i]) for i in tok.encode("12345 + 678", add_special_tokens=False)]
    assert [p for p in pieces if p.strip().isdigit()] == list("12345678")


def test_autotokenizer_layout_and_special_tokens(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    assert (tiny_tokenizer_dir / stage.RAW_NAME).is_file()
    assert tok.eos_token == EOT and tok.pad_token == PAD
    for special in SPECIAL_TOKENS:  # each is one id, never split into bytes
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    assert tok.pad_token_id != tok.eos_token_id


def test_chat_template_and_assistant_mask(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "The answer is 4."}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                    "<|im_start|>assistant\nThe answer is 4.<|im_end|>\n")
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and text.startswith(prompt)
    out = tok.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "The answer is 4.<|im_end|>"


def test_fingerprint_stable_across_copies_and_differs_between_tokenizers(tiny_tokenizer_dir, tmp_path):
    tok = load_tokenizer(tiny_tokenizer_dir)
    tok.save_pretrained(str(tmp_path / "copy"))
    assert tokenizer_fingerprint(tmp_path / "copy") == tokenizer_fingerprint(tiny_tokenizer_dir)
    stage.save(stage.train(sample_texts()[:3], vocab_size=400), tmp_path / "other")
    assert tokenizer_fingerprint(tmp_path / "other") != tokenizer_fingerprint(tiny_tokenizer_dir)


def test_cli_writes_tokenizer_and_report(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("\n".join(sample_texts()[:4]), encoding="utf-8")
    rows = [json.dumps({"text": t}) for t in sample_texts()[4:]]
    (tmp_path / "in" / "b.jsonl").write_text("\n".join(rows), encoding="utf-8")
    out = tmp_path / "tok"
    run_script("PreTrain/train_byte_level_bpe_tokenizer.py", "--input", tmp_path / "in", "--vocab-size", 500,
               "--output-dir", out, cwd=tmp_path)
    report = json.loads((out / "report.json").read_text())
    assert report["vocab_size"] == report["requested_vocab_size"] == 500 and report["train_seconds"] > 0
    assert report["warnings"] == []
    assert report["fingerprint"] == tokenizer_fingerprint(out)
    # held-out bytes/token per language of the embedded corpus, when it is present
    assert set(report["bytes_per_token_heldout"]) == {
        next(read_jsonl_gz(f))["lang"] for f in default_corpus_files("heldout")}
    assert all(v > 1.0 for v in report["bytes_per_token_heldout"].values())


def test_vocab_size_the_text_cannot_reach_is_reported(tmp_path):
    """The BPE trainer stops short of --vocab-size, without a word, when the text runs out of pairs to merge: the
    stage says so, naming both sizes and the way out, and records both in report.json."""
    (tmp_path / "in.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 50, encoding="utf-8")
    out = tmp_path / "tok"
    proc = run_script("PreTrain/train_byte_level_bpe_tokenizer.py", "--input", tmp_path / "in.txt",
                      "--vocab-size", 5000, "--output-dir", out)
    report = json.loads((out / "report.json").read_text())
    reached = report["vocab_size"]
    assert reached < 5000 and reached == load_tokenizer(out).backend_tokenizer.get_vocab_size()
    assert report["requested_vocab_size"] == 5000 and len(report["warnings"]) == 1
    [warning] = [line for line in proc.stdout.splitlines() if line.startswith("warning: ")]
    assert f"{reached:,} tokens, not the 5,000 asked for" in warning and "more text" in warning
    assert f"--vocab-size {reached}" in warning and warning == "warning: " + report["warnings"][0]


def _fails_cleanly(tmp_path, *args, expect):
    out = tmp_path / "tok_out"
    proc = run_script("PreTrain/train_byte_level_bpe_tokenizer.py", *args, "--output-dir", out, check=False)
    assert proc.returncode == 2, proc.stderr
    assert expect in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_bad_inputs(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _fails_cleanly(tmp_path, "--input", empty, expect="empty")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x7fELF\x00\x00\x01\x02" * 100)
    _fails_cleanly(tmp_path, "--input", binary, expect=str(binary))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 na\u00efve".encode("latin-1"))
    _fails_cleanly(tmp_path, "--input", latin1, expect=f"{latin1} is not valid UTF-8")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    _fails_cleanly(tmp_path, "--input", bad_jsonl, expect=f"{bad_jsonl}, line 2")
    _fails_cleanly(tmp_path, "--input", tmp_path / "missing", expect="does not exist")


def test_unwritable_output_dir(tmp_path):
    # a file where the output's parent directory should be: unwritable even for root
    (tmp_path / "in.txt").write_text("some text " * 50)
    (tmp_path / "file").write_text("x")
    proc = run_script("PreTrain/train_byte_level_bpe_tokenizer.py", "--input", tmp_path / "in.txt",
                      "--output-dir", tmp_path / "file" / "tok", check=False)
    assert proc.returncode == 2 and "cannot write to output directory" in proc.stderr
    assert (tmp_path / "file").read_text() == "x"


def test_hf_dataset_takes_the_named_sources_and_samples_them_evenly(tmp_path):
    """--hf-dataset takes the preprocessing stage's source names, read here from local files in the hub's schemas
    (the same datasets streaming code as the hub): c4 (json.gz), gutenberg (parquet, its licence cut off) and
    stackexchange (HTML); each gives about a third of --max-chars although c4 holds 20x more text."""
    from datasets import Dataset

    Dataset.from_list([{"text": f"Web page {i}. " + "Some news about the weather today. " * 30,
                        "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.com/{i}"}
                       for i in range(400)]).to_json(tmp_path / "c4-train.00000-of-01024.json.gz")
    licence = "This eBook is for the use of anyone anywhere at no cost. " * 20
    Dataset.from_list([{"id": str(i), "text": f"The Project Gutenberg eBook {i}\n{licence}\n*** START OF THE PROJECT "
                        f"GUTENBERG EBOOK {i} ***\nCHAPTER I. " + "It was a dark night. " * 60 +
                        f"\n*** END OF THE PROJECT GUTENBERG EBOOK {i} ***\n{licence}"} for i in range(20)]
                      ).to_parquet(tmp_path / "en-00000-of-00052.parquet")
    question = {"qid": 1, "question": "<p>How do I sort a list?</p>", "date": "2020-01-01",
                "metadata": ["https://stackoverflow.com/questions/1"],
                "answers": [{"answer_id": 1, "author": "a", "author_id": 1, "author_profile": "p", "pm_score": 2,
                             "selected": True,
                             "text": "<p>Use <code>sorted(x)</code>:</p><pre><code>y = sorted(x)\n</code></pre>" * 10}]}
    Dataset.from_list([question] * 40).to_parquet(tmp_path / "se.parquet")
    out = tmp_path / "tok"
    proc = run_script("PreTrain/train_byte_level_bpe_tokenizer.py", "--hf-dataset", "c4", "gutenberg", "stackexchange",
                      "--data-files", f"c4={tmp_path}/c4-*.json.gz", f"gutenberg={tmp_path}/en-*.parquet",
                      f"stackexchange={tmp_path}/se.parquet", "--vocab-size", 400, "--max-chars", 30000,
                      "--output-dir", out)
    report = json.loads((out / "report.json").read_text())
    sources = report["train_sources"]
    chars = {name: st["chars"] for name, st in sources.items()}
    assert set(chars) == {"c4", "gutenberg", "stackexchange"} and sum(chars.values()) >= 30000
    assert max(chars.values()) - min(chars.values()) < 1500, chars  # within one document of each other
    assert "c4 0.01M chars" in proc.stdout
    # the documents the trainer got are the cleaned ones (the cleaners' output itself is tested in test_preprocess)
    book = "CHAPTER I. " + "It was a dark night. " * 59 + "It was a dark night."
    assert chars["gutenberg"] == sources["gutenberg"]["documents"] * len(book)
    post = stackexchange_text(question)
    assert chars["stackexchange"] == sources["stackexchange"]["documents"] * len(post) and "<" not in post


def test_hf_dataset_offline_or_unknown_is_one_clear_error(tmp_path):
    _fails_cleanly(tmp_path, "--hf-dataset", "stackexchange", expect="HuggingFaceH4/stack-exchange-preferences")
    _fails_cleanly(tmp_path, "--hf-dataset", "gutenberg", expect="--data-files gutenberg=GLOB")
    _fails_cleanly(tmp_path, "--hf-dataset", "allenai/c4:en", expect="unknown name; use c4, wikipedia")
    _fails_cleanly(tmp_path, "--hf-dataset", "c4", "--data-files", f"c4={tmp_path}/none*.json",
                   expect="matches no file")


def test_training_streams_the_input(tmp_path, monkeypatch):
    """10 MB of input, all of it read: the stage never holds the text (listing the documents first would hold all
    10 MB)."""
    import sys
    import tracemalloc


    rows = [json.dumps({"text": f"{i} " + "the quick brown fox jumps over the lazy dog " * 23}) for i in range(10000)]
    (tmp_path / "big.jsonl").write_text("\n".join(rows))
    args = ["x", "--input", str(tmp_path / "big.jsonl"), "--vocab-size", "300", "--max-chars", "1e7",
            "--output-dir", str(tmp_path / "tok")]
    monkeypatch.setattr(sys, "argv", args)
    tracemalloc.start()
    stage.main()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert json.loads((tmp_path / "tok" / "report.json").read_text())["train_bytes"] > 9.5e6
    assert peak < 5e6, peak


def test_rerun_is_a_no_op_and_replacing_needs_force(tmp_path):
    """The same command on a finished tokenizer does nothing; another tokenizer over it needs --force."""
    (tmp_path / "in.txt").write_text("\n\n".join(sample_texts()[:6]), encoding="utf-8")
    out = tmp_path / "tok"
    args = ["--input", tmp_path / "in.txt", "--vocab-size", 400, "--output-dir", out]
    run_script("PreTrain/train_byte_level_bpe_tokenizer.py", *args)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = run_script("PreTrain/train_byte_level_bpe_tokenizer.py", *args)
    assert "nothing to do" in again.stdout and "read " not in again.stdout  # no corpus was even read
    other = run_script("PreTrain/train_byte_level_bpe_tokenizer.py", *args[:3], 500, *args[4:], check=False)
    assert other.returncode == 2 and "--force" in other.stderr and str(out) in other.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing was changed
    run_script("PreTrain/train_byte_level_bpe_tokenizer.py", *args[:3], 500, *args[4:], "--force")
    assert json.loads((out / "report.json").read_text())["vocab_size"] == 500
    assert read_lineage(out)["settings"]["vocab_size"] == 500


def test_output_dir_holding_other_files_is_left_alone(tmp_path):
    """Even with --force, a directory that is not a previous tokenizer output is never replaced."""
    (tmp_path / "in.txt").write_text("some text " * 50)
    out = tmp_path / "my_documents"
    out.mkdir()
    (out / "thesis.txt").write_text("precious")
    proc = run_script("PreTrain/train_byte_level_bpe_tokenizer.py", "--input", tmp_path / "in.txt", "--output-dir", out,
                      "--force", check=False)
    assert proc.returncode == 2 and "thesis.txt" in proc.stderr and "read " not in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["thesis.txt"] and (out / "thesis.txt").read_text() == "precious"


@pytest.mark.parametrize("flag, value", [("--vocab-size", "0"), ("--vocab-size", "-5"), ("--min-frequency", "0"),
                                         ("--max-chars", "0"), ("--max-chars", "nan")])
def test_bad_numbers_are_usage_errors(tmp_path, flag, value):
    proc = run_script("PreTrain/train_byte_level_bpe_tokenizer.py", flag, value, "--output-dir", tmp_path / "t",
                      check=False)
    assert proc.returncode == 2 and flag in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "t").exists()
