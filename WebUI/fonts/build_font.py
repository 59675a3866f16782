"""Build WebUI/fonts/NotoSansCJKsc-Regular-subset.woff2, the font the web UI serves for its text (Latin and Chinese),
from Noto Sans CJK SC Regular (SIL OFL 1.1) as Debian's fonts-noto-cjk ships it, subset with fontTools.

Kept characters: printable ASCII, Latin-1, general punctuation, arrows and check marks, CJK symbols and punctuation,
fullwidth forms, the 3,755 GB2312 level-1 hanzi (the common characters, taken from Python's gb2312 codec) and every
non-ASCII character of the project's embedded data (data/default_corpus/*.jsonl.gz, SFT/data/chatterbot_sft.jsonl.gz,
RLHF/data/*.jsonl.gz, llm_train/arithmetic.py) that the font has. Only the OpenType features of horizontal text
(kerning, ligatures, mark positioning) are kept. Hints are dropped (browsers do not use CFF hints
much) and the charstrings desubroutinized (woff2's brotli then compresses them better). The output is the same
bytes from run to run for the same inputs.

Build-only: needs fontTools and brotli in the venv (matplotlib already brings fontTools; `pip install fonttools brotli`
otherwise); the app itself only serves the file.

    apt-get download fonts-noto-cjk && dpkg-deb -x fonts-noto-cjk_*.deb /tmp/noto    # 56 MB, nothing installed
    .venv/bin/python WebUI/fonts/build_font.py --source /tmp/noto/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc
    (or `apt-get install fonts-noto-cjk` and run it without --source)
"""
import argparse
import gzip
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
OUT = HERE / "NotoSansCJKsc-Regular-subset.woff2"
DEFAULT_SOURCE = Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc")
FAMILY = "Noto Sans CJK SC"  # the face to take out of the collection
VERSION = "Version 2.004"  # fonts-noto-cjk 1:20220127+repack1-1 (Debian 12); another version builds other bytes
DATA = ["data/default_corpus/*.jsonl.gz", "SFT/data/chatterbot_sft.jsonl.gz", "RLHF/data/*.jsonl.gz",
        "llm_train/arithmetic.py"]
RANGES = [(0x20, 0x7E), (0xA0, 0xFF), (0x2000, 0x206F), (0x2190, 0x21FF), (0x2713, 0x2718), (0x3000, 0x303F),
          (0xFF00, 0xFFEF)]


def gb2312_level1():
    """The 3,755 level-1 hanzi of GB2312 (rows 16-55), in code order."""
    chars = []
    for row in range(0xB0, 0xD8):
        for cell in range(0xA1, 0xFF):
            if row == 0xD7 and cell > 0xF9:  # row 55 ends at 55-89
                break
            chars.append(bytes([row, cell]).decode("gb2312"))
    assert len(chars) == 3755
    return chars


def data_chars():
    """Every non-ASCII character of the project's embedded data."""
    chars = set()
    for pattern in DATA:
        paths = sorted(REPO.glob(pattern))
        if not paths:
            sys.exit(f"no {pattern} in {REPO}")
        for path in paths:
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", encoding="utf-8") as f:
                chars |= {c for c in f.read() if ord(c) > 0x7E}
    return chars


def wanted_codepoints():
    points = {c for lo, hi in RANGES for c in range(lo, hi + 1)}
    points |= {ord(c) for c in gb2312_level1()}
    points |= {ord(c) for c in data_chars()}
    return points


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="NotoSansCJK-Regular.ttc of fonts-noto-cjk")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    from fontTools import subset
    from fontTools.ttLib import TTCollection

    if not args.source.is_file():
        sys.exit(f"no {args.source}: see `{Path(sys.argv[0]).name} --help` for how to get it")
    faces = TTCollection(str(args.source), lazy=True).fonts
    font = next((f for f in faces if f["name"].getDebugName(4) == FAMILY), None)
    if font is None:
        sys.exit(f"{args.source} holds no {FAMILY}")
    if not font["name"].getDebugName(5).startswith(VERSION):
        print(f"warning: {FAMILY} {font['name'].getDebugName(5)}, not {VERSION}: the file will differ", file=sys.stderr)
    wanted = wanted_codepoints()
    cmap = font.getBestCmap()
    kept = sorted(wanted & set(cmap))
    han = [c for c in kept if 0x3400 <= c <= 0x9FFF or 0x20000 <= c <= 0x3FFFF or 0xF900 <= c <= 0xFAFF]
    options = subset.Options()
    options.flavor = "woff2"
    options.hinting = False
    options.desubroutinize = True
    # horizontal text in one language: no vertical forms, no Japanese / Korean / traditional variants (locl), no
    # half-, full- or proportional-width alternates, which would double the glyphs
    options.layout_features = ["ccmp", "kern", "liga", "calt", "mark", "mkmk"]
    options.name_IDs = ["*"]  # keep the copyright, licence and trademark notices
    options.name_languages = ["*"]
    options.notdef_outline = True
    options.recalc_timestamp = False
    subsetter = subset.Subsetter(options)
    subsetter.populate(unicodes=kept)
    subsetter.subset(font)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    font.flavor = "woff2"
    font.recalcTimestamp = False  # keep the source's head.modified: the same bytes from run to run
    font.save(str(args.out))
    lacking = [c for c in gb2312_level1() if ord(c) not in cmap]
    if lacking:
        sys.exit(f"{args.source} lacks {len(lacking)} GB2312 level-1 hanzi ({''.join(lacking[:20])}): not the font meant")
    missing = sorted(wanted - set(cmap))
    print(f"{args.out}: {args.out.stat().st_size:,} bytes, {len(kept)} characters ({len(han)} hanzi), "
          f"{font['maxp'].numGlyphs} glyphs; {len(missing)} wanted characters the font lacks"
          + (f" (e.g. {''.join(map(chr, missing[:20]))})" if missing else ""))


if __name__ == "__main__":
    main()
