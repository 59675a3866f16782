"""The Chinese part of the embedded default corpus (data/build_default_corpus.py): the chinese-poetry npm package's
collections -> zh_classical documents, traditional characters made simplified (opencc-python-reimplemented)."""
import json
import os
import sys
import tarfile
import zipfile

ZH_DOC_BYTES = 4096  # pack short Chinese poems into documents of about this many bytes
SONGCI_FILES = 6  # 宋词 subset: ci.song.0.json .. ci.song.5000.json (6000 ci)
YUANQU_PIECES = 1500  # 元曲 subset: the first N pieces of yuanqu.json

ZH_FILES = [  # (path under package/dist, written in traditional characters?)
    ("shijing/shijing.json", False),
    ("chuci/chuci.json", False),
    ("lunyu/lunyu.json", False),
    ("sishuwujing/daxue.json", True),
    ("sishuwujing/zhongyong.json", True),
    ("sishuwujing/mengzi.json", True),
    ("mengxue/tangshisanbaishou.json", True),
    ("mengxue/qianjiashi.json", True),
    ("shuimotangshi/shuimotangshi.json", False),
    ("songci/宋词三百首.json", False),
] + [(f"songci/ci.song.{i * 1000}.json", False) for i in range(SONGCI_FILES)] + [
    ("wudaishici/huajianji/huajianji-%s-juan.json" % j, False) for j in "123456789x"
] + [
    ("wudaishici/nantang/poetrys.json", False),
    ("nalanxingde/纳兰性德诗集.json", False),
    ("caocaoshiji/caocao.json", False),
    ("yuanqu/yuanqu.json", False),
    ("mengxue/guwenguanzhi.json", True),
    ("youmengying/youmengying.json", False),
    ("mengxue/sanzijing-new.json", True),
    ("mengxue/qianziwen.json", True),
    ("mengxue/baijiaxing.json", True),
    ("mengxue/dizigui.json", True),
    ("mengxue/zengguangxianwen.json", True),
    ("mengxue/zhuzijiaxun.json", True),
    ("mengxue/shenglvqimeng.json", True),
    ("mengxue/youxueqionglin.json", True),
]


def read_npm_files(tgz_path, wanted):
    """Read the wanted files (paths relative to package/) out of the npm tarball in one pass, as bytes."""
    found = {}
    with tarfile.open(tgz_path, "r:gz") as tar:
        for member in tar:
            rel = member.name[len("package/"):]
            if member.name.startswith("package/") and rel in wanted:
                found[rel] = tar.extractfile(member).read()
    missing = sorted(set(wanted) - set(found))
    if missing:
        sys.exit(f"error: missing in chinese-poetry tarball: {missing}")
    return found


def opencc_t2s(opencc_whl, work_dir):
    """Traditional -> simplified characters. opencc-python-reimplemented is pure python and reads its dictionaries
    from its package dir, so the wheel is unpacked and imported from there."""
    opencc_dir = os.path.join(work_dir, "opencc_whl")
    with zipfile.ZipFile(opencc_whl) as z:
        z.extractall(opencc_dir)
    sys.path.insert(0, opencc_dir)
    from opencc import OpenCC
    return OpenCC("t2s").convert


class ZhDocs:
    """The Chinese documents, in the order they are added; a poem body already used is skipped, so duplicates
    can't leak into held-out."""

    def __init__(self, t2s):
        self.t2s, self.seen, self.docs = t2s, set(), []

    def clean(self, s, trad):
        s = s.strip()
        return self.t2s(s) if trad else s

    def poem(self, title, author, lines, trad):
        lines = [self.clean(x, trad) for x in lines if x and x.strip()]
        body = "\n".join(lines)
        if not body or body in self.seen:
            return None
        self.seen.add(body)
        head = "\n".join(self.clean(x, trad) for x in (title, author) if x and x.strip())
        return head + "\n" + body if head else body

    def add_packed(self, slug, items):
        """items: list of (group_title, poem_text). Pack consecutive poems of one group into ~ZH_DOC_BYTES docs."""
        groups = []  # [group, [poem, ...]] in order
        cur_bytes = 0
        for group, poem in items:
            b = len(poem.encode("utf-8"))
            if not groups or group != groups[-1][0] or cur_bytes + b > ZH_DOC_BYTES:
                groups.append([group, []])
                cur_bytes = 0
            groups[-1][1].append(poem)
            cur_bytes += b + 2
        for n, (group, poems) in enumerate(groups):
            self.docs.append({"text": group + "\n\n" + "\n\n".join(poems) + "\n",
                              "source": f"chinese-poetry/{slug}/{n:04d}", "lang": "zh"})

    def add_poems(self, slug, group, records, title="title", author="author", lines="paragraphs", trad=False):
        """Records with a title, an author and lines, packed; group: a string, or a function of the record."""
        items = []
        for p in records:
            t = self.poem(p[title], p.get(author) if author else None, p[lines], trad)
            if t:
                items.append((group(p) if callable(group) else group, t))
        self.add_packed(slug, items)

    def add_single(self, slug, n, title, paragraphs, trad):
        body = "\n".join(self.clean(p, trad) for p in paragraphs if p and p.strip())
        if body:
            self.docs.append({"text": self.clean(title, trad) + "\n\n" + body + "\n",
                              "source": f"chinese-poetry/{slug}/{n:04d}", "lang": "zh"})


