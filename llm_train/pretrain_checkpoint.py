"""Pretraining checkpoints: checkpoint_dir/step_NNNNNN/ directories, resumed only by the run that wrote them.

Plain and DDP runs: model.safetensors + optimizer.pt (optimizer and RNG states) + state.json, written into a
temporary directory and renamed. DeepSpeed: engine.save_checkpoint's files + rng.pt + trainer_state.json, made
current by atomically replacing the `latest` file after every rank has written its part. RNG states are always
restored from CPU tensors (torch.set_rng_state and torch.cuda.set_rng_state take nothing else), whatever the device
the rest of a checkpoint is loaded onto."""
import json
import re
import shutil
from pathlib import Path

from llm_train.atomic import atomic_dir, atomic_write_bytes, atomic_write_json
from llm_train.errors import UserError

import torch


def checkpoint_steps(ckpt_dir):
    steps = []
    for d in Path(ckpt_dir).glob("step_*"):
        if d.is_dir() and re.fullmatch(r"step_\d+", d.name):
            steps.append(int(d.name[5:]))
    return sorted(steps)


def latest_checkpoint(ckpt_dir, deepspeed_mode):
    """The tag (step_NNNNNN) of the newest complete checkpoint in ckpt_dir, or None; checkpoints of the other mode
    (DeepSpeed or not) are one UserError."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    latest = ckpt_dir / "latest"
    plain = [s for s in checkpoint_steps(ckpt_dir) if (ckpt_dir / f"step_{s:06d}" / "state.json").is_file()]
    if deepspeed_mode:
        if plain and not latest.is_file():
            raise UserError(f"{ckpt_dir} holds checkpoints of a run without --deepspeed: run without it to resume, "
                            "or choose another --checkpoint-dir")
        return latest.read_text().strip() if latest.is_file() else None
    if latest.is_file() and not plain:
        raise UserError(f"{ckpt_dir} holds DeepSpeed checkpoints: add --deepspeed PreTrain/ds_config.json to resume, "
                        "or choose another --checkpoint-dir")
    return f"step_{plain[-1]:06d}" if plain else None


def prune_checkpoints(ckpt_dir, keep):
    for s in checkpoint_steps(ckpt_dir)[:-keep]:
        shutil.rmtree(Path(ckpt_dir) / f"step_{s:06d}", ignore_errors=True)


def check_resume(state, settings, fingerprints, ckpt_path, ckpt_dir):
    """A checkpoint is resumed only by the run that wrote it: same tokenizer, chunks and settings."""
    start_over = f"delete {ckpt_dir} (or pass another --checkpoint-dir) to train from scratch"
    for what, fingerprint in fingerprints.items():
        if state.get(f"{what}_fingerprint") != fingerprint:
            raise UserError(f"{ckpt_path} was trained with another {what} than the one now given (it was rebuilt "
                            f"since): {start_over}")
    recorded = state.get("settings")
    if recorded is None:
        raise UserError(f"{ckpt_path} was written by an older version of this script: {start_over}")
    if recorded["max_steps"] != settings["max_steps"]:
        raise UserError(f"{ckpt_path} belongs to a run of {recorded['max_steps']} steps (--max-steps "
                        f"{recorded['max_steps']}; its lr schedule ends there), not {settings['max_steps']}: rerun "
                        f"with --max-steps {recorded['max_steps']} to finish that run, or {start_over} for "
                        f"{settings['max_steps']} steps. Nothing was changed")
    changed = [k for k in settings if recorded.get(k) != settings[k]]
    if changed:
        what = "; ".join(f"{k}: {recorded.get(k)} there, {settings[k]} now" for k in changed)
        what += " (rows_per_step = --global-batch-tokens / --context-length)" if "rows_per_step" in changed else ""
        raise UserError(f"{ckpt_path} is a checkpoint of a run with other settings ({what}): rerun with that run's "
                        f"flags to continue it, or {start_over}. Nothing was changed")


def checkpoint_to_resume(ckpt_dir, deepspeed_mode, settings, fingerprints):
    """(path, trainer state) of the newest checkpoint in ckpt_dir, checked to belong to this run, or None. Read
    before the model is trained or the engine built, so a mismatch stops the run at once."""
    tag = latest_checkpoint(ckpt_dir, deepspeed_mode)
    if tag is None:
        return None
    ckpt_path = Path(ckpt_dir) / tag
    state_file = ckpt_path / ("trainer_state.json" if deepspeed_mode else "state.json")
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{state_file} is missing or unreadable: delete {ckpt_path} to resume from the checkpoint "
                        f"before it, or delete {ckpt_dir} to start over") from None
    check_resume(state, settings, fingerprints, ckpt_path, ckpt_dir)
    return ckpt_path, state


def rng_state(device):
    """This process's RNG states: the CPU generator's, and the GPU's on CUDA."""
    state = {"cpu_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state, device):
    """Set the RNG states of rng_state(), from wherever their tensors were loaded (CPU copies are what torch takes);
    the CUDA state only on CUDA."""
    torch.set_rng_state(state["cpu_rng"].cpu())
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)


