"""FSDP2 on CPU: two processes (gloo) with sharded parameters against references.

* offline (SFT, SelfFusion): 2 processes x 4 examples under FSDP2 against 1 process x 8 examples,
  same seed and data order, the masking noise pinned per half of the global batch (see
  fsdp_worker.py); a checkpoint after every step, a resumed run from step 1, the final exports and
  greedy samples through the sharded model compared;
* on-policy (d-OPSD, diffu-GRPO): rollouts are drawn per rank (their generator is seeded with the
  rank), so a single process cannot draw the same ones; the reference is a 2-process DDP run of the
  same global batch, which draws exactly the same rollouts; FSDP2 must reach the same weights, run
  the same number of forward passes, and resume from a checkpoint to the same weights.

Tolerance: max |difference| of every exported weight < TOL (float32; the sums are reduced in another
order by FSDP's reduce-scatter than by one process, so bit equality is not expected).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
TOL = 1e-5

pytestmark = pytest.mark.skipif(not Path(TORCHRUN).exists() or not torch.distributed.is_available(),
                                reason="torchrun / torch.distributed not available")


def launch(mode: str, out: Path, port: int) -> tuple[dict, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_FSDP": "true",
           "FSDP_VERSION": "2",
           "PYTHONPATH": os.pathsep.join([str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(port), str(HERE / "fsdp_worker.py"),
                           mode, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "rank0.json").read_text()), json.loads((out / "rank1.json").read_text())


def max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def test_offline_fsdp_two_processes_match_one_process(tmp_path):
    from tests.training import fsdp_worker

    r0, r1 = launch("offline", tmp_path / "fsdp", 29563)
    for method in ("sft", "selffusion"):
        single = fsdp_worker.offline(method, tmp_path / "single" / method, world=1)
        a, b = r0[method], r1[method]
        assert a["fsdp"] and b["fsdp"] and not single["fsdp"]
        # the parameters were sharded: each rank held about half of them
        assert a["local_numel"] + b["local_numel"] == a["numel"] and a["local_numel"] < a["numel"]
        fsdp_run, one = tmp_path / "fsdp" / method, tmp_path / "single" / method
        diff = max_diff(fsdp_run / "full" / "final", one / "full" / "final")
        print(f"{method}: FSDP2 x2 vs 1 process, max |diff| of the exported weights {diff:.2e}")
        assert diff < TOL
        resumed = max_diff(fsdp_run / "resumed" / "final", fsdp_run / "full" / "final")
        print(f"{method}: FSDP2 resumed from step 1 vs uninterrupted, max |diff| {resumed:.2e}")
        assert resumed < TOL
        assert max_diff(fsdp_run / "full" / "checkpoints" / "step-0000002",
                        one / "full" / "checkpoints" / "step-0000002") < TOL
        # the weights moved, and clipping was active (max_grad_norm 0.5 < every logged norm)
        assert max_diff(fsdp_run / "full" / "checkpoints" / "step-0000001",
                        fsdp_run / "full" / "checkpoints" / "step-0000004") > 1e-3
        assert all(g > 0.5 for g in a["grad_norms"])
        assert a["grad_norms"] == pytest.approx(single["grad_norms"], rel=1e-4)
        # sampling through the sharded model (without and with the dual cache): both ranks got the same
        # tokens, equal to one process's
        assert a["samples"] == b["samples"] == single["samples"]
        assert a["resumed_samples"] == single["resumed_samples"]
    # the non-finite-gradient guard decides the same on every rank (a NaN in one rank's shard only)
    for r in (r0, r1):
        assert r["guard"]["skip"] == {"step": 3, "skipped": 1}
        assert r["guard"]["stop"]["step"] == 1 and "non-finite gradient norm (nan) at optimizer step 2" in \
            r["guard"]["stop"]["error"]


def test_onpolicy_fsdp_two_processes_match_ddp(tmp_path):
    r0, r1 = launch("onpolicy", tmp_path, 29564)
    for name in ("dopsd", "grpo"):
        a, b = r0[name], r1[name]
        assert a["fsdp"]["fsdp"] and a["resumed"]["fsdp"] and not a["ddp"]["fsdp"]
        # lock-step: every rank ran as many forward passes under FSDP as under DDP, and as the other rank
        assert a["fsdp"]["forwards"] == b["fsdp"]["forwards"] == a["ddp"]["forwards"] > 0
        # the same rollouts were drawn and judged (the verdict depends on the sampled text)
        assert a["fsdp"]["rollouts"] == a["ddp"]["rollouts"] and a["fsdp"]["rollouts"]["accepted"] > 0
        assert a["fsdp"]["step"] == a["resumed"]["step"] == 3
        run = tmp_path / name
        diff = max_diff(run / "fsdp" / "final", run / "ddp" / "final")
        print(f"{name}: FSDP2 x2 vs DDP x2, max |diff| of the exported weights {diff:.2e}")
        assert diff < TOL
        resumed = max_diff(run / "resumed" / "final", run / "fsdp" / "final")
        print(f"{name}: FSDP2 resumed from step 1 vs uninterrupted, max |diff| {resumed:.2e}")
        assert resumed < TOL
        assert max_diff(run / "fsdp" / "checkpoints" / "step-0000001", run / "fsdp" / "checkpoints" / "step-0000003") > 1e-4
