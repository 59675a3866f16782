"""Stage 2 (PreTrain/preprocess_dataset_for_pretrain_map.py): rows, splits, manifest, resume, sources, bad input.

Runs the script as a user would, on small text in tmp_path, with conftest's 600-token tokenizer."""
import gzip
import json

from llm_train.arithmetic import problem_split
from llm_train.lineage import read_lineage
from llm_train.tokenizer import EOT, IM_END, IM_START, tokenizer_fingerprint

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from conftest import run_script

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
    """All rows of a split, in shard order, as python lists (read by pyarrow as a whole, not by chunk_rows); checks
    the shard format on the way: one column input_ids of fixed_size_list<uint16, row_length>."""
    rows = []
    for rel in manifest["splits"][split]["shards"]:
        shard = pq.ParquetFile(out_dir / rel)
        assert rel.endswith(".parquet") and shard.schema_arrow == pa.schema(
            [("input_ids", pa.list_(pa.uint16(), manifest["row_length"]))])
        rows += shard.read().column("input_ids").to_pylist()
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
    eot = tok.token_to_id(EOT)
    assert set(manifest) >= {"format", "tokenizer_fingerprint", "vocab_size", "eot_id", "context_length",
                             "row_length", "splits", "sources", "seconds"}
    assert manifest["format"] == 3 and manifest["eot_id"] == eot and manifest["vocab_size"] == tok.get_vocab_size()
    assert manifest["dtype"] == "<u2"  # a 600-token vocabulary fits 16 bits
    assert manifest["tokenizer_fingerprint"] == tokenizer_fingerprint(tiny_tokenizer_dir)
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


