"""`kvlib roofline` and `kvlib generate --backend cuda`, run as a user would."""

import json
import os
import subprocess
import sys

from kvlib.config import preset


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "kvlib", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def test_roofline_json_has_the_step_prediction():
    out = run("roofline", "--gpu", "H100-SXM", "--model", "llama-3-8b", "--context", "8192",
              "--batch", "32", "--dtype", "fp16", "--json")
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["attention_flop_per_byte"] == 4.0
    assert row["attention_bytes"] == 32 * 8192 * 131072
    assert row["weight_bytes"] == 2 * preset("llama-3-8b").n_params
    assert row["bound"] == "memory"
    assert abs(row["predicted_step_seconds"] - (row["attention_bytes"] + row["weight_bytes"])
               / 3.35e12) < 1e-12


def test_roofline_list_names_every_gpu_and_its_unconfirmed_figures():
    out = run("roofline", "--list")
    assert out.returncode == 0, out.stderr
    assert "MI300X" in out.stdout and "A100-40GB-SXM" in out.stdout
    assert "unconfirmed" in out.stdout


def test_roofline_bad_input_is_one_line():
    out = run("roofline", "--gpu", "H300", "--model", "llama-3-8b", "--context", "10")
    assert out.returncode == 2 and out.stderr.strip() == (
        "kvlib: error: unknown GPU 'H300'; known: A100-40GB-SXM, A100-80GB-SXM, H100-SXM, "
        "H100-PCIe, H200-SXM, L4, L40S, RTX-4090, MI300X")
    out = run("roofline", "--gpu", "L4")
    assert out.returncode == 2 and "needs --gpu NAME, --model NAME" in out.stderr


def test_generate_cuda_without_gpu_or_simulator_says_how_to_enable_it():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out = run("generate", "Hi", "--cache", "paged", "--backend", "cuda", env=env)
    if out.returncode == 0:  # a machine with a GPU
        return
    assert out.returncode == 2
    assert out.stderr.startswith("kvlib: error: no CUDA GPU is available; set "
                                 "NUMBA_ENABLE_CUDASIM=1")
    assert len(out.stderr.strip().splitlines()) == 1
    out = run("generate", "Hi", "--backend", "cuda", env=env)
    assert out.returncode == 2 and "add --cache paged" in out.stderr
