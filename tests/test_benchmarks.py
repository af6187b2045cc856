"""The speed benchmark runs end to end on the tiny model and writes the JSON contract."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_step_speed_writes_the_json_contract(tmp_path):
    """Synthetic data, so the test needs nothing outside the repository."""
    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_speed.py"), "--model", "tiny-llama", "--json", str(out),
           "--batch-size", "1", "--steps", "1", "--warmup", "0", "--prompt-tokens", "60", "--response-tokens", "25", "--data", "synthetic",
           "--generation-prompts", "2", "--generation-tokens", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "date" in result["run"] and "torch" in result["run"]
    systems = {"trl_dpo", "trl_dpo_precompute", "pdpo_no_user", "pdpo_alpha_0.5", "pdpo_alpha_0.5_before_response",
               "pdpo_alpha_1", "official_scheme"}
    assert set(result["seconds_per_comparison"]) == systems and set(result["peak_rss_mb"]) == systems
    assert all(isinstance(v, float) and v > 0 for v in result["seconds_per_comparison"].values())
    assert all(isinstance(v, float) and v > 0 for v in result["peak_rss_mb"].values())
    assert all(isinstance(v, float) for v in result["tokens"].values())
    assert set(result["tokens"]) == {"prompt", "response"} and result["tokens"]["prompt"] > 0
    assert result["generation"]["batched_tokens_per_second"] > 0
    run = result["run"]  # the run.json block: what reproducing the numbers needs
    assert run["command"].startswith("python ") and "--model tiny-llama" in run["command"]
    assert {"commit", "date", "machine", "python", "torch", "transformers", "peft", "accelerate", "trl"} <= set(run)
    assert run["torch"] and run["machine"]["cores"]
    shared = result["generation"]["shared_prompt"]  # one prompt's KV cache shared by its users' rows
    assert shared["same_text"] and shared["shared_seconds"] > 0 and shared["users_per_prompt"] == 8
    # the reference pass is timed for the systems that precompute it, and only for them
    assert set(result["reference_seconds_per_comparison"]) == systems - {"trl_dpo", "official_scheme"}
    assert all(v > 0 for v in result["reference_seconds_per_comparison"].values())
    # the official scheme and prlhf's fast path compute the same loss on the same batch
    assert abs(result["losses"]["official_scheme"][0] - result["losses"]["pdpo_alpha_0.5"][0]) < 1e-4
    assert "| trl_dpo |" in proc.stdout and "| trl_dpo_precompute |" in proc.stdout
    # TRL with precomputed reference log-probs computes TRL's loss on the same batch
    assert abs(result["losses"]["trl_dpo_precompute"][0] - result["losses"]["trl_dpo"][0]) < 1e-4
    assert "pdpo_alpha_0.5/trl_dpo_precompute" in result["ratios"]
    # the headline: every prlhf system against TRL at its best
    assert result["trl_best"] in ("trl_dpo", "trl_dpo_precompute")
    assert set(result["vs_trl_best"]) == systems - {"trl_dpo", "trl_dpo_precompute"}


def test_step_speed_sft_and_lazy_reference_systems(tmp_path):
    """The SFT head at response positions only, and LoRA's reference at first visit, each against
    its plain counterpart: the same loss on the same batches, timed side by side."""
    out = tmp_path / "speed.json"
    systems = ["sft", "sft_full_logits", "pdpo_lora", "pdpo_lora_lazy_reference"]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_speed.py"), "--model", "tiny-llama", "--json", str(out),
           "--batch-size", "2", "--steps", "2", "--warmup", "0", "--prompt-tokens", "40", "--response-tokens", "20",
           "--data", "synthetic", "--no-generation", "--systems", *systems]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "date" in result["run"] and "torch" in result["run"]
    assert set(result["seconds_per_comparison"]) == set(systems)
    loss = result["losses"]
    assert loss["sft"] == pytest.approx(loss["sft_full_logits"], abs=1e-5) and loss["sft"][0] > 1.0  # token NLL
    assert loss["pdpo_lora"] == pytest.approx(loss["pdpo_lora_lazy_reference"], abs=1e-5)
    # precomputed: the reference pass is timed once; lazy: inside the steps that first visit each pair
    assert set(result["reference_seconds_per_comparison"]) == {"pdpo_lora"}


def test_adapt_speed_writes_the_json_contract(tmp_path):
    out = tmp_path / "adapt.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "adapt_speed.py"), "--model", "tiny-llama", "--data", "synthetic",
           "--new-users", "2", "--k", "4", "--steps", "2", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "date" in result["run"] and "torch" in result["run"]
    assert set(result["seconds_per_user"]) == {"together", "one_at_a_time"}
    assert all(v > 0 for v in result["seconds_per_user"].values()) and result["reference_seconds_per_user"] > 0
    assert result["k"] == 4 and result["new_users"] == 2 and result["tokens"]["prompt"] > 0
    assert "| tiny-llama | 4 | 2 |" in proc.stdout


def test_serve_load_runs_bounded_on_loopback(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    out = tmp_path / "load.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--model", "tiny-llama", "--clients", "4",
           "--requests", "8", "--max-tokens", "4", "--timeout", "240", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert "date" in result["run"] and "torch" in result["run"]
    for phase in ("sequential", "concurrent"):
        ph = result[phase]
        assert ph["requests"] == 8 and ph["errors"] == 0 and ph["not_sent"] == 0
        assert ph["seconds"] >= ph["latency_p95"] >= ph["latency_p50"] > 0  # no request outlasts its phase
        # at most --max-tokens 4 per request: the benchmark counts the tokens the server was asked for, no more
        assert 0 <= ph["tokens_per_second"] * ph["seconds"] <= 8 * 4 + 1e-6 and ph["mean_completion_tokens"] <= 4
    # one client at a time: the phase lasts at least as long as half its requests at the median latency
    assert result["sequential"]["seconds"] >= 4 * result["sequential"]["latency_p50"]


def test_gpu_check_runs_small_on_cpu(tmp_path):
    """The GPU check's CPU version (so the script does not rot where no GPU runs it): every check
    passes and the JSON holds each family, the three speed systems and the run block."""
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-small", "--steps", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text()) if out.is_file() else {}
    assert proc.returncode == 0 and result.get("ok"), proc.stdout[-4000:] + proc.stderr[-3000:]
    assert set(result["checks"]["families"]) == {"llama", "gpt2", "qwen2", "gemma2", "mistral", "phi3"}
    assert all(v["fast_paths"] == "equal" for v in result["checks"]["families"].values())
    assert result["checks"]["shared_prompt_cache"]["ok"] and result["checks"]["vllm_handoff"]["ok"]
    systems = result["speed"]["systems"]
    assert set(systems) == {"pdpo_individual", "prm_after_response", "trl_dpo_precompute"}
    for name, v in systems.items():
        assert v["seconds_per_comparison"] > 0 and v["finite"], name
    assert result["dtype"] == "float32" and result["device"] == "cpu"
    assert "| family gemma2 | ok |" in result["table"] and result["run"]["command"].startswith("python benchmarks/gpu_check.py")
