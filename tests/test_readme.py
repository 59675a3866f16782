"""The README against the code: every command in its shell code blocks (and every inline `python ...` / `make ...`
span) names a script that exists, flags that script's --help lists and make targets the Makefile has; every relative
link points to a file. A renamed flag or script fails here instead of in a newcomer's terminal.

A code block is read as one shell session from the repo root: `cd PreTrain` (alone or before `&&`) moves the rest
of the block there, so a block that mixes `cd PreTrain && ...` lines with repo-root paths fails. --help runs once
per script (cached), with this checkout first on PYTHONPATH as the Makefile puts it."""
import concurrent.futures
import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SHELL_LANGS = {"bash", "sh", "shell", "console"}
# Programs that run the first .py / .sh among their arguments; every `--flag` after it belongs to that script.
LAUNCHERS = {"python", "python3", "deepspeed", "torchrun", "accelerate", "bash", "sh"}
INLINE_STARTS = ("python ", "make ", "deepspeed ", "torchrun ", "accelerate launch ", "cd PreTrain && ", "bash ")


def code_blocks(text):
    """(language, [lines]) of each fenced block, in order."""
    blocks, lang, lines = [], None, None
    for line in text.splitlines():
        fence = re.match(r"^\s*```(\S*)\s*$", line)
        if fence and lines is None:
            lang, lines = fence.group(1).lower(), []
        elif fence:
            blocks.append((lang, lines))
            lang, lines = None, None
        elif lines is not None:
            lines.append(line.strip())
    return blocks


def inline_commands(text):
    """Inline code spans outside fenced blocks that are whole commands (`python X.py --flag`, `make TARGET`)."""
    outside = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)
    return [span for span in re.findall(r"`([^`\n]+)`", outside) if span.startswith(INLINE_STARTS)]


def shell_lines(lines):
    """Join backslash continuations; drop blank lines and comments."""
    out, pending = [], ""
    for line in lines:
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line)
    return out


def commands(line):
    """The simple commands of one line, split at &&, ||, ; and |, as token lists (comments dropped)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commentary = True, "#"
    result, current = [], []
    for token in lexer:
        if token in {"&&", "||", ";", "|", "&", ";;"}:
            result.append(current)
            current = []
        else:
            current.append(token)
    result.append(current)
    return [c for c in result if c]


def strip_env(tokens):
    """Leading VAR=value assignments off a command."""
    i = 0
    while i < len(tokens) and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[i]):
        i += 1
    return tokens[i:]


def session_commands(lines, cwd=REPO):
    """(line, cwd, tokens) for every command of a block read top to bottom. A line that is only `cd DIR` moves the
    rest of the block to DIR; `cd DIR && cmd` runs cmd in DIR, that line only (each such line is a command to paste
    from the block's directory)."""
    for line in shell_lines(lines):
        line_cwd = cwd
        cmds = [t for t in (strip_env(c) for c in commands(line)) if t]
        for tokens in cmds:
            if tokens[0] == "cd" and len(tokens) == 2:
                line_cwd = (line_cwd / tokens[1]).resolve()
                if len(cmds) == 1:
                    cwd = line_cwd
            yield line, line_cwd, tokens


def mixed_cd_blocks(text):
    """Blocks in which some command lines start with `cd DIR &&` and others do not: a reader cannot tell which
    directory the other lines run in."""
    mixed = []
    for lang, lines in code_blocks(text):
        if lang not in SHELL_LANGS:
            continue
        starts = [bool(re.match(r"^cd\s+\S+\s*&&", line)) for line in shell_lines(lines)]
        if any(starts) and not all(starts):
            mixed.append("\n".join(lines))
    return mixed


def all_readme_commands():
    text = README.read_text()
    found = []
    for lang, lines in code_blocks(text):
        if lang in SHELL_LANGS:
            found += list(session_commands(lines))
    for span in inline_commands(text):
        found += list(session_commands([span]))
    return found


@functools.lru_cache(maxsize=None)
def help_text(script):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"{script} --help failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.stdout


def makefile_targets():
    text = (REPO / "Makefile").read_text()
    targets = set()
    for match in re.finditer(r"^([^\s#=:][^=:\n]*?)\s*:(?!=)", text, flags=re.M):
        targets.update(match.group(1).split())
    return targets


def check_command(line, cwd, tokens):
    """Problems with one command, as strings (empty: fine)."""
    problems = []
    program = Path(tokens[0]).name
    if program == "cd":
        return [] if cwd.is_dir() else [f"`{line}`: no directory {cwd} (a `cd` earlier in the same block?)"]
    if program == "make":
        targets = makefile_targets()
        makefile = (REPO / "Makefile").read_text()
        for arg in tokens[1:]:
            if arg.startswith("-"):
                continue
            if "=" in arg:
                var = arg.split("=", 1)[0]
                if f"$({var})" not in makefile:
                    problems.append(f"`{line}`: the Makefile never reads {var}")
            elif arg not in targets:
                problems.append(f"`{line}`: no make target {arg!r}")
        return problems
    if program not in LAUNCHERS:
        return problems
    scripts = [i for i, t in enumerate(tokens) if t.endswith((".py", ".sh")) and not t.startswith("-")]
    if not scripts:
        return problems  # python -c, python -m without a script, ...
    i = scripts[0]
    script = (cwd / tokens[i]).resolve()
    if not script.is_file():
        where = "the repo root" if cwd == REPO else cwd.relative_to(REPO) if cwd.is_relative_to(REPO) else cwd
        return [f"`{line}`: no script {tokens[i]} in {where} (a `cd` earlier in the same block?)"]
    if script.suffix != ".py":
        return problems
    usage = help_text(script)
    for arg in tokens[i + 1:]:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", usage):
                problems.append(f"`{line}`: {script.relative_to(REPO)} has no {flag} (not in its --help)")
    return problems


def test_readme_commands_match_the_code():
    found = all_readme_commands()
    scripts = {(cwd / t).resolve() for _, cwd, tokens in found if Path(tokens[0]).name in LAUNCHERS
               for t in tokens if t.endswith(".py") and (cwd / t).is_file()}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # each --help is mostly imports: start them together
        list(pool.map(help_text, sorted(scripts)))
    assert any(Path(t[0]).name in LAUNCHERS for _, _, t in found), "no script commands found in README.md"
    problems = [p for line, cwd, tokens in found for p in check_command(line, cwd, tokens)]
    assert not problems, "README.md drifted from the code:\n" + "\n".join(problems)


def test_no_block_mixes_cd_lines_with_other_lines():
    mixed = mixed_cd_blocks(README.read_text())
    assert not mixed, "README.md code blocks mix `cd DIR && ...` lines with lines run elsewhere:\n" + "\n---\n".join(mixed)


def test_readme_relative_links_exist():
    text = README.read_text()
    links = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
    missing = []
    for target in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s)://, mailto:, anchors
        path = target.split("#", 1)[0]
        if path and not (REPO / path).exists():
            missing.append(target)
    assert not missing, f"README.md links to missing files: {missing}"


