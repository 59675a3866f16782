"""Lineage: every stage output holds lineage.json = {stage, settings, tokenizer_fingerprint, parents: {role: {path,
fingerprint}}}. A stage that loads outputs of earlier stages checks that they still are the ones it was built
from; a stage asked to replace an output that later stages were built from refuses without --force. A parent
inside the repo is recorded relative to it, so a copied or moved checkout still finds its own parents."""
import hashlib
import json
from pathlib import Path

from llm_train import paths
from llm_train.atomic import atomic_write_json
from llm_train.errors import UserError
from llm_train.tokenizer import tokenizer_fingerprint

LINEAGE = "lineage.json"


def output_fingerprint(path):
    """sha256 of what an output *is*: a model dir's weights (*.safetensors), a chunks dir's manifest, or a
    tokenizer dir's tokenizer fingerprint."""
    path = Path(path)
    weights = sorted(path.glob("*.safetensors"))
    if weights:
        h = hashlib.sha256()
        for f in weights:
            with open(f, "rb") as fh:
                h.update(hashlib.file_digest(fh, "sha256").digest())
        return h.hexdigest()
    if (path / "manifest.json").is_file():
        return hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    if (path / "tokenizer.json").is_file():
        return tokenizer_fingerprint(path)
    return None


def read_lineage(path):
    """The lineage.json of the output dir `path` (None if it has none), parent paths made absolute."""
    try:
        lineage = json.loads((Path(path) / LINEAGE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    for recorded in lineage.get("parents", {}).values():
        recorded["path"] = str(paths.REPO / recorded["path"])  # a relative path is the repo's; an absolute one stays
    return lineage


def recorded_parents(out_dir):
    """The parent dirs out_dir's lineage names that still exist, by role (for check_lineage): a parent replaced
    since makes out_dir stale, one deleted since cannot be checked."""
    parents = (read_lineage(out_dir) or {}).get("parents", {})
    return {role: r["path"] for role, r in parents.items() if Path(r["path"]).exists()}


def _lineage_path(path):
    path = Path(path).resolve()
    return str(path.relative_to(paths.REPO)) if path.is_relative_to(paths.REPO) else str(path)


def write_lineage(out_dir, stage, settings, tokenizer_dir=None, **parents):
    """Record in out_dir (usually the temporary dir about to be renamed into place) what it was built from."""
    lineage = {"stage": stage, "settings": settings,
               "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer_dir or out_dir) if (
                   Path(tokenizer_dir or out_dir) / "tokenizer.json").is_file() else None,
               "parents": {role: {"path": _lineage_path(p), "fingerprint": output_fingerprint(p)}
                           for role, p in parents.items() if p is not None}}
    atomic_write_json(Path(out_dir) / LINEAGE, lineage)
    return lineage


def check_lineage(child_dir, rerun, **parents):
    """UserError if child_dir was built from another version of one of the given parent dirs (e.g. an adapter
    trained on an older base): names both directories and the command `rerun` that rebuilds the child.
    Outputs without lineage.json (made elsewhere) are not checked."""
    lineage = read_lineage(child_dir)
    if lineage is None:
        return
    for role, parent in parents.items():
        recorded = lineage.get("parents", {}).get(role)
        if parent is None or recorded is None:
            continue
        if recorded["fingerprint"] != output_fingerprint(parent):
            raise UserError(f"{child_dir} was built from a different {role} than the one in {parent} (replaced "
                            f"since, or another directory): they do not belong together. Rebuild it with `{rerun}`, "
                            f"or point to the matching {role} directory")


def stale_if_replaced(path):
    """The known stage outputs that were built from the output in `path` as it is now (they would silently go
    stale if it were replaced)."""
    path = Path(path).resolve()
    current = output_fingerprint(path)
    if current is None:
        return []
    stale = []
    for other in (paths.CHUNKS_DIR, paths.OUTPUT_DIR, paths.SFT_OUTPUT_DIR, paths.SFT_OUTPUT_DIR / "merged", paths.REWARD_MODEL_DIR,
                  paths.GRPO_OUTPUT_DIR):
        lineage = read_lineage(other)
        if lineage and any(Path(r["path"]) == path and r["fingerprint"] == current
                           for r in lineage.get("parents", {}).values()):
            stale.append(str(other.relative_to(paths.REPO)) if other.is_relative_to(paths.REPO) else str(other))
    return stale


def check_output_dir(out_dir, stage, what):
    """Before a stage replaces out_dir: it must be missing, empty (but for README.md and hidden work files), or a
    previous output of this stage (its lineage.json says so); anything else is left alone with one UserError."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} exists and is not a directory: choose another output directory")
    names = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith(".") and p.name != "README.md") \
        if out_dir.is_dir() else []
    if names and (read_lineage(out_dir) or {}).get("stage") != stage:
        raise UserError(f"{out_dir} holds files that are not a previous {what} output ({', '.join(names[:5])}): "
                        "move them away or choose another output directory; nothing was written")


def refuse_to_replace(path, force, what):
    """Before replacing an existing output: UserError unless --force when later stages were built from it."""
    stale = stale_if_replaced(path)
    if stale and not force:
        raise UserError(f"{path} already holds a {what} that {', '.join(stale)} were built from: replacing it would "
                        f"leave them stale. Pass --force to replace it (then rerun the later stages), or write to "
                        f"another --output-dir; nothing was changed")


def already_done(out_dir, stage, settings, **parents):
    """True (and says so) when out_dir holds this stage's finished output made with exactly these settings from the
    parent outputs (dirs) as they are now; a parent replaced since then means the output must be rebuilt."""
    lineage = read_lineage(out_dir)
    if not lineage or lineage.get("stage") != stage or lineage.get("settings") != settings:
        return False
    recorded = lineage.get("parents", {})
    if any(p is not None and role in recorded and recorded[role]["fingerprint"] != output_fingerprint(p)
           for role, p in parents.items()):
        return False
    print(f"{stage}: {out_dir} is already finished with these settings; nothing to do "
          f"(delete it or pass --force to redo it)", flush=True)
    return True

