"""Reading text: the embedded default corpus (gzip JSON Lines, one {"text", "source", "lang"} document per line) and
local files (.txt, .jsonl[.gz], .parquet): listed, sized without reading, their documents streamed."""
import codecs
import gzip
import json
import os
from pathlib import Path

from llm_train.errors import UserError
from llm_train.paths import DATA_DIR


def default_corpus_files(split="train"):
    """Training files (split='train') or held-out files (split='heldout') of the embedded corpus."""
    files = sorted(DATA_DIR.glob("*.jsonl.gz"))
    held = [f for f in files if f.name.startswith("heldout_")]
    return held if split == "heldout" else [f for f in files if f not in held]


def local_files(path, not_found_hint=""):
    """The files of one --input / --sources path: the file itself, or a directory's files (hidden ones left out)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
        if not files:
            raise UserError(f"input directory {path} holds no files")
        return files
    if path.is_file():
        return [path]
    raise UserError(f"input {path} does not exist{not_found_hint}")


def gzip_text_size(path):
    """Uncompressed size of a .gz file (< 4 GB), from its trailer: the corpus mix without reading the files."""
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return int.from_bytes(f.read(4), "little")


def text_size(path):
    """About how many bytes of text a local file holds, without reading it (for a progress bar)."""
    return gzip_text_size(path) if str(path).endswith(".gz") else Path(path).stat().st_size


TXT_DOC_CHARS = 65536  # .txt files are cut at the first blank line after this many characters


def read_text_file(path):
    """Yield the documents of one local file; a binary or non-UTF-8 file is a UserError naming the file.
    Streams: memory stays bounded by one document (or one parquet batch), whatever the file's size."""
    path = Path(path)
    name = path.name
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(path)
            if "text" not in parquet.schema_arrow.names:
                raise UserError(f"{path}: parquet file has no 'text' column (columns: {parquet.schema_arrow.names})")
            for batch in parquet.iter_batches(batch_size=1024, columns=["text"]):
                yield from (t for t in batch.column(0).to_pylist() if t)
        elif name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                for row, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise UserError(f"{path}, line {row}: expected a JSON object with a \"text\" field") from None
                    if text:
                        yield text
        else:
            with open(path, "rb") as f:
                if b"\x00" in f.read(8192):
                    raise UserError(f"{path} looks binary (NUL bytes): give text, .jsonl or .parquet files")
                f.seek(0)
                # one document per ~64 KB (cut at a blank line), so a single big file still gets a val share
                decoder, text, offset = codecs.getincrementaldecoder("utf-8")(), "", 0
                while True:
                    block, pending = f.read(1 << 20), len(decoder.getstate()[0])
                    try:
                        text += decoder.decode(block, final=not block)
                    except UnicodeDecodeError as e:
                        e.start += offset - pending  # the file's byte, not the block's
                        raise
                    offset += len(block)
                    start = 0
                    while True:
                        cut = text.find("\n\n", start + TXT_DOC_CHARS)
                        if cut < 0:
                            break
                        if text[start:cut + 2].strip():
                            yield text[start:cut + 2]
                        start = cut + 2
                    text = text[start:]
                    if not block:
                        break
                if text.strip():
                    yield text
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        what = f"not valid UTF-8 (byte {e.start})" if isinstance(e, UnicodeDecodeError) else f"unreadable ({e})"
        raise UserError(f"{path} is {what}: convert it to UTF-8 text / fix the file, or remove it") from None


def read_jsonl_gz(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