def add_anthology(zh, slug, name, book):
    """唐诗三百首 / 千家诗 (traditional in the package): grouped by form; a few entries nest their parts:
    paragraphs = [{"subchapter": "其一", "paragraphs": [...]}, ...]."""
    items = []
    for sec in book["content"]:
        for p in sec["content"]:
            parts = [p] if all(isinstance(x, str) for x in p["paragraphs"]) else p["paragraphs"]
            for part in parts:
                title = p["chapter"] + (" " + part["subchapter"] if part.get("subchapter") else "")
                t = zh.poem(title, p.get("author"), part["paragraphs"], True)
                if t:
                    items.append((f"{name}·{zh.clean(sec['type'], True)}", t))
    zh.add_packed(slug, items)


def add_prose(zh, data):
    """古文观止 (one article per document), 幽梦影 (aphorisms with comments, packed), the 蒙学 primers (one document per
    book, or per chapter where the book has chapters)."""
    i = 0
    for juan in data["mengxue/guwenguanzhi.json"]["content"]:
        for a in juan["content"]:
            head = f"古文观止·{juan['title']}\n{a['chapter']}\n{a.get('source') or ''} {a.get('author') or ''}".strip()
            zh.add_single("guwenguanzhi", i, head, a["paragraphs"], True)
            i += 1
    zh.add_packed("youmengying", [
        ("幽梦影", "\n".join([p["content"].strip()] + [c.strip() for c in p.get("comment") or []]))
        for p in data["youmengying/youmengying.json"]])
    for slug in ("sanzijing-new", "qianziwen", "baijiaxing", "zhuzijiaxun"):
        b = data[f"mengxue/{slug}.json"]
        zh.add_single(slug, 0, f"{b['title']}\n{b['author']}", b["paragraphs"], True)
    for slug in ("dizigui", "zengguangxianwen"):
        b = data[f"mengxue/{slug}.json"]
        for i, ch in enumerate(b["content"]):
            zh.add_single(slug, i, f"{b['title']}·{ch['chapter']}", ch["paragraphs"], True)
    for slug in ("shenglvqimeng", "youxueqionglin"):
        b = data[f"mengxue/{slug}.json"]
        chapters = [(juan, ch) for juan in b["content"] for ch in juan["content"]]
        for i, (juan, ch) in enumerate(chapters):
            zh.add_single(slug, i, f"{b['title']}·{juan['title']}·{ch['chapter']}", ch["paragraphs"], True)


def build_zh(npm_files, opencc_whl, work_dir):
    """npm_files: {path relative to package/: bytes} from read_npm_files()."""
    data = {p: json.loads(npm_files["dist/" + p].decode("utf-8")) for p, _ in ZH_FILES}
    zh = ZhDocs(opencc_t2s(opencc_whl, work_dir))
    zh.add_poems("shijing", lambda p: f"诗经·{p['chapter']}·{p['section']}", data["shijing/shijing.json"],
                 author=None, lines="content")
    zh.add_poems("chuci", lambda p: f"楚辞·{p['section']}", data["chuci/chuci.json"], lines="content")
    # 论语 / 孟子: one chapter per document; 大学 / 中庸: one document each
    for i, ch in enumerate(data["lunyu/lunyu.json"]):
        zh.add_single("lunyu", i, f"论语·{ch['chapter']}", ch["paragraphs"], False)
    for i, ch in enumerate(data["sishuwujing/mengzi.json"]):
        zh.add_single("mengzi", i, f"孟子·{ch['chapter']}", ch["paragraphs"], True)
    for slug in ("daxue", "zhongyong"):
        ch = data[f"sishuwujing/{slug}.json"]
        zh.add_single(slug, 0, ch["chapter"], ch["paragraphs"], True)
    add_anthology(zh, "tangshisanbaishou", "唐诗三百首", data["mengxue/tangshisanbaishou.json"])
    add_anthology(zh, "qianjiashi", "千家诗", data["mengxue/qianjiashi.json"])
    zh.add_poems("shuimotangshi", "水墨唐诗", data["shuimotangshi/shuimotangshi.json"])
    # 宋词: 宋词三百首 then the first SONGCI_FILES thousand-ci files
    zh.add_poems("songci300", "宋词三百首", data["songci/宋词三百首.json"], title="rhythmic")
    zh.add_poems("songci", "全宋词", [p for i in range(SONGCI_FILES) for p in data[f"songci/ci.song.{i * 1000}.json"]],
                 title="rhythmic")
    # 花间集 by 卷, 南唐二主词, 纳兰性德, 曹操, the 元曲 subset
    juans = {j: "卷十" if j == "x" else "卷" + "一二三四五六七八九"[int(j) - 1] for j in "123456789x"}
    zh.add_poems("huajianji", lambda p: f"花间集·{p['juan']}",
                 [{**p, "juan": juan} for j, juan in juans.items()
                  for p in data[f"wudaishici/huajianji/huajianji-{j}-juan.json"]])
    zh.add_poems("nantang", "南唐二主词", data["wudaishici/nantang/poetrys.json"])
    zh.add_poems("nalanxingde", "纳兰性德诗集", data["nalanxingde/纳兰性德诗集.json"], lines="para")
    zh.add_poems("caocao", "曹操诗集", [{**p, "author": "曹操"} for p in data["caocaoshiji/caocao.json"]])
    zh.add_poems("yuanqu", "元曲", data["yuanqu/yuanqu.json"][:YUANQU_PIECES])
    add_prose(zh, data)
    return zh.docs
