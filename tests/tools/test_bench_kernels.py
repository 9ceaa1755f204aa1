"""``pretrain bench kernels`` on CPU at tiny sizes: result layout, FLOP counts, skipped backends' reasons."""

import json

import pytest

from pretrain.tools.bench import kernels as bench_kernels
from pretrain.tools.bench.common import BenchInputError
from pretrain.tools.cli.main import main


@pytest.fixture
def tiny_cases(monkeypatch):
    monkeypatch.setattr(bench_kernels, "ATTENTION_MODELS", ("base",))
    monkeypatch.setattr(bench_kernels, "CPU_LENGTHS", (9,))
    monkeypatch.setattr(bench_kernels, "CPU_PATCH_CASES", (((16, 16), 8, 2),))
    monkeypatch.setattr(bench_kernels, "PATCH_EMBED_DIM", 8)


def test_cpu_run_measures_pytorch_backends_and_says_why_not_the_others(tiny_cases):
    result = bench_kernels.run_kernels_bench(tokens_per_batch=18, repeats=1, warmup=1)
    attention, patch = result["cases"]
    assert (attention["batch"], attention["heads"], attention["tokens"], attention["head_dim"]) == (2, 12, 9, 64)
    torch_run = attention["backends"]["torch"]
    expected_fwd_flops = 4.0 * 2 * 12 * 9 * 9 * 64
    assert torch_run["fwd_tflops"] == pytest.approx(expected_fwd_flops / (torch_run["fwd_ms"] / 1e3) / 1e12)
    assert "CUDA" in attention["backends"]["flash_attn"]["skipped"]
    assert "skipped" in attention["backends"]["triton"]
    assert set(patch["backends"]) >= {"torch", "conv", "triton"} and patch["tokens"] == 4
    assert patch["backends"]["conv"]["fwd_bwd_ms"] > 0
    assert result["note"].startswith("CPU")


def test_cli_writes_json_and_rejects_bad_dtype(tiny_cases, tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert main(["bench", "kernels", "--repeats", "1", "--warmup", "1", "--tokens-per-batch", "9",
                 "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "kernels" and saved["dtype"] == "float32" and "versions" in saved
    assert "attention" in capsys.readouterr().out
    with pytest.raises(BenchInputError, match="--dtype"):
        bench_kernels.run_kernels_bench(dtype="int8")
