import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))


@pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun not available")
def test_ranks_with_unequal_work_stay_in_lock_step(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", "29541",
                           str(HERE / "onpolicy_ddp_worker.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    for name in ("dopsd", "grpo"):
        a, b = r0[name], r1[name]
        assert a["world"] == b["world"] == 2
        assert a["step"] == b["step"] == 2  # rank 1 accepts nothing, yet both ranks step together
        assert a["forwards"] == b["forwards"]  # the same number of forward passes on every rank
        assert a["tail"] == b["tail"] and a["sum"] == b["sum"]  # gradients were synchronised
