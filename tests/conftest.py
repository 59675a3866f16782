"""Shared fixtures: a small real tokenizer trained by the project's own stage-1 code, and a tiny GPT-2 saved in the
same Hugging Face layout as output/ (the stand-in "pretrained" model for SFT and RLHF tests)."""
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from llm_train.arithmetic import arithmetic_tasks
from llm_train.paths import load_script
from llm_train.tokenizer import load_tokenizer

import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # OpenMP threads sleep instead of spinning on shared CPUs


def run_group(cmd, timeout, **kwargs):
    """subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, ...) in a process group of its own that is
    killed whole if the test ends early (timeout, failure): a launcher's ranks never outlive the test, holding RAM,
    ports or a compiler lock."""
    import signal

    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_script(relpath, *args, cwd=REPO, timeout=600, env=None, check=True):
    """Run a stage script as a user would; returns the CompletedProcess (stdout+stderr captured as text)."""
    full_env = {**os.environ, **(env or {})}
    proc = run_group([PY, str(REPO / relpath), *map(str, args)], cwd=cwd, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{relpath} {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def sample_texts():
    """A small mixed corpus: English, Chinese, Python code and the arithmetic tasks."""
    import json as json_module

    code = [Path(json_module.__file__).read_text(), Path(importlib.__file__).read_text()]
    english = ["The quick brown fox jumps over the lazy dog. " * 20,
               "Four score and seven years ago our fathers brought forth on this continent a new nation. " * 10]
    chinese = ["学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？" * 10,
               "床前明月光，疑是地上霜。举头望明月，低头思故乡。" * 10]
    tasks = [t["prompt"] + " " + t["response"] for t in arithmetic_tasks(200, "train")]
    return english + chinese + code + tasks


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A 600-token byte-level BPE tokenizer trained with the stage-1 code, saved like tokenizer/."""
    stage = load_script("PreTrain/train_byte_level_bpe_tokenizer.py")
    out = tmp_path_factory.mktemp("tokenizer") / "tokenizer"
    stage.save(stage.train(sample_texts(), vocab_size=600), out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer_dir, tmp_path_factory):
    """A randomly initialised 2-layer GPT-2 plus tokenizer files, in the layout of output/."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = load_tokenizer(tiny_tokenizer_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=64, n_layer=2, n_head=2,
                        activation_function="gelu_pytorch_tanh",  # as PreTrain/model.py exports
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(config)
    out = tmp_path_factory.mktemp("output") / "output"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def free_port():
    """A TCP port nobody listens on now, for a launcher's rendezvous (so two test runs can share a machine)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The precision-sensitive tests run under both compute dtypes on any CPU (bf16 is slow but correct without bf16
# units): parametrize with this and set DTYPE_ENV in the test (monkeypatch.setenv / a subprocess env).
BOTH_DTYPES = pytest.mark.parametrize("dtype", ["fp32", "bf16"])


# The test files whose tests read the smoke pipeline's outputs (the smoke_repo fixture below).
SMOKE_REPO_FILES = {"test_eval.py", "test_pipeline.py", "test_user_snippet.py", "test_webui.py"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs the tests in 2 processes (pytest-xdist), one test at a time to whichever is free, except
    the tests of SMOKE_REPO_FILES: they run in one process, so that `make all SCALE=smoke` runs once. (xdist's own
    --dist loadgroup no longer groups anything under pytest 9.)"""
    from xdist.scheduler import LoadScopeScheduling

    class SmokeRepoTestsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return "smoke_repo" if Path(nodeid.split("::")[0]).name in SMOKE_REPO_FILES else nodeid

    return SmokeRepoTestsTogether(config, log)


def pytest_collection_modifyitems(items):
    stray = {item.path.name for item in items if "smoke_repo" in getattr(item, "fixturenames", ())} - SMOKE_REPO_FILES
    if stray:  # their tests would build the smoke pipeline once more, in the other process
        raise pytest.UsageError(f"tests/conftest.py: add {sorted(stray)} to SMOKE_REPO_FILES (they use smoke_repo)")


def checkout_env(root):
    """The environment for running scripts of the repo copy `root`: its own llm_train/ (the shared .venv/ has this
    checkout's installed in editable mode, whose paths are this checkout's), as the Makefile sets it."""
    return {**os.environ, "PYTHONPATH": str(root)}


@pytest.fixture(scope="session")
def smoke_repo(tmp_path_factory):
    """A copy of the repo's tracked and untracked-but-not-ignored files, sharing .venv/, after `make all SCALE=smoke`.
    Shared by every test that needs real stage outputs (pipeline, web UI, eval); a test that changes it uses a copy."""
    root = tmp_path_factory.mktemp("pipeline") / "llm_train"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)  # keeps mtimes: .venv/.installed stays newer than requirements.txt
    os.symlink(REPO / ".venv", root / ".venv")
    proc = run_group(["make", "all", "SCALE=smoke"], cwd=root, timeout=900, env=checkout_env(root))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return root, proc.stdout