def test_named_sources_are_cleaned_in_their_hub_schemas(tiny_tokenizer_dir, tmp_path):
    """Each named source, from local files written by `datasets` in its hub schema (the dataset cards' fields and
    file formats), goes through the code that streams the hub; every document comes out as its cleaned text."""
    from datasets import Dataset

    licence = "This eBook is for the use of anyone anywhere in the United States at no cost.\n"
    book = ("The Project Gutenberg eBook of Tiny Tales\n\n" + licence * 5 + "\n*** START OF THE PROJECT GUTENBERG "
            "EBOOK TINY TALES ***\n\n\nCHAPTER I.\n\nOnce upon a time.\n\nEnd of the Project Gutenberg EBook of "
            "Tiny Tales\n\n*** END OF THE PROJECT GUTENBERG EBOOK TINY TALES ***\n\n" + licence * 5)
    post = {"qid": 1, "question": '<p>How do I check if <code>a &lt; b</code> in Python?</p>\n\n<pre><code>if a &lt; b:'
                                  '\n    print("yes")\n</code></pre>\n', "date": "2020-01-01",
            "metadata": ["https://stackoverflow.com/questions/1", "Stack Overflow"],
            "answers": [{"answer_id": 2, "author": "a", "author_id": 2, "author_profile": "p", "pm_score": 3,
                         "selected": False, "text": "<p>Compare them with <code>&lt;</code>:</p>\n<pre><code>a &lt; b"
                                                    "  # True &amp; done\n</code></pre>\n"},
                        {"answer_id": 3, "author": "b", "author_id": 3, "author_profile": "p", "pm_score": 3,
                         "selected": True, "text": "<p>Just write <strong>a &lt; b</strong>.</p>"},
                        {"answer_id": 4, "author": "c", "author_id": 4, "author_profile": "p", "pm_score": -1,
                         "selected": False, "text": "<p>Use a loop.</p>"}]}
    rows = {  # three rows per source (ids differ): one may lose its end to the dropped tail, the others are whole
        "c4": [{"text": "A web page about the weather.", "timestamp": "2019-04-25T12:57:54Z",
                "url": f"https://example.com/{i}"} for i in range(3)],
        "wikipedia": [{"id": str(i), "url": "https://en.wikipedia.org/wiki/Anarchism", "title": "Anarchism",
                       "text": "Anarchism is a political philosophy."} for i in range(3)],
        "wikipedia-zh": [{"id": str(i), "url": "https://zh.wikipedia.org/wiki/长城", "title": "长城",
                          "text": "长城是中国古代的军事防御工程。"} for i in range(3)],
        "tiny-codes": [{"prompt": "Write a Python function that adds two numbers.", "main_topic": "Python",
                        "subtopic": "Functions", "adjective": "Simple", "action_verb": "Write", "scenario": "math",
                        "target_audience": "Beginners", "programming_language": "Python",
                        "common_sense_topic": "Arithmetic", "idx": i,
                        "response": "def add(a, b):\n    return a + b\n"} for i in range(3)],
        "gutenberg": [{"id": str(i), "text": book} for i in range(3)],
        "stackexchange": [{**post, "qid": i} for i in range(3)],
    }
    expected = {
        "c4": "A web page about the weather.",
        "wikipedia": "Anarchism\n\nAnarchism is a political philosophy.",
        "wikipedia-zh": "长城\n\n长城是中国古代的军事防御工程。",
        "tiny-codes": "Write a Python function that adds two numbers.\n\ndef add(a, b):\n    return a + b\n",
        "gutenberg": "CHAPTER I.\n\nOnce upon a time.",  # licence header, footer and "End of ..." line cut off
        # HTML -> text: entities unescaped, tags dropped, <pre>/<code> kept; answers best first (pm_score, then
        # the accepted one), the downvoted one left out
        "stackexchange": 'How do I check if a < b in Python?\n\nif a < b:\n    print("yes")\n\nJust write a < b.'
                         "\n\nCompare them with <:\n\na < b  # True & done",
    }
    files = []
    for name, source_rows in rows.items():
        path = tmp_path / (f"{name}-00000-of-00001" + (".json.gz" if name == "c4" else ".parquet"))
        ds = Dataset.from_list(source_rows)
        ds.to_json(path) if name == "c4" else ds.to_parquet(path)
        files.append(f"{name}={path}")
    out = tmp_path / "chunks"
    run(tiny_tokenizer_dir, out, "--sources", *rows, "--data-files", *files, "--num-proc", "1")
    manifest = json.loads((out / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    docs = set()
    for split in ("train", "val"):
        docs |= set(decoded_documents(tok, read_split(out, manifest, split), manifest["eot_id"]))
    assert docs == set(expected.values())
    assert {s["name"]: sum(s["documents"].values()) for s in manifest["sources"]} == {name: 3 for name in rows}


def c4_files(tmp_path, docs_per_file):
    """c4 rows in its hub layout (json.gz files c4-train.0000k-of-01024), document i of file k saying so."""
    from datasets import Dataset

    tmp_path.mkdir(exist_ok=True)
    for k, n in enumerate(docs_per_file):
        Dataset.from_list([{"text": f"File {k} document {i}. " + "Some news about the weather and the city. " * 40,
                            "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.com/{k}/{i}"}
                           for i in range(n)]).to_json(tmp_path / f"c4-train.{k:05d}-of-01024.json.gz")
    return f"c4={tmp_path}/c4-train.*.json.gz"


def documents_by_file(tok_dir, out):
    manifest = json.loads((out / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    rows = read_split(out, manifest, "train") + read_split(out, manifest, "val")
    return {tuple(map(int, d.split(".")[0].split()[1::2])) for d in decoded_documents(tok, rows, manifest["eot_id"])}


def test_named_source_is_shuffled_and_resumes_its_stream(tiny_tokenizer_dir, tmp_path):
    """A --max-tokens budget of ~1/6 of a 4-file source draws from all its files (the hub stores c4 and the others
    in file order); a killed run's stream resumes where it stopped: rerun after its first file was replaced by
    another one (so reading the stream again from the start would take other documents), it still gives the
    uninterrupted run's shards, byte for byte (--shuffle-buffer-mb 0: nothing sits in a buffer)."""
    shuffled = tmp_path / "shuffled"
    data = c4_files(tmp_path / "a", [50, 50, 50, 50])
    run(tiny_tokenizer_dir, shuffled, "--sources", "c4", "--data-files", data, "--max-tokens", 15000)
    taken = documents_by_file(tiny_tokenizer_dir, shuffled)
    assert 8 < len(taken) < 50 and len({k for k, _ in taken}) >= 3, taken  # file order would be file 0 only

    data = c4_files(tmp_path / "b", [20, 150])
    args = ["--sources", "c4", "--data-files", data, "--shuffle-buffer-mb", 0, "--num-proc", "1"]
    run(tiny_tokenizer_dir, tmp_path / "whole", *args)
    killed = tmp_path / "killed"
    proc = run(tiny_tokenizer_dir, killed, *args, "--stop-after-shards", 2, check=False)
    assert proc.returncode != 0
    progress = json.loads((killed / ".partial" / "progress.json").read_text())["progress"]["sources"][0]
    assert progress["docs"] > 20 and progress["state"]  # past file 0, with the stream's position
    c4_files(tmp_path / "b", [1])  # file 0 is now another, shorter file
    proc = run(tiny_tokenizer_dir, killed, *args)
    assert f"c4: its stream continues where it stopped, after {progress['docs']} documents" in proc.stdout
    whole = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    assert json.loads((killed / "manifest.json").read_text())["splits"] == whole["splits"]
    for split in ("train", "val"):
        for rel in whole["splits"][split]["shards"]:
            assert (killed / rel).read_bytes() == (tmp_path / "whole" / rel).read_bytes()


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
    lineage = read_lineage(out)
    assert lineage["stage"] == "chunks" and lineage["parents"]["tokenizer"]["fingerprint"] == \
        tokenizer_fingerprint(tiny_tokenizer_dir)
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


def test_midtrain_chats_are_packed_whole_into_rows_with_real_chat_tokens_and_no_heldout_problems(
        corpus, tiny_tokenizer_dir, tmp_path):
    """The generated mid-training chats use the real <|im_start|>/<|im_end|> ids (a plain-text source never does),
    a row starts with a chat and holds as many whole chats as fit (a chat is never split between rows), filled up
    with text; every arithmetic problem in them is from the training split and in a trained wording."""
    out = tmp_path / "chunks"
    run(tiny_tokenizer_dir, out, "--sources", "midtrain:1", corpus[0] / "docs.jsonl.gz:2", "--max-tokens", 40000,
        "--num-proc", "2", "--context-length", 255)
    manifest = json.loads((out / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    im_start, im_end, eot = (tok.token_to_id(t) for t in (IM_START, IM_END, EOT))
    rows = read_split(out, manifest, "train") + read_split(out, manifest, "val")
    chat_rows = [row for row in rows if row[0] == im_start]
    assert len(chat_rows) > 20
    chats, fill = [], 0
    for row in chat_rows:
        cuts = [i for i, t in enumerate(row) if t == eot]
        segments = [row[i + 1:j] for i, j in zip([-1] + cuts, cuts)]
        fill += len(row) - (cuts[-1] + 1 if cuts else 0)
        for seg in segments:
            if seg and seg[0] == im_start:
                assert seg.count(im_end) == seg.count(im_start)  # whole: never cut at the row's end
                chats.append(tok.decode(seg, skip_special_tokens=False))
    assert len(chats) > 2 * len(chat_rows)  # several chats per row of 256 tokens
    assert fill > 0
    problems = [d.split("\n", 1)[1].split(IM_END)[0] for d in chats if "answer is" in d or "答案是" in d]
    assert len(problems) > 10 and all(problem_split(p) == "train" for p in problems)
    # without a budget the endless source is refused before any work
    err = bad_run(tiny_tokenizer_dir, tmp_path / "c2", "--sources", "midtrain")
    assert "--max-tokens" in err


def test_shards_load_with_datasets_and_pandas_as_the_same_rows(good_run):
    """The shards are plain parquet: datasets.load_dataset("parquet"), pandas and chunk_rows (the trainer's reader)
    all give the same rows, in shard order."""
    from llm_train.chunks import chunk_rows

    import pandas as pd
    from datasets import load_dataset

    out, manifest, _ = good_run
    for split in ("train", "val"):
        rows = read_split(out, manifest, split)
        files = [str(out / rel) for rel in manifest["splits"][split]["shards"]]
        ds = load_dataset("parquet", data_files=files, split="train")
        assert ds.column_names == ["input_ids"] and ds["input_ids"] == rows
        frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        assert [r.tolist() for r in frame["input_ids"]] == rows
        read = chunk_rows(out, manifest, split, CONTEXT, manifest["vocab_size"])
        assert read[:].tolist() == rows


def test_chunk_rows_reads_only_the_batch_rows_and_names_bad_shards(good_run, tmp_path):
    """chunk_rows on parquet shards: any index order, windows of a smaller context, rows read when indexed (a shard
    rewritten after it is what later batches see); a truncated, foreign or out-of-vocabulary shard is one UserError
    naming it; a format-2 chunk set of the same rows (flat .bin token files) reads the same; other formats are one
    clear error."""
    import shutil

    from llm_train.chunks import chunk_rows, write_shard
    from llm_train.errors import UserError
    from llm_train.pretrain_data import read_manifest

    src, manifest, _ = good_run
    out = tmp_path / "chunks"
    shutil.copytree(src, out)
    rows = np.array(read_split(out, manifest, "train"))
    n, vocab = len(rows), manifest["vocab_size"]
    read = chunk_rows(out, manifest, "train", CONTEXT, vocab)
    index = np.random.default_rng(0).permutation(n)[:40]
    np.testing.assert_array_equal(read[index], rows[index])
    half = chunk_rows(out, manifest, "train", CONTEXT // 2, vocab)  # windows of 16 + 1 tokens: 2 per row
    assert len(half) == 2 * n
    np.testing.assert_array_equal(half[np.r_[index, index + n]], np.r_[rows[index, :17], rows[index, 16:]])

    # a format-2 chunk set of the same rows reads the same
    flat = tmp_path / "flat"
    flat_manifest = json.loads(json.dumps(manifest))
    flat_manifest["format"] = 2
    for split in ("train", "val"):
        flat_manifest["splits"][split]["shards"] = []
        for rel in manifest["splits"][split]["shards"]:
            (flat / split).mkdir(parents=True, exist_ok=True)
            np.array(pq.read_table(out / rel).column("input_ids").to_pylist(), "<u2").tofile(flat / (rel[:-8] + ".bin"))
            flat_manifest["splits"][split]["shards"].append(rel[:-8] + ".bin")
    np.testing.assert_array_equal(chunk_rows(flat, flat_manifest, "train", CONTEXT // 2, vocab)[:], half[:])

    # read when indexed, not before: rewrite shard 1 on disk after making a reader
    first = pq.ParquetFile(out / manifest["splits"]["train"]["shards"][0]).metadata.num_rows
    shard = out / manifest["splits"]["train"]["shards"][1]
    changed = rows[first:first + pq.ParquetFile(shard).metadata.num_rows].copy()
    changed[3] = 7
    read = chunk_rows(out, manifest, "train", CONTEXT, vocab)
    write_shard(shard, changed, ROW, "<u2")
    np.testing.assert_array_equal(read[[first + 3, 0]], [[7] * ROW, rows[0]])
    # a token id outside the vocabulary names the shard and row
    with pytest.raises(UserError, match=r"shard_00001.parquet, row 3: token id outside the vocabulary \(size 7\)"):
        chunk_rows(out, manifest, "train", CONTEXT, 7)[[first + 3]]
    # rows of another length (another manifest's shard), then a truncated shard: found when loading
    write_shard(shard, changed[:, :-1], ROW - 1, "<u2")
    with pytest.raises(UserError, match=r"shard_00001.parquet: its rows are 32 uint16 token ids, not the "
                                        r"manifest's 33 uint16 \(not this manifest's shard\): re-run preprocessing"):
        chunk_rows(out, manifest, "train", CONTEXT, vocab)
    write_shard(shard, changed, ROW, "<u2")
    shard.write_bytes(shard.read_bytes()[:-20])
    with pytest.raises(UserError, match=r"shard_00001.parquet: not a parquet shard of token rows \(.*\): re-run"):
        chunk_rows(out, manifest, "train", CONTEXT, vocab)
    # the same rows written by another parquet writer: compressed (the footer says so), or in several data pages
    # per row group (found by the first read of the shard, which checks the rows' places)
    column = {"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(changed.reshape(-1).astype("<u2")), ROW)}
    pq.write_table(pa.table(column), shard)
    with pytest.raises(UserError, match=r"shard_00001.parquet: not laid out as this project writes parquet shards "
                                        r"\(one INT32 column, uncompressed, PLAIN\): re-run preprocessing"):
        chunk_rows(out, manifest, "train", CONTEXT, vocab)
    pq.write_table(pa.table(column), shard, compression="none", use_dictionary=False, data_page_size=512)
    read = chunk_rows(out, manifest, "train", CONTEXT, vocab)
    np.testing.assert_array_equal(read[[0]], rows[:1])
    with pytest.raises(UserError, match=r"shard_00001.parquet: not laid out as this project writes parquet shards "
                                        r"\(one uncompressed data page per row group\): re-run preprocessing"):
        read[[first]]
    # other formats: one error saying what to do
    for format in (1, None):
        (flat / "manifest.json").write_text(json.dumps({**flat_manifest, "format": format}))
        with pytest.raises(UserError, match=rf"chunks in format {format}, this script reads format 3 \(parquet\) or 2 "
                                            r"\(flat token files\): re-run `python PreTrain/preprocess"):
            read_manifest(flat, "tokenizer-not-needed")