def save_plain(ckpt_dir, tag, model, optimizer, device, state, keep):
    """Write ckpt_dir/tag in one rename: the weights, the optimizer and RNG states, the trainer state; then delete
    all but the last `keep` checkpoints."""
    from safetensors.torch import save_file

    with atomic_dir(Path(ckpt_dir) / tag) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), **rng_state(device)}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state))
    prune_checkpoints(ckpt_dir, keep)


def load_plain(ckpt_path, model, optimizer, device):
    """Load a save_plain checkpoint into model and optimizer and restore its RNG states. Everything is read onto
    the CPU: load_state_dict copies the weights and optimizer state to the parameters' device, and the RNG states
    must stay CPU tensors."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(Path(ckpt_path) / "model.safetensors")))
    extra = torch.load(Path(ckpt_path) / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    restore_rng(extra, device)


def mark_deepspeed_checkpoint(ckpt_dir, tag, device, state, keep):
    """After every rank has written its part of the DeepSpeed checkpoint ckpt_dir/tag (rank 0 only): add the RNG
    states and the trainer state, make it the one a resumed run loads, and delete all but the last `keep`."""
    torch.save(rng_state(device), Path(ckpt_dir) / tag / "rng.pt")
    atomic_write_json(Path(ckpt_dir) / tag / "trainer_state.json", state)
    atomic_write_bytes(Path(ckpt_dir) / "latest", tag.encode())
    prune_checkpoints(ckpt_dir, keep)


def check_deepspeed_stage(ckpt_path, zero3):
    """A DeepSpeed checkpoint is resumed under the ZeRO stage that wrote it: ZeRO-3 writes a model-states file per
    rank (zero_pp_rank_N_mp_rank_00_model_states.pt), ZeRO-1/2 one (mp_rank_00_model_states.pt), and neither loads
    the other's. zero3: this run's engine is ZeRO-3."""
    written_by_zero3 = any(Path(ckpt_path).glob("zero_pp_rank_*_model_states.pt"))
    if written_by_zero3 != zero3:
        was, now = ("ZeRO-3", "ZeRO-1/2") if written_by_zero3 else ("ZeRO-1/2", "ZeRO-3")
        config = "PreTrain/ds_config_zero3.json" if written_by_zero3 else "PreTrain/ds_config.json"
        raise UserError(f"{ckpt_path} was written under {was}, but this run's --deepspeed config is {now}: rerun with "
                        f"a {was} config (e.g. {config}) to resume it, or delete {Path(ckpt_path).parent} (or pass "
                        "another --checkpoint-dir) to start over. Nothing was changed")


def restore_deepspeed_rng(ckpt_path, device):
    """The RNG states mark_deepspeed_checkpoint saved (checkpoints written before it did have none)."""
    path = Path(ckpt_path) / "rng.pt"
    if path.is_file():
        restore_rng(torch.load(path, map_location="cpu", weights_only=True), device)
