"""The protocol every training stage follows, kept once: a rerun of a finished run is a no-op that says so, an output
that later stages were built from is replaced only with --force, every directory the run will write is checked
before any long work, a Trainer run resumes only its own checkpoints, and the output appears whole (atomic rename)
with its lineage.json.

    stage = Stage("sft", "SFT model", out_dir, settings, force=args.force, parents={"base": args.model_dir})
    if stage.done():
        return
    stage.prepare(writable=[args.checkpoint_dir, args.run_dir])
    resume, finished = stage.resume_point(args.checkpoint_dir)      # Trainer stages
    ... train ...
    with stage.output() as tmp:                                     # tmp replaces out_dir on success
        model.save_pretrained(tmp)
"""
import contextlib
from pathlib import Path

from llm_train.atomic import atomic_dir, check_writable_dir
from llm_train.lineage import already_done, check_output_dir, refuse_to_replace, write_lineage
from llm_train.trainer_runs import checkpoint_to_resume


class Stage:
    """One stage's output directory and what decides it.

    name: the stage's id in lineage.json ('pretrain', 'sft', ...); what: its output in words, for messages.
    settings: the JSON-safe values that decide the output (a rerun with other settings redoes it).
    parents: {role: directory} of the earlier outputs it is built from (None values are left out).
    tokenizer_dir: where the tokenizer fingerprint is read (default: the output itself).
    done_file: a file that must also exist for the run to count as finished (e.g. the evaluation written last)."""

    def __init__(self, name, what, out_dir, settings, force=False, parents=None, tokenizer_dir=None, done_file=None):
        self.name, self.what, self.out_dir = name, what, Path(out_dir)
        self.settings, self.force = settings, force
        self.parents = {role: path for role, path in (parents or {}).items() if path is not None}
        self.tokenizer_dir, self.done_file = tokenizer_dir, done_file

    def done(self):
        """True (and says so) when out_dir holds this stage's finished output with these settings and parents."""
        if self.force or (self.done_file is not None and not Path(self.done_file).is_file()):
            return False
        return already_done(self.out_dir, self.name, self.settings, **self.parents)

    def prepare(self, writable=()):
        """Before any long work: out_dir is this stage's to replace (not someone else's files, not a file; with later
        stages built on it only under --force), and out_dir's parent and every directory in `writable` can be
        written (created if missing). Each problem is one UserError; nothing is written."""
        check_output_dir(self.out_dir, self.name, self.what)
        refuse_to_replace(self.out_dir, self.force, self.what)
        for path in [self.out_dir.parent, *writable]:
            if path is not None:
                check_writable_dir(path)

    def resume_point(self, checkpoint_dir, may_grow=()):
        """(checkpoint to resume from or None, whether it is the run's last step) of a Trainer run checkpointing to
        checkpoint_dir: only checkpoints of a run with the same settings and parents (see trainer_runs)."""
        return checkpoint_to_resume(checkpoint_dir, self.name, self.settings, self.force, may_grow, **self.parents)

    @contextlib.contextmanager
    def output(self, out_dir=None):
        """A temporary directory that replaces out_dir (or another output dir of this stage, e.g. a merged copy)
        in one rename when the block ends without an error, with lineage.json written last."""
        out_dir = Path(out_dir or self.out_dir)
        with atomic_dir(out_dir) as tmp:
            yield tmp
            write_lineage(tmp, self.name, self.settings, tokenizer_dir=self.tokenizer_dir or tmp, **self.parents)
