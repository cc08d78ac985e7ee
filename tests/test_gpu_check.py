"""The prepared GPU check (``scripts/gpu_check.py``) runs its device-independent checks on CPU + gloo here.

On a GPU machine it adds NCCL, the no-host-sync step, the NCCL stream check and
CUDA peak memory; here the same script must train its toy MoE with
``strict=True`` at degree 2, equal to eager, and exit 0, so the check stays
runnable for the day a GPU is lent. Asking for CUDA where there is none is a
clear error naming the valid choice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "gpu_check.py")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gpu_check_passes_its_device_independent_checks_on_cpu():
    res = subprocess.run([sys.executable, SCRIPT, "--device", "cpu"], capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "gpu_check: every check passed on cpu (gloo)" in res.stdout
    body = json.loads(res.stdout[res.stdout.index("{"):res.stdout.rindex("}") + 1])
    assert {k: v["degrees"] for k, v in body["graphs"].items()} == {"forward": {"0": 2, "1": 2},
                                                                     "backward": {"0": 2, "1": 2}}
    assert all(v["peak_bytes"] > 0 and v["traced_peak_bytes"] > 0 for v in body["graphs"].values())
    assert body["worst_grad_diff"] <= 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_asking_for_cuda_without_a_gpu_names_the_valid_choice():
    res = subprocess.run([sys.executable, SCRIPT, "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no CUDA device here; valid choices on this machine: cpu" in res.stderr
