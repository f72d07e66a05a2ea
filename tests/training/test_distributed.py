import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not available")
def test_two_process_gloo_run_ends_with_identical_weights(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29533", str(HERE / "ddp_worker.py"),
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2 and "MULTI_CPU" in r0["type"]
    assert r0["first"] == r1["first"] and r0["sum"] == r1["sum"]
    logs = [json.loads(line) for line in open(tmp_path / "logs.jsonl")]
    assert logs[-1]["step"] == 6
