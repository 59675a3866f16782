"""Trainer runs (SFT, reward model, GRPO): what a rerun resumes (the checkpoint dir holds a lineage.json of the run
that writes it), training on from a checkpoint with the logging window it was in, or only finishing a run whose last
checkpoint is already written; the runs' JSON-lines logs and history, the launch check of multi-process runs, and
the split of a global batch over the processes."""
import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

from llm_train.atomic import atomic_write_bytes
from llm_train.errors import UserError
from llm_train.lineage import output_fingerprint, read_lineage, write_lineage
from llm_train.runtime import DTYPE_ENV, end_distributed


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


LOG_WINDOW = "log_window_rank{}.json"


def _log_window_callback(trainer, resume):
    """A TrainerCallback that keeps the Trainer's logging window across a resume. The Trainer logs the mean loss of
    the steps since its last log, but a checkpoint does not hold the loss summed since then: a run resumed from a
    checkpoint between two logging steps logged the mean of the steps after the checkpoint only (another number than
    the uninterrupted run's). Each checkpoint gets that sum and the window's first step (per process, as each
    process logs its own sum before they are averaged), and a resumed run starts from them."""
    from transformers import TrainerCallback

    class KeepLogWindow(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            window = Path(resume or "") / LOG_WINDOW.format(args.process_index)
            if resume and window.is_file():
                saved = json.loads(window.read_text())
                trainer._tr_loss += saved["loss_sum"]
                trainer._globalstep_last_logged = saved["last_logged_step"]

        def on_save(self, args, state, control, **kwargs):
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                (checkpoint / LOG_WINDOW.format(args.process_index)).write_text(json.dumps(
                    {"loss_sum": trainer._tr_loss.item(), "last_logged_step": trainer._globalstep_last_logged}))

    return KeepLogWindow()


def train_or_finish(trainer, resume, finished):
    """trainer.train(), resuming from checkpoint `resume` with the logging window it was in (so every logged loss is
    the uninterrupted run's). A checkpoint at the run's last step is only loaded: the Trainer would otherwise train
    one step past the end before noticing it is done."""
    if finished:
        from transformers import TrainerState

        trainer._load_from_checkpoint(resume)
        trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        return
    trainer.add_callback(_log_window_callback(trainer, resume))
    trainer.train(resume_from_checkpoint=resume)


def train_and_end(trainer, resume, finished, log_file, stage):
    """train_or_finish, after saying on the main process that the run resumes (and marking in log_file where the
    killed run's lines end); then the process group ends (rank 0 goes on alone: saving and evaluating use no
    collectives). Returns the seconds it took."""
    import time

    if resume and trainer.accelerator.is_main_process:
        print(f"resuming from {resume}" + (" (the run's last step: nothing left to train)" if finished else ""))
        append_jsonl(log_file, {"stage": stage, "event": "resume", "checkpoint": resume, "time": time.time()})
    t0 = time.time()
    train_or_finish(trainer, resume, finished)
    end_distributed()
    return time.time() - t0


def jsonl_log_callback(files):
    """A TrainerCallback appending each log of the main process as one JSON line to every file in files ({path:
    fields}): {**fields, step, epoch, time, **logs} (train.log of all stages, a run's history.jsonl)."""
    import time

    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
                for path, fields in files.items():
                    append_jsonl(path, {**fields, **record})

    return JsonlLog()


def append_jsonl(path, record):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


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


def mean_train_loss(log_history):
    """(mean training loss over steps 1..N, N) from the Trainer's log history, which a resumed run restores from the
    checkpoint: each logged loss is the mean over the steps since the previous log. (The Trainer's own training_loss
    after a resume is the resumed steps' loss sum divided by all steps.)"""
    total, last = 0.0, 0
    for entry in log_history:
        if "loss" in entry:
            total, last = total + entry["loss"] * (entry["step"] - last), entry["step"]
    return total / max(last, 1), last


def mean_logged(state, key):
    """Mean of the values logged under `key` over the whole run (a resumed run's log history includes the steps
    before the resume), or None if none were logged."""
    values = [h[key] for h in state.log_history if key in h]
    return sum(values) / len(values) if values else None


def check_launch():
    """`accelerate launch --num_processes=N` without --multi_gpu on a machine without GPUs starts ONE process (it sets
    MASTER_ADDR for the N asked for, but no WORLD_SIZE): stop instead of silently training alone."""
    if "ACCELERATE_DYNAMO_BACKEND" not in os.environ or "MASTER_ADDR" not in os.environ or "WORLD_SIZE" in os.environ:
        return
    try:  # the launcher's own command line says how many processes were asked for
        launcher = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        launcher = []
    asked = next((arg.partition("=")[2] or after for arg, after in zip(launcher, launcher[1:] + [""])
                  if arg.partition("=")[0] in ("--num_processes", "--num-processes")), "N")
    raise UserError(f"accelerate launch started 1 process, not the {asked} asked for (without --multi_gpu it runs one "
                    f"process on CPUs): run `accelerate launch --multi_gpu --num_processes={asked} "
                    f"{shlex.join(sys.argv)}` (gloo on CPUs, nccl on GPUs)")


def write_history(log_history, path):
    """A Trainer's log history as one JSON line per step: {step, loss, lr, eval_loss} (4 decimals)."""
    rows = {}
    for entry in log_history:
        row = rows.setdefault(entry["step"], {"step": entry["step"], "loss": None, "lr": None, "eval_loss": None})
        if "loss" in entry:
            row.update(loss=round(entry["loss"], 4), lr=entry.get("learning_rate"))
        if "eval_loss" in entry:
            row["eval_loss"] = round(entry["eval_loss"], 4)
    lines = "".join(json.dumps(r) + "\n" for r in sorted(rows.values(), key=lambda r: r["step"]))
    atomic_write_bytes(path, lines.encode())


class BatchSplit(NamedTuple):
    per_device: int  # examples per process per micro step
    accum: int  # micro steps per optimizer step
    processes: int
    total: int  # examples per optimizer step over all processes: per_device x accum x processes
    asked: int  # the global batch asked for

    def describe(self, what):
        """'16 conversations per optimizer step = 2 processes x 4 per device x 2 accumulation steps' (+ why it is
        not the global batch asked for, when it cannot be)."""
        line = (f"{self.total} {what} per optimizer step = {self.processes} process{'es' * (self.processes > 1)} x "
                f"{self.per_device} per device x {self.accum} accumulation step{'s' * (self.accum > 1)}")
        if self.total != self.asked:
            line += f" (the nearest to the {self.asked} asked for that {self.processes} processes can split)"
        return line


def split_global_batch(global_batch, max_per_device=None, processes=None, multiple_of=1):
    """How `processes` (default: $WORLD_SIZE, else 1) train `global_batch` examples per optimizer step, as
    pretraining's global batch does: per-device micro batches of at most max_per_device (default: the whole share)
    times accumulation steps, so 1 or 8 processes take the same optimizer steps. When no split is exact, the nearest
    total (ties: the smaller one) that is a multiple of `multiple_of` (GRPO: whole groups); then the fewest
    accumulation steps, then the largest micro batch."""
    processes = processes or int(os.environ.get("WORLD_SIZE", "1"))
    max_per_device = max_per_device or max(1, -(-global_batch // processes))
    best = None
    for micro in range(1, max_per_device + 1):
        around = global_batch / (micro * processes)
        for accum in range(max(1, int(around) - multiple_of), int(around) + multiple_of + 2):
            total = micro * accum * processes
            if total % multiple_of:
                continue
            key = (abs(total - global_batch), total > global_batch, accum, -micro)
            if best is None or key < best[0]:
                best = key, BatchSplit(micro, accum, processes, total, global_batch)
    return best[1]


def add_batch_flags(parser, what, micro_preset=False):
    """--batch-size (the global batch), --micro-batch and --gradient-checkpointing (alias --activation-checkpointing,
    pretraining's name) of the Trainer stages; `what`: the examples ('pairs'); micro_preset: the preset sets
    --micro-batch (else the default is the process's whole share)."""
    from llm_train.cli import positive_int

    parser.add_argument("--batch-size", type=positive_int,
                        help=f"(preset) {what} per optimizer step over all processes (the global batch): 1 or 8 "
                             "processes train the same steps")
    parser.add_argument("--micro-batch", type=positive_int,
                        help=("(preset) " if micro_preset else "") + f"the most {what} per process per micro step"
                        + ("" if micro_preset else " (default: the process's whole share)")
                        + "; the rest is gradient accumulation")
    parser.add_argument("--gradient-checkpointing", "--activation-checkpointing", action="store_true",
                        help="recompute activations in the backward pass: less memory, about a third more compute")


def effective_batch(args, asked, what):
    """The Trainer's own examples per optimizer step, in words, from its TrainingArguments `args`: '16 conversations
    per optimizer step = 2 processes x 4 per device x 2 accumulation steps' (`asked`: the global batch asked for)."""
    per_optimizer_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return BatchSplit(args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size,
                      per_optimizer_step, asked).describe(what)


def recipe_log_callback(asked, what, say):
    """A TrainerCallback that says (say(line), on the main process, when training starts) the Trainer's examples per
    optimizer step (effective_batch) and whether the model it trains recomputes activations (--gradient-checkpointing,
    which the Trainer turns on at the start of train())."""
    from transformers import TrainerCallback

    class LogRecipe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero:
                on = bool(getattr(model, "is_activation_checkpointing", False))
                say(effective_batch(args, asked, what) + f"; gradient checkpointing {'on' if on else 'off'}")

    return LogRecipe()
