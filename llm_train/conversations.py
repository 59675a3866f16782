"""Conversation files for SFT: every row of a local .jsonl[.gz] / .json / .parquet file (messages or Alpaca layout)
becomes [{"role", "content"}, ...]; a bad row is a UserError naming file and row."""
import gzip
import hashlib
import json

from llm_train.errors import UserError

ROLES = {"system", "user", "assistant"}


def to_messages(row, where):
    """The chat messages of one row (`where` names it in errors)."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise UserError(f"{where}: each message needs a role in {sorted(ROLES)} and a string content, got {m!r:.120}")
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: conversation has no assistant message, so nothing to learn")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "instruction" in row and "output" in row:  # Alpaca / BELLE
        fields = (row["instruction"], row.get("input") or "", row["output"])
        if not all(isinstance(f, str) for f in fields) or not fields[0].strip():
            raise UserError(f"{where}: Alpaca row needs string 'instruction' (non-empty), 'input' and 'output'")
        prompt = fields[0] + ("\n\n" + fields[1] if fields[1].strip() else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": fields[2]}]
    raise UserError(f"{where}: expected a 'messages' list or Alpaca 'instruction'/'input'/'output' fields, "
                    f"got keys {sorted(row)}")


def read_rows(path):
    """(row number, row) of a local .jsonl[.gz], .json (a list) or .parquet file."""
    if not path.is_file():
        raise UserError(f"data file {path} not found")
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist(), 1)
    elif name.endswith(".json"):
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid UTF-8 JSON ({e})") from None
        if not isinstance(rows, list):
            raise UserError(f"{path}: a .json file must hold a list of rows (use .jsonl for one row per line)")
        yield from enumerate(rows, 1)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield n, json.loads(line)
                        except json.JSONDecodeError as e:
                            raise UserError(f"{path}, line {n}: invalid JSON ({e.msg})") from None
        except UnicodeDecodeError:
            raise UserError(f"{path} is not valid UTF-8 text: convert it to UTF-8 (e.g. with iconv)") from None
        except (gzip.BadGzipFile, EOFError) as e:
            raise UserError(f"{path}: not a readable gzip file ({e})") from None
    else:
        raise UserError(f"{path}: unsupported file type; give .jsonl, .jsonl.gz, .json or .parquet")


def split_train_val(conversations, val_size, seed):
    """Hold out val_size conversations, chosen by a hash of their text (stable across runs and data order)."""
    def key(c):
        return hashlib.sha1((str(seed) + json.dumps(c, ensure_ascii=False)).encode()).hexdigest()
    held = set(sorted(range(len(conversations)), key=lambda i: key(conversations[i]))[:min(val_size, len(conversations) // 10)])
    return ([c for i, c in enumerate(conversations) if i not in held], [c for i, c in enumerate(conversations) if i in held])