def test_file_structure_paths_exist():
    """Every path listed in the README's "File structure" block exists (a moved module or folder fails here)."""
    section = README.read_text().split("## File structure", 1)
    assert len(section) == 2, "README.md has no '## File structure' section"
    blocks = code_blocks(section[1])
    assert blocks, "no code block under '## File structure'"
    paths = [line.split()[0] for line in blocks[0][1] if line.strip()]
    paths = [p for p in paths if "/" in p or "." in p]
    assert len(paths) > 10, paths
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, f"README.md's file structure lists missing paths: {missing}"


def test_file_structure_lists_every_library_module():
    """A module added to llm_train/ gets its line in the README's file structure."""
    listed = set(re.findall(r"llm_train/(\w+\.py)", README.read_text().split("## File structure", 1)[1]))
    modules = {p.name for p in (REPO / "llm_train").glob("*.py") if p.name != "__init__.py"}
    assert not modules - listed, f"llm_train/ modules missing from README.md's file structure: {sorted(modules - listed)}"


def test_checker_catches_drift():
    """The checker itself: a made-up flag, a missing script, a repo-root path after `cd PreTrain`, a missing target."""
    bad = ["python PreTrain/model.py --no-such-flag-xyz 3",
           "python PreTrain/no_such_script.py",
           "cd PreTrain",
           "python PreTrain/model.py --preset cpu",
           "make no-such-target"]
    problems = [p for line, cwd, tokens in session_commands(bad) for p in check_command(line, cwd, tokens)]
    assert len(problems) == 4, problems
    assert "--no-such-flag-xyz" in problems[0] and "no_such_script.py" in problems[1]
    assert "PreTrain/model.py" in problems[2] and "no-such-target" in problems[3]
    good = ["cd PreTrain && deepspeed --num_gpus=4 model.py --deepspeed ds_config.json",
            "cd PreTrain && torchrun --nproc_per_node=4 model.py", "make all SCALE=smoke"]
    assert [p for line, cwd, tokens in session_commands(good) for p in check_command(line, cwd, tokens)] == []
    assert mixed_cd_blocks("```bash\ncd PreTrain && python model.py\npython PreTrain/inference.py\n```\n")
    assert not mixed_cd_blocks("```bash\ncd PreTrain && python model.py\n# a comment\ncd PreTrain && python x.py\n```\n")


@pytest.mark.parametrize("line, expected", [
    ("DS_ACCELERATOR=cpu deepspeed --num_gpus=2 PreTrain/model.py --deepspeed x  # c", [["deepspeed", "--num_gpus=2",
                                                                                      "PreTrain/model.py",
                                                                                      "--deepspeed", "x"]]),
    ('python a.py --prompt "a # b" && make chat', [["python", "a.py", "--prompt", "a # b"], ["make", "chat"]]),
])
def test_command_parsing(line, expected):
    assert [strip_env(c) for c in commands(line)] == expected
