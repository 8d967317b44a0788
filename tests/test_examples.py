"""Every script in ``examples/`` runs in ``--smoke`` mode: offline, in seconds, exit code 0.

Each script runs in a fresh interpreter (as CI and users run it), from an empty working directory so that a script
writing outside its temporary folder would leave files there, with the Hub forced offline.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py"))
REQUIRED = {
    "reweight_and_merge.py", "sam_training_loop.py", "finetune_teacher.py", "custom_distillation_loop.py",
    "feature_distillation.py", "choose_teacher_checkpoint.py", "publish_to_hub.py", "analysis_plots.py",
    "torchrun_training.py",
}
TIMEOUT_S = 240   # each takes well under 30 s on an idle 2-core machine; CI machines are often busy


def test_all_examples_present_and_listed():
    assert REQUIRED <= set(SCRIPTS), sorted(REQUIRED - set(SCRIPTS))
    readme = (EXAMPLES / "README.md").read_text()
    missing = [name for name in SCRIPTS if name not in readme]
    assert not missing, f"examples/README.md does not list {missing}"


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 30)
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_smoke(script, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--smoke"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    output = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{script} --smoke exited {proc.returncode}\n{output}"
    assert proc.stdout.strip(), f"{script} printed nothing: it should say what it checked"
    assert not list(tmp_path.iterdir()), f"{script} left files in the working directory: {list(tmp_path.iterdir())}"
