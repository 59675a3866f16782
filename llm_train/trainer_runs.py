"""Trainer runs (SFT, reward model, GRPO): what a rerun resumes, and finishing a run whose last checkpoint is
already written. The checkpoint dir holds a lineage.json of the run that writes it."""
import json
import shutil
from pathlib import Path

from llm_train.errors import UserError
from llm_train.lineage import output_fingerprint, read_lineage, write_lineage
from llm_train.runtime import DTYPE_ENV


def latest_trainer_checkpoint(checkpoint_dir):
    """The newest checkpoint-N of a transformers Trainer run that is complete: trainer_state.json is written last,
    so a checkpoint cut short by a kill lacks it and is skipped. None if there is none."""
    done = [d for d in Path(checkpoint_dir).glob("checkpoint-*")
            if d.name.split("-")[-1].isdigit() and (d / "trainer_state.json").is_file()]
    return str(max(done, key=lambda d: int(d.name.split("-")[-1]))) if done else None


def _difference(run, stage, settings, may_grow, parents):
    """Why checkpoints of the recorded `run` cannot be continued by this one (None if they can)."""
    if run is None or run.get("stage") != stage:
        return "no record of the run that wrote them"
    old = run.get("settings", {})
    for key in sorted(set(old) | set(settings)):
        a, b = old.get(key), settings.get(key)
        if a != b and not (key in may_grow and a is not None and b is not None and b > a):
            if key.endswith("_sha256"):  # a fingerprint of the training data: its values say nothing
                return f"it trained on other data ({key} differs)"
            if key == "dtype":
                return f"compute dtype {a} there, {b} now; {DTYPE_ENV}={a} picks the same"
            return f"{'processes' if key == 'processes' else '--' + key.replace('_', '-')} {a} there, {b} now"
    for role, path in parents.items():
        recorded = run.get("parents", {}).get(role)
        if (recorded and recorded["fingerprint"]) != (path and output_fingerprint(path)):
            was = recorded["path"] if recorded else "none"
            return f"its {role} was {was}, now {path or 'none'} (or it changed since)"
    return None


def checkpoint_to_resume(ckpt_dir, stage, settings, force, may_grow=(), **parents):
    """(checkpoint to resume from or None, whether it is the run's last step) for a Trainer run writing to
    ckpt_dir. The checkpoints must come from a run with the same settings and parents, recorded in
    ckpt_dir/lineage.json; settings in may_grow may only be larger now (more epochs at a constant learning rate
    continue that run exactly). Otherwise: a UserError saying what differs, or with force, a fresh start.
    Call it on every process: they all read the checkpoints before the main one changes anything."""
    from accelerate import PartialState

    ckpt_dir = Path(ckpt_dir)
    latest = latest_trainer_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
    run = read_lineage(ckpt_dir)
    why = latest and _difference(run, stage, settings, may_grow, parents)
    if why and not force:
        raise UserError(f"{ckpt_dir} holds checkpoints of another run ({why}): rerun with that run's flags to "
                        f"finish it, or pass --force to discard them and start over")
    finished = False
    if latest and not why and run["settings"] == settings:
        done = json.loads((Path(latest) / "trainer_state.json").read_text())
        finished = done["global_step"] >= done["max_steps"]
    state = PartialState()  # under a launcher: the process group, so that the processes can wait for each other
    state.wait_for_everyone()
    if state.is_main_process:
        if why:
            print(f"{ckpt_dir} holds checkpoints of another run ({why}): --force, so starting over", flush=True)
            shutil.rmtree(ckpt_dir)
        write_lineage(ckpt_dir, stage, settings, **parents)
    state.wait_for_everyone()
    return (None, False) if why else (latest, finished)


def train_or_finish(trainer, resume, finished):
    """trainer.train(), resuming from checkpoint `resume`. A checkpoint at the run's last step is only loaded:
    the Trainer would otherwise train one step past the end before noticing it is done."""
    if finished:
        from transformers import TrainerState

        trainer._load_from_checkpoint(resume)
        trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        return
    trainer.train(resume_from_checkpoint=resume)


def rerun_command(script, **flags):
    """`python SCRIPT` plus the path flags (name=(value, default)) whose value is not the default: the command that
    rebuilds an output, for error messages."""
    return " ".join([f"python {script}"] + [f"--{name.replace('_', '-')} {value}" for name, (value, default)
                                            in flags.items() if Path(value).resolve() != Path(default).resolve()])


def checkpoint_epoch(checkpoint):
    """The epoch a run resumed from `checkpoint` continues in (0 when starting fresh)."""
    if not checkpoint:
        return 0
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["epoch"])


def mean_logged(state, key):
    """Mean of the values logged under `key` over the whole run (a resumed run's log history includes the steps
    before the resume), or None if none were logged."""
    values = [h[key] for h in state.log_history if key in h]
    return sum(values) / len(values) if values else None
