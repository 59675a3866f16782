"""Reading what the stages wrote, for the report card (report/build_report.py) and the web UI's Training tab:
JSON and JSON-lines files, one metric's series from a history.jsonl, and the tokenizer's report checked against the
tokenizer the models were trained on. Writes nothing."""
import json
from pathlib import Path

from llm_train.lineage import read_lineage
from llm_train.tokenizer import tokenizer_fingerprint


def read_json(path, lenient=False):
    """The JSON in path, None if there is no such file (lenient: also None if it cannot be read or parsed)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        if lenient:
            return None
        raise


def read_jsonl(path, lenient=False):
    """The rows of a JSON-lines file, [] if there is none (lenient: also [] if it cannot be read or parsed)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        if lenient:
            return []
        raise


def series(rows, key):
    """(steps, values) of one metric of a history.jsonl: the rows that have it and a step."""
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


def vocab_size(tokenizer_dir):
    """How many tokens the tokenizer.json in tokenizer_dir has (its vocabulary plus added tokens not in it)."""
    spec = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec.get("model", {}).get("vocab", {})
    return len(vocab) + sum(t["content"] not in vocab for t in spec.get("added_tokens", []))


def tokenizer_report(tokenizer_dir, model_dir):
    """(tokenizer_dir/report.json or None, None) when it describes the tokenizer the model in model_dir was trained
    on (its lineage's tokenizer fingerprint, else that of the tokenizer saved with the model), else (None, a
    sentence saying they differ, with the vocabulary of the model's own copy). Either side unknown: not checked."""
    tokenizer_dir, model_dir = Path(tokenizer_dir), Path(model_dir)
    report = read_json(tokenizer_dir / "report.json", lenient=True)
    if not report:
        return None, None
    theirs = (read_lineage(model_dir) or {}).get("tokenizer_fingerprint")
    if theirs is None and (model_dir / "tokenizer.json").is_file():
        theirs = tokenizer_fingerprint(model_dir)
    ours = report.get("fingerprint")
    if ours is None and (tokenizer_dir / "tokenizer.json").is_file():
        ours = tokenizer_fingerprint(tokenizer_dir)
    if theirs is None or ours is None or ours == theirs:
        return report, None
    copy = f" (vocabulary {vocab_size(model_dir):,}, the copy saved in {model_dir.name}/)" \
        if (model_dir / "tokenizer.json").is_file() else ""
    return None, (f"{tokenizer_dir.name}/ holds another tokenizer (vocabulary {report.get('vocab_size')}) than the "
                  f"one the models were trained on{copy}: it was retrained since, so its numbers are not shown. "
                  f"Retrain the later stages on it (`make all`) or restore the old one")
