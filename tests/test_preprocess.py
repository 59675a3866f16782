"""Stage 2 (PreTrain/preprocess_dataset_for_pretrain_map.py): rows, splits, manifest, resume, sources, bad input.

Runs the script as a user would, on small text in tmp_path, with conftest's 600-token tokenizer."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_script
from tokenizers import Tokenizer

import common

SCRIPT = "PreTrain/preprocess_dataset_for_pretrain_map.py"
CONTEXT = 32
ROW = CONTEXT + 1


def make_docs(n=120):
    """Varied documents (English, Chinese, code-ish), one spelling a special token: about 300 KB."""
    docs = []
    for i in range(n):
        if i % 3 == 0:
            docs.append(f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * (20 + i % 17))
        elif i % 3 == 1:
            docs.append(f"第{i}篇。" + "床前明月光，疑是地上霜。举头望明月，低头思故乡。" * (15 + i % 11))
        else:
            docs.append(f"def f{i}(x):\n    return x * {i}\n\n" * (25 + i % 13))
    docs[5] = "A literal <|endoftext|> in the text must stay text. " * 10
    return docs


def write_jsonl(path, rows, gz=False):
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def run(tok_dir, out_dir, *args, check=True):
    return run_script(SCRIPT, "--tokenizer-dir", tok_dir, "--output-dir", out_dir, "--context-length", CONTEXT,
                      "--rows-per-shard", 8, *args, check=check)


def read_split(out_dir, manifest, split):
    """All rows of a split, in shard order, as python lists; checks the shard schema on the way."""
    rows = []
    for rel in manifest["splits"][split]["shards"]:
        table = pq.read_table(out_dir / rel)
        assert table.schema.names == ["input_ids"]
        assert table.schema.field("input_ids").type == pa.list_(pa.int32())
        rows += table.column("input_ids").to_pylist()
    return rows


def decoded_documents(tok, rows, eot_id, with_tail=False):
    """Split the rows' token stream at end-of-text: the whole documents, decoded (+ the cut-off tail's ids)."""
    stream = [t for row in rows for t in row]
    pieces, start = [], 0
    for i, t in enumerate(stream):
        if t == eot_id:
            pieces.append(tok.decode(stream[start:i], skip_special_tokens=False))
            start = i + 1
    return (pieces, stream[start:]) if with_tail else pieces


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = make_docs()
    write_jsonl(root / "docs.jsonl.gz", [{"text": d} for d in docs], gz=True)
    return root, docs


@pytest.fixture(scope="module")
def good_run(corpus, tiny_tokenizer_dir, tmp_path_factory):
    root, docs = corpus
    out = tmp_path_factory.mktemp("run") / "chunks"
    proc = run(tiny_tokenizer_dir, out, "--sources", root / "docs.jsonl.gz", "--num-proc", "1")
    return out, json.loads((out / "manifest.json").read_text()), proc


def test_rows_split_and_manifest(good_run, corpus, tiny_tokenizer_dir):
    out, manifest, proc = good_run
    docs = corpus[1]
    tok = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    tok.encode_special_tokens = True  # as the stage does: a literal "<|endoftext|>" in a document is plain text
    eot = tok.token_to_id(common.EOT)
    assert set(manifest) >= {"format", "tokenizer_fingerprint", "vocab_size", "eot_id", "context_length",
                             "row_length", "splits", "sources", "seconds"}
    assert manifest["format"] == 1 and manifest["eot_id"] == eot and manifest["vocab_size"] == tok.get_vocab_size()
    assert manifest["tokenizer_fingerprint"] == common.tokenizer_fingerprint(tiny_tokenizer_dir)
    assert manifest["context_length"] == CONTEXT and manifest["row_length"] == ROW

    pieces, tails = {}, {}
    for split in ("train", "val"):
        info = manifest["splits"][split]
        rows = read_split(out, manifest, split)
        assert rows and all(len(r) == ROW for r in rows)
        assert info["rows"] == len(rows) and info["tokens"] == len(rows) * ROW
        assert all((out / rel).is_file() and rel.startswith(f"{split}/shard_") for rel in info["shards"])
        pieces[split], tails[split] = decoded_documents(tok, rows, eot, with_tail=True)
        # whole documents, decoded exactly; the dropped tail is under one row, so at most one document is cut off
        assert set(pieces[split]) <= set(docs)
        assert info["documents"] - len(pieces[split]) <= 1
    assert len(manifest["splits"]["train"]["shards"]) >= 3  # small shards: the multi-shard path is exercised
    assert not set(pieces["train"]) & set(pieces["val"])  # split by document
    # bytes = the split's text bytes, less the dropped tail pro rata: recompute it from the documents
    cut = [d for d in docs if d not in pieces["train"] and d not in pieces["val"]]
    for split in ("train", "val"):
        info = manifest["splits"][split]
        tail = tails[split]  # the start of the document the dropped tail cut off (empty if none was cut)
        split_docs = pieces[split] + [d for d in cut if tail and tok.encode(d).ids[:len(tail)] == tail]
        assert len(split_docs) == info["documents"]
        doc_tokens = sum(len(tok.encode(d, add_special_tokens=False).ids) + 1 for d in split_docs)
        assert 0 <= doc_tokens - info["tokens"] < ROW
        assert info["bytes"] == round(sum(len(d.encode()) for d in split_docs) * info["tokens"] / doc_tokens)
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == len(docs)
    assert 1 <= manifest["splits"]["val"]["documents"] < len(docs) // 4
    # a document that spells <|endoftext|> is still one document: the literal became text tokens
    assert docs[5] in pieces["train"] + pieces["val"]
    [source] = manifest["sources"]
    assert source["documents"] == {s: manifest["splits"][s]["documents"] for s in ("train", "val")}
    assert "MB/s" in proc.stdout and "tokens/s" in proc.stdout
    assert not (out / ".partial").exists()


def test_multiprocess_output_identical_and_resume_after_kill(good_run, corpus, tiny_tokenizer_dir, tmp_path):
    ref_out, ref_manifest, _ = good_run
    src = corpus[0] / "docs.jsonl.gz"

    # killed (SIGKILL) right after its 2nd shard flush: no manifest, finished shards in .partial
    out = tmp_path / "chunks"
    proc = run(tiny_tokenizer_dir, out, "--sources", src, "--num-proc", "2", "--stop-after-shards", "2", check=False)
    assert proc.returncode != 0
    assert not (out / "manifest.json").exists()
    done = sorted((out / ".partial" / "train").glob("shard_*.parquet"))
    assert len(done) == 2
    mtimes = {p.name: p.stat().st_mtime_ns for p in done}

    proc = run(tiny_tokenizer_dir, out, "--sources", src, "--num-proc", "2")
    assert "resuming: skipping 2 finished train" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    for name, mtime in mtimes.items():  # not rewritten
        assert (out / "train" / name).stat().st_mtime_ns == mtime
    # 2 processes + a kill and resume == 1 process uninterrupted, row for row and byte for byte
    for key in ("splits", "sources", "tokenizer_fingerprint", "row_length"):
        assert manifest[key] == ref_manifest[key]
    for split in ("train", "val"):
        for rel in manifest["splits"][split]["shards"]:
            assert (out / rel).read_bytes() == (ref_out / rel).read_bytes()


def test_named_sources_from_local_files_with_hub_schema(tiny_tokenizer_dir, tmp_path):
    """c4, tiny-codes and stackexchange rows in their hub schemas go through the same code as the hub stream."""
    write_jsonl(tmp_path / "c4-train.00000-of-01024.json.gz", [
        {"text": f"Web page {i}: " + "news about the weather and the city council. " * 40,
         "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.com/{i}"} for i in range(60)], gz=True)
    codes = tmp_path / "tiny-codes.parquet"
    pq.write_table(pa.table({
        "prompt": [f"Write a function number {i}." for i in range(60)],
        "main_topic": ["Python"] * 60, "programming_language": ["Python"] * 60, "idx": list(range(60)),
        "response": [f"def g{i}(y):\n    return y + {i}\n" * 30 for i in range(60)]}), codes)
    se = write_jsonl(tmp_path / "se.jsonl", [
        {"qid": i, "question": f"How do I sort list {i}?", "date": "2020-01-01", "metadata": ["x"],
         "answers": [{"answer_id": 1, "author": "a", "author_id": 1, "author_profile": "p", "pm_score": 1,
                      "selected": False, "text": "Use a loop. " * 30},
                     {"answer_id": 2, "author": "b", "author_id": 2, "author_profile": "p", "pm_score": 5,
                      "selected": True, "text": f"Use sorted({i}). " * 30}]} for i in range(60)])
    out = tmp_path / "chunks"
    run(tiny_tokenizer_dir, out, "--sources", "c4:2", "tiny-codes:1", "stackexchange:1", "--max-tokens", 30000,
        "--data-files", f"c4={tmp_path}/c4-train.*.json.gz", f"tiny-codes={codes}", f"stackexchange={se}",
        "--num-proc", "2")
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = {s["name"]: sum(s["tokens"].values()) for s in manifest["sources"]}
    assert sum(tokens.values()) == pytest.approx(30000, rel=0.15)
    assert tokens["c4"] == pytest.approx(2 * tokens["tiny-codes"], rel=0.3)
    assert tokens["stackexchange"] == pytest.approx(tokens["tiny-codes"], rel=0.3)

    tok = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    docs = set()
    for split in ("train", "val"):
        docs |= set(decoded_documents(tok, read_split(out, manifest, split), manifest["eot_id"]))
    assert "Write a function number 0.\n\n" + "def g0(y):\n    return y + 0\n" * 30 in docs  # prompt + response
    assert "How do I sort list 0?\n\n" + "Use sorted(0). " * 30 + "\n\n" + "Use a loop. " * 30 in docs


def bad_run(tok_dir, out, *args):
    proc = run(tok_dir, out, *args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    return proc.stderr


def test_bad_inputs_fail_clearly_and_keep_the_old_output(good_run, tiny_tokenizer_dir, tmp_path):
    # a copy of a complete output: every failed run below targets it and must leave it as it was
    out = tmp_path / "chunks"
    run_script("PreTrain/preprocess_dataset_for_pretrain_map.py", "--help")  # the help text renders
    import shutil

    shutil.copytree(good_run[0], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    binary = tmp_path / "image.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 10)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait\n".encode("latin-1"))
    bad_json = write_jsonl(tmp_path / "rows.jsonl", [{"text": "fine"}, {"body": "no text field"}])
    for path, words in ((empty, "holds no text"), (binary, "binary"), (latin1, "not valid UTF-8"),
                        (bad_json, "line 2")):
        err = bad_run(tiny_tokenizer_dir, out, "--sources", path)
        assert str(path) in err and words in err
    err = bad_run(tmp_path / "no_tokenizer", out, "--sources", empty)
    assert "no_tokenizer" in err and "train_byte_level_bpe_tokenizer.py" in err
    err = bad_run(tiny_tokenizer_dir, out, "--sources", "c44")
    assert "c44" in err and "c4" in err  # names the known sources
    err = bad_run(tiny_tokenizer_dir, out, "--sources", "c4")
    assert "--max-tokens" in err  # hub streams need a budget; checked before any download
    err = bad_run(tiny_tokenizer_dir, out, "--sources", "c4", "--max-tokens", "1000")  # the real hub path, offline
    assert "allenai/c4" in err and "--data-files c4=" in err
    latin1.with_name("ok.txt").write_text("fine text " * 50)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    err = bad_run(tiny_tokenizer_dir, blocker / "chunks", "--sources", latin1.with_name("ok.txt"))
    assert "a_file" in err and "output" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # an output directory holding anything else is never replaced
    other = tmp_path / "my_documents"
    other.mkdir()
    (other / "thesis.txt").write_text("precious")
    err = bad_run(tiny_tokenizer_dir, other, "--sources", empty)
    assert "thesis.txt" in err and (other / "thesis.txt").read_text() == "precious"


def test_rerun_of_a_finished_run_is_a_no_op(good_run, corpus, tiny_tokenizer_dir, tmp_path):
    import shutil

    out = tmp_path / "chunks"
    shutil.copytree(good_run[0], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = run(tiny_tokenizer_dir, out, "--sources", corpus[0] / "docs.jsonl.gz", "--num-proc", "1")
    assert "nothing to do" in proc.stdout and "wrote" not in proc.stdout
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    lineage = common.read_lineage(out)
    assert lineage["stage"] == "chunks" and lineage["parents"]["tokenizer"]["fingerprint"] == \
        common.tokenizer_fingerprint(tiny_tokenizer_dir)
    # other settings: a new chunk set replaces this one (no later stage was built from it)
    proc = run(tiny_tokenizer_dir, out, "--sources", corpus[0] / "docs.jsonl.gz", "--num-proc", "1",
               "--val-fraction", "0.3")
    assert "nothing to do" not in proc.stdout
    assert json.loads((out / "manifest.json").read_text())["config"]["val_fraction"] == 0.3


@pytest.mark.parametrize("flag", ["--context-length", "--rows-per-shard", "--num-proc", "--max-tokens"])
def test_bad_numbers_are_usage_errors(tiny_tokenizer_dir, tmp_path, flag):
    proc = run_script(SCRIPT, "--tokenizer-dir", tiny_tokenizer_dir, "--output-dir", tmp_path / "c", flag, "0",
                      check=False)
    assert proc.returncode == 2 and flag in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "c").exists()


def test_midtrain_source_has_real_chat_tokens_and_no_heldout_problems(corpus, tiny_tokenizer_dir, tmp_path):
    """The generated mid-training chats use the real <|im_start|>/<|im_end|> ids (a plain-text source never does),
    and every arithmetic problem in them comes from the training split."""
    out = tmp_path / "chunks"
    run(tiny_tokenizer_dir, out, "--sources", "midtrain:1", corpus[0] / "docs.jsonl.gz:1", "--max-tokens", 20000,
        "--num-proc", "2")
    manifest = json.loads((out / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    im_start, im_end, eot = (tok.token_to_id(t) for t in (common.IM_START, common.IM_END, common.EOT))
    rows = read_split(out, manifest, "train") + read_split(out, manifest, "val")
    stream = [t for row in rows for t in row]
    assert stream.count(im_start) > 50 and abs(stream.count(im_end) - stream.count(im_start)) <= 2  # rows cut the ends
    docs = [tok.decode(d, skip_special_tokens=False) for d in
            (list(g) for k, g in __import__("itertools").groupby(stream, lambda t: t == eot) if not k)]
    chats = [d for d in docs if d.startswith(common.IM_START)]
    problems = [d.split("\n", 1)[1].split(common.IM_END)[0] for d in chats if "answer is" in d or "答案是" in d]
    assert len(problems) > 20 and all(common.arithmetic_split(p) == "train" for p in problems[1:-1])
    by_source = {s["name"]: s["tokens"]["train"] + s["tokens"]["val"] for s in manifest["sources"]}
    assert 0.3 < by_source["midtrain"] / sum(by_source.values()) < 0.7  # weights 1:1
    # without a budget the endless source is refused before any work
    err = bad_run(tiny_tokenizer_dir, tmp_path / "c2", "--sources", "midtrain")
    assert "--max-tokens" in err
