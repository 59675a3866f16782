"""Stage 1: the byte-level BPE tokenizer round-trips any string, loads with AutoTokenizer, carries the special tokens
and chat template, writes its report, and refuses bad input with one clear error."""
import json

import pytest

from hypothesis import given, settings, strategies as st

import common
from conftest import load_script, run_script, sample_texts

stage = load_script("PreTrain/train_byte_level_bpe_tokenizer.py")


def test_round_trip_examples(tiny_tokenizer_dir):
    tok = common.load_tokenizer(tiny_tokenizer_dir)
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
        _cache[path] = common.load_tokenizer(path)
    return _cache[path]


def test_digits_are_single_tokens(tiny_tokenizer_dir):
    tok = common.load_tokenizer(tiny_tokenizer_dir)
    pieces = [tok.decode([i]) for i in tok.encode("12345 + 678", add_special_tokens=False)]
    assert [p for p in pieces if p.strip().isdigit()] == list("12345678")


def test_autotokenizer_layout_and_special_tokens(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    assert (tiny_tokenizer_dir / stage.RAW_NAME).is_file()
    assert tok.eos_token == common.EOT and tok.pad_token == common.PAD
    for special in common.SPECIAL_TOKENS:  # each is one id, never split into bytes
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    assert tok.pad_token_id != tok.eos_token_id


def test_chat_template_and_assistant_mask(tiny_tokenizer_dir):
    tok = common.load_tokenizer(tiny_tokenizer_dir)
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
    tok = common.load_tokenizer(tiny_tokenizer_dir)
    tok.save_pretrained(str(tmp_path / "copy"))
    assert common.tokenizer_fingerprint(tmp_path / "copy") == common.tokenizer_fingerprint(tiny_tokenizer_dir)
    stage.save(stage.train(sample_texts()[:3], vocab_size=400), tmp_path / "other")
    assert common.tokenizer_fingerprint(tmp_path / "other") != common.tokenizer_fingerprint(tiny_tokenizer_dir)


def test_cli_writes_tokenizer_and_report(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("\n".join(sample_texts()[:4]), encoding="utf-8")
    rows = [json.dumps({"text": t}) for t in sample_texts()[4:]]
    (tmp_path / "in" / "b.jsonl").write_text("\n".join(rows), encoding="utf-8")
    out = tmp_path / "tok"
    run_script("PreTrain/train_byte_level_bpe_tokenizer.py", "--input", tmp_path / "in", "--vocab-size", 500,
               "--output-dir", out, cwd=tmp_path)
    report = json.loads((out / "report.json").read_text())
    assert report["vocab_size"] == 500 and report["train_seconds"] > 0
    assert report["fingerprint"] == common.tokenizer_fingerprint(out)
    # held-out bytes/token per language of the embedded corpus, when it is present
    assert set(report["bytes_per_token_heldout"]) == {
        next(common.read_jsonl_gz(f))["lang"] for f in common.default_corpus_files("heldout")}
    assert all(v > 1.0 for v in report["bytes_per_token_heldout"].values())


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


def test_hf_dataset_path_on_local_data(tmp_path):
    # the same datasets.load_dataset(..., streaming=True) call that reads a hub dataset, pointed at a local folder
    # holding rows in the hub's {"text": ...} schema
    (tmp_path / "ds").mkdir()
    rows = [json.dumps({"text": t, "url": "https://example.com"}) for t in sample_texts()]
    (tmp_path / "ds" / "train.jsonl").write_text("\n".join(rows), encoding="utf-8")
    out = tmp_path / "tok"
    run_script("PreTrain/train_byte_level_bpe_tokenizer.py", "--hf-dataset", tmp_path / "ds", "--vocab-size", 400,
               "--max-chars", 5000, "--output-dir", out)
    report = json.loads((out / "report.json").read_text())
    all_bytes = sum(len(t.encode()) for t in sample_texts())
    assert report["vocab_size"] <= 400 and 5000 <= report["train_bytes"] < all_bytes  # --max-chars stopped the stream


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
    assert common.read_lineage(out)["settings"]["vocab_size"] == 500


@pytest.mark.parametrize("flag, value", [("--vocab-size", "0"), ("--vocab-size", "-5"), ("--min-frequency", "0"),
                                         ("--max-chars", "0"), ("--max-chars", "nan")])
def test_bad_numbers_are_usage_errors(tmp_path, flag, value):
    proc = run_script("PreTrain/train_byte_level_bpe_tokenizer.py", flag, value, "--output-dir", tmp_path / "t",
                      check=False)
    assert proc.returncode == 2 and flag in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "t").exists()
