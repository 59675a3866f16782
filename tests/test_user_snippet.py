"""The usage snippet users copy from the README (the seed's, verbatim: base + SFT adapter, generate(max_length=200))
runs on a `make all` run's outputs, and the CPU default has the context it needs."""
import re
import subprocess

from conftest import PY, REPO, checkout_env, load_script


def readme_snippet():
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return next(b for b in blocks if "max_length=200" in b)


def test_the_cpu_default_has_room_for_max_length_200():
    assert load_script("PreTrain/model.py").PRESETS["cpu"]["context_length"] >= 200
    cpu_flags = (REPO / "Makefile").read_text().split("\nelse\n")[-1]
    assert int(re.search(r"CHUNK_FLAGS := --context-length (\d+)", cpu_flags).group(1)) >= 200


def test_the_readme_snippet_runs_verbatim_on_the_outputs(smoke_repo):
    root, _ = smoke_repo
    snippet = readme_snippet()
    assert "./output" in snippet and "./SFT/sft_output" in snippet and "temperature=0.7" in snippet
    proc = subprocess.run([str(PY), "-c", snippet], cwd=root, env=checkout_env(root), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() and "Traceback" not in proc.stderr
