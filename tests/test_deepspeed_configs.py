"""The DeepSpeed configs besides ds_config.json (ZeRO-2, tested in test_pretrain.py): PreTrain/ds_config_zero3.json
(ZeRO-3, with the tied LM head) and PreTrain/ds_config_offload.json (ZeRO-2 with the optimizer on the CPU), each run
by PreTrain/model.py on 2 CPU ranks at tiny size in fp32, killed and resumed.

The ZeRO-3 runs use the shipped config with stage3_param_persistence_threshold 0: at the shipped 1e5 every parameter of
the tiny model would stay whole on every rank, and the tied head's partitioned path would go untested. The offload run
JIT-builds DeepSpeed's CPU Adam op on first use (~2 minutes, cached in ~/.cache/torch_extensions)."""
import json

from llm_train import pretrain_checkpoint as checkpoints
from llm_train.distributed import deepspeed_config
from llm_train.errors import UserError
from llm_train.gpt import GPT
from llm_train.tokenizer import load_tokenizer

import numpy as np
import pytest
import torch
from test_pretrain import CTX, FP32, SCHEDULE, TINY, dirs, history, launch, losses, summary, write_chunks

from conftest import REPO

CONFIGS = ["ds_config.json", "ds_config_zero3.json", "ds_config_offload.json"]


@pytest.fixture(scope="module")
def chunks_dir(tiny_tokenizer_dir, tmp_path_factory):
    return write_chunks(tiny_tokenizer_dir, tmp_path_factory.mktemp("chunks"))


@pytest.fixture(scope="module")
def zero3_config(tmp_path_factory):
    config = json.loads((REPO / "PreTrain/ds_config_zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the tiny model's weights
    path = tmp_path_factory.mktemp("config") / "ds_config_zero3.json"
    path.write_text(json.dumps(config))
    return path


def args_for(config):
    return [*TINY, *SCHEDULE, "--batch-size", 2, "--deepspeed", config]


@pytest.fixture(scope="module")
def zero3_run(zero3_config, tiny_tokenizer_dir, chunks_dir, tmp_path_factory):
    """The uninterrupted ZeRO-3 run of test_pretrain's SCHEDULE: 2 ranks x 2 rows x 2 micro batches, fp32."""
    out = tmp_path_factory.mktemp("zero3")
    proc = launch("deepspeed", 2, [*args_for(zero3_config), *dirs(out, tiny_tokenizer_dir, chunks_dir)], env=FP32)
    for noise in ("FutureWarning", "Traceback"):
        assert noise not in proc.stdout + proc.stderr, noise
    return out


def exported_weights(out_dir):
    from safetensors.torch import load_file

    return load_file(str(out_dir / "model.safetensors"))


def assert_trained(out_dir):
    curve = losses(out_dir)
    assert sorted(curve) == list(range(1, 7)) and all(np.isfinite(list(curve.values())))
    assert curve[6] < curve[1] - 0.1, curve


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_fill(name):
    """Every "auto" is filled from the flags, the _comment dropped; the three differ where they should."""
    optimizer = {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.1}
    config = deepspeed_config(REPO / "PreTrain" / name, 4, 2, 2, 16 * 128, 1.0, True, optimizer)
    assert "auto" not in json.dumps(config) and "_comment" not in config
    assert config["train_batch_size"] == 16 and config["bf16"]["enabled"] is True
    assert config["optimizer"]["params"]["betas"] == [0.9, 0.95]
    zero = config["zero_optimization"]
    assert zero["stage"] == (3 if "zero3" in name else 2)
    offload = zero.get("offload_optimizer", {}).get("device", "none")
    assert offload == ("cpu" if "offload" in name else "none")
    # CPU offload steps with DeepSpeedCPUAdam: a torch optimizer there is DeepSpeed's error
    assert ("torch_adam" in config["optimizer"]["params"]) == (offload == "none")
    if name == "ds_config.json":
        assert "offload_optimizer to" not in (REPO / "PreTrain" / name).read_text()  # now its own file


def test_stage_mismatch_is_one_error(tmp_path):
    """A ZeRO-1/2 checkpoint is not resumed under ZeRO-3, nor the other way round (DeepSpeed's own failure is an
    AssertionError deep in its loader): one UserError that names the config to use."""
    z2, z3 = tmp_path / "ckpt2" / "step_000003", tmp_path / "ckpt3" / "step_000003"
    for d, files in ((z2, ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]),
                     (z3, ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])):
        d.mkdir(parents=True)
        for f in files:
            (d / f).touch()
    checkpoints.check_deepspeed_stage(z2, zero3=False)
    checkpoints.check_deepspeed_stage(z3, zero3=True)
    with pytest.raises(UserError, match="written under ZeRO-1/2.*ds_config.json"):
        checkpoints.check_deepspeed_stage(z2, zero3=True)
    with pytest.raises(UserError, match="written under ZeRO-3.*ds_config_zero3.json"):
        checkpoints.check_deepspeed_stage(z3, zero3=False)


