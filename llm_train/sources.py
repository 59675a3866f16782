"""Named datasets on the Hugging Face hub, for the tokenizer (stage 1) and the chunks (stage 2): where they live
(ids, configs, splits and fields as on their dataset cards) and how a row becomes one clean document."""
import glob
import os
import re
from html.parser import HTMLParser

from llm_train.errors import UserError


class _HTMLText(HTMLParser):
    """Text of an HTML fragment: entities unescaped, tags dropped, <pre>/<code> contents kept as they are,
    paragraphs and list items on lines of their own."""
    PARAGRAPH = {"p", "pre", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "table", "hr", "div"}
    LINE = {"li", "tr", "br", "dd", "dt"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.in_pre, self.newlines = [], 0, 2

    def _add(self, text):
        if text:
            self.parts.append(text)
            body = text.rstrip("\n")
            self.newlines = len(text) - len(body) + (0 if body else self.newlines)

    def _break(self, n):
        self._add("\n" * max(0, n - self.newlines))

    def handle_starttag(self, tag, attrs):
        self._break(2 if tag in self.PARAGRAPH else 1 if tag in self.LINE else 0)
        if tag == "li":
            self._add("- ")
        self.in_pre += tag == "pre"

    def handle_endtag(self, tag):
        self.in_pre -= tag == "pre" and self.in_pre > 0
        self._break(2 if tag in self.PARAGRAPH else 1 if tag in self.LINE - {"br"} else 0)

    def handle_data(self, data):
        if not self.in_pre:  # outside <pre> a run of whitespace (newlines too) is one space, as browsers show it
            data = re.sub(r"\s+", " ", data)
            if self.newlines:
                data = data.lstrip(" ")
        self._add(data)


def html_to_text(html):
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    return re.sub(r" +\n", "\n", "".join(parser.parts)).strip()


_GUTENBERG_START = re.compile(r"\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG[^*]*\*\*\*[^\n]*\n?", re.I)
_GUTENBERG_END = re.compile(r"^[ \t]*(?:\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG|End of (?:the |this )?Project "
                            r"Gutenberg)", re.I | re.M)


def gutenberg_text(text):
    """A Project Gutenberg book without the licence: the text between the '*** START OF ... ***' line and the
    '*** END OF ...' line (or the 'End of the Project Gutenberg EBook' line before it); unmarked text is kept."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    return (text[:end.start()] if end else text).strip()


def stackexchange_text(row):
    """The question, then its answers, best first (pm_score = round(log2(1 + upvotes)) + 1 if accepted, -1 when
    downvoted: downvoted answers are left out), all as plain text."""
    answers = sorted((a for a in row.get("answers") or [] if a.get("text") and (a.get("pm_score") or 0) >= 0),
                     key=lambda a: (-(a.get("pm_score") or 0), not a.get("selected")))
    return "\n\n".join(t for t in map(html_to_text, [row["question"], *(a["text"] for a in answers)]) if t)


# row_kb: a typical row's size, which turns the shuffle buffer's megabytes into rows.
NAMED_SOURCES = {
    "c4": dict(hub="allenai/c4", config="en", split="train", row_kb=2, text=lambda r: r["text"]),
    "wikipedia": dict(hub="wikimedia/wikipedia", config="20231101.en", split="train", row_kb=4,
                      text=lambda r: r["title"] + "\n\n" + r["text"]),
    "wikipedia-zh": dict(hub="wikimedia/wikipedia", config="20231101.zh", split="train", row_kb=3,
                         text=lambda r: r["title"] + "\n\n" + r["text"]),
    "tiny-codes": dict(hub="nampdn-ai/tiny-codes", config=None, split="train", row_kb=3,
                       text=lambda r: r["prompt"] + "\n\n" + r["response"]),
    "gutenberg": dict(hub="manu/project_gutenberg", config=None, split="en", row_kb=400,
                      text=lambda r: gutenberg_text(r["text"])),
    "gutenberg-zh": dict(hub="manu/project_gutenberg", config=None, split="zh", row_kb=400,
                         text=lambda r: gutenberg_text(r["text"])),
    "stackexchange": dict(hub="HuggingFaceH4/stack-exchange-preferences", config=None, split="train", row_kb=4,
                          text=stackexchange_text),
}
SHUFFLE_BUFFER_MB = 64  # text held in a named stream's shuffle buffer


def parse_data_files(items):
    """--data-files NAME=GLOB ... -> {name: [glob, ...]}."""
    overrides = {}
    for item in items or []:
        name, eq, pattern = item.partition("=")
        if not eq or name not in NAMED_SOURCES:
            raise UserError(f"--data-files {item}: expected NAME=GLOB with NAME one of {', '.join(NAMED_SOURCES)}")
        overrides.setdefault(name, []).append(pattern)
    return overrides


def named_source(name, data_files=None, shuffle_mb=SHUFFLE_BUFFER_MB, seed=0):
    """(rows, where): a named dataset as a streaming datasets.IterableDataset, from the hub or from local
    .json[l][.gz] / .parquet files of the same schema (data_files: globs), and a description for messages.
    shuffle_mb > 0 reads up to 10 of its files at a time in a seeded random file order through a shuffle buffer of
    about that much text, so a token budget draws from the whole dataset and not from its first files; rows.state_dict()
    is where the stream is, for resuming (rows that sat in the buffer are then skipped or repeated)."""
    from datasets import load_dataset

    spec = NAMED_SOURCES[name]
    if data_files:
        files = sorted(f for pattern in data_files for f in glob.glob(os.path.expanduser(pattern)))
        if not files:
            raise UserError(f"--data-files {name}={' '.join(data_files)} matches no file")
        builder = "parquet" if all(f.endswith(".parquet") for f in files) else "json"
        rows = load_dataset(builder, data_files=files, split="train", streaming=True)
        where = f"{name} files {files[0]}{' ...' if len(files) > 1 else ''}"
    else:
        where = f"{spec['hub']} ({spec['config'] or 'default'}, {spec['split']})"
        try:
            rows = load_dataset(spec["hub"], spec["config"], split=spec["split"], streaming=True)
        except Exception as e:  # offline, no network, renamed dataset: one clear line instead of a traceback
            raise UserError(f"cannot stream {where} from the Hugging Face hub ({type(e).__name__}: "
                            f"{str(e)[:200]}): check the network (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE must be "
                            f"unset), or download its files and use --data-files {name}=GLOB") from None
    if shuffle_mb > 0:
        rows = rows.shuffle(seed=seed, buffer_size=max(1, round(shuffle_mb * 1000 / spec["row_kb"])))
    return rows, where


def named_texts(rows, name, where):
    """The clean, non-empty documents of a named source's rows."""
    for i, row in enumerate(rows):
        try:
            text = NAMED_SOURCES[name]["text"](row)
        except (KeyError, TypeError) as e:
            raise UserError(f"{where}, row {i + 1}: missing field {e} for source '{name}' (columns: {sorted(row)}); "
                            "see NAMED_SOURCES in llm_train/sources.py") from None
        if text:
            yield text