def test_zero3_trains_and_exports(zero3_run, tiny_tokenizer_dir, chunks_dir):
    """ZeRO-3 with the tied LM head: the loss falls; every rank holds a shard of the optimizer states; the export
    is the whole fp32 model (not a rank's partition), which AutoModelForCausalLM loads with a tied head and whose
    logits are the trained master weights' (the final checkpoint gathered by zero_to_fp32, run through our GPT) and
    whose val loss is the one the engine measured at the last step."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    out = zero3_run / "output"
    assert_trained(out)
    s = summary(out)
    model_config = s["model_config"]
    assert s["mode"] == "deepspeed" and s["world_size"] == 2
    assert s["params"] == sum(p.numel() for p in GPT(**model_config).parameters())  # whole, not a partition
    step_dir = zero3_run / "ckpt" / "step_000006"
    assert len(list(step_dir.glob("*optim_states.pt"))) == 2

    vocab = len(load_tokenizer(tiny_tokenizer_dir))
    weights = exported_weights(out)
    assert weights["transformer.wte.weight"].shape == (vocab, model_config["n_embd"])
    assert all(w.dtype == torch.float32 and w.numel() > 0 for w in weights.values())
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()

    state = get_fp32_state_dict_from_zero_checkpoint(str(zero3_run / "ckpt"), tag="step_000006")
    ours = GPT(**model_config).eval()
    ours.load_state_dict(state)
    x = torch.randint(0, vocab, (3, CTX))
    with torch.no_grad():
        hf_logits, our_logits = hf(x).logits, ours(x)[..., :vocab]
    torch.testing.assert_close(hf_logits, our_logits, rtol=0, atol=1e-5)
    assert not torch.equal(ours.transformer.wte.weight, GPT(**model_config).transformer.wte.weight)  # trained

    from llm_train.chunks import chunk_rows
    from llm_train.pretrain_data import read_manifest, val_row_indices

    rows = chunk_rows(chunks_dir, read_manifest(chunks_dir, tiny_tokenizer_dir), "val", CTX, vocab)
    val = torch.from_numpy(rows[val_row_indices(len(rows), 6)].astype(np.int64))  # --eval-rows 6
    with torch.no_grad():
        logits = hf(val[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), val[:, 1:].reshape(-1)).item()
    assert loss == pytest.approx(s["final_val_loss"], abs=1e-5)


def kill_and_resume(config, out, tokenizer_dir, chunks_dir):
    """The run of config killed after step 4 (its checkpoint: step 3), then rerun to the end."""
    args = [*args_for(config), *dirs(out, tokenizer_dir, chunks_dir)]
    killed = launch("deepspeed", 2, [*args, "--debug-kill-step", 4], env=FP32, check=False)
    assert killed.returncode != 0 and (out / "ckpt" / "latest").read_text() == "step_000003"
    assert not (out / "output").exists()
    launch("deepspeed", 2, args, env=FP32)
    assert "resumed at step 3 from" in (out / "train.log").read_text()


def test_zero3_resume(zero3_run, zero3_config, tiny_tokenizer_dir, chunks_dir, tmp_path):
    """ZeRO-3 killed after step 4 and rerun resumes at step 3 and ends with the uninterrupted run's losses and
    exported weights, exactly."""
    kill_and_resume(zero3_config, tmp_path, tiny_tokenizer_dir, chunks_dir)
    assert losses(tmp_path / "output") == losses(zero3_run / "output")
    ours, full = exported_weights(tmp_path / "output"), exported_weights(zero3_run / "output")
    assert ours.keys() == full.keys() and all(torch.equal(ours[k], full[k]) for k in full)


def test_offload_trains_and_resumes(zero3_run, tiny_tokenizer_dir, chunks_dir, tmp_path):
    """ds_config_offload.json as shipped (ZeRO-2, DeepSpeedCPUAdam on the CPU), killed after step 4 and rerun: it
    resumes at step 3 and trains the same model as the uninterrupted ZeRO-3 run (torch's fused AdamW there,
    DeepSpeed's CPU Adam here: the same update up to float rounding; a resume that lost the optimizer state or a
    step would be off by far more)."""
    kill_and_resume(REPO / "PreTrain/ds_config_offload.json", tmp_path, tiny_tokenizer_dir, chunks_dir)
    assert_trained(tmp_path / "output")
    ours, ref = losses(tmp_path / "output"), losses(zero3_run / "output")
    np.testing.assert_allclose([ours[s] for s in range(1, 7)], [ref[s] for s in range(1, 7)], rtol=0, atol=1e-5)
    grad_norms = [[h["grad_norm"] for h in history(d / "output") if "grad_norm" in h] for d in (tmp_path, zero3_run)]
    np.testing.assert_allclose(*grad_norms, rtol=0, atol=1e-5)
    ours, full = exported_weights(tmp_path / "output"), exported_weights(zero3_run / "output")
    assert max((ours[k] - full[k]).abs().max().item() for k in full) < 1e-5
