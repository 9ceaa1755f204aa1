"""``pretrain bench kernels``: attention and patch embedding, every usable backend side by side.

Attention runs the head layouts of ViT-B/L/g (heads x head_dim from
``pretrain.models.presets``) at the sequence lengths of common 2D and 3D inputs;
patch embedding runs 224^2 images in 16^2 patches and 96^3 / 128^3 volumes in
16^3 and 8^3 patches. For every case and every backend that can run it, the
result holds the median time of the forward, the backward (fwd+bwd minus fwd)
and fwd+bwd, the TFLOP/s of each (attention: 4*B*H*N^2*d forward, 2.5x that
backward; patch embedding: 2*B*N*K*D forward, 2x that backward) and, on CUDA,
the peak memory of fwd+bwd above the inputs. A backend that cannot run a case
is listed with the reason.

On CPU only the PyTorch backends are timed, at small sizes: the GPU backends
cannot run there, and Triton's CPU interpreter is a correctness tool whose
timings say nothing about the kernels.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from pretrain import kernels
from pretrain.models.presets import get_preset
from pretrain.tools.bench.common import BenchInputError, format_table, median

ATTENTION_MODELS = ("base", "large", "giant")
GPU_LENGTHS = (197, 257, 1025, 1729, 4097)
CPU_LENGTHS = (197, 257)
GPU_PATCH_CASES = (((224, 224), 16, 3), ((96, 96, 96), 16, 1), ((128, 128, 128), 16, 1), ((96, 96, 96), 8, 1))
CPU_PATCH_CASES = (((224, 224), 16, 3), ((96, 96, 96), 16, 1))
PATCH_EMBED_DIM = 768


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Wall seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _measure(
    run: Callable[[], torch.Tensor], leaves: list[torch.Tensor], flops_fwd: float, bwd_factor: float,
    device: torch.device, repeats: int, warmup: int,
) -> dict[str, Any]:
    """Forward, backward and fwd+bwd timings, TFLOP/s and (CUDA) peak memory of one backend on one case."""
    grad = torch.randn_like(run())

    def fwd_bwd() -> None:
        torch.autograd.grad(run(), leaves, grad)

    fwd = median(_time(run, device, repeats, warmup))
    both = median(_time(fwd_bwd, device, repeats, warmup))
    bwd = both - fwd  # can come out <= 0 when noise exceeds the backward's cost; then no rate is given
    flops_bwd = bwd_factor * flops_fwd
    peak_mib = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fwd_bwd()
        peak_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return {
        "fwd_ms": fwd * 1e3, "bwd_ms": bwd * 1e3, "fwd_bwd_ms": both * 1e3,
        "fwd_tflops": flops_fwd / fwd / 1e12, "bwd_tflops": flops_bwd / bwd / 1e12 if bwd > 0 else None,
        "fwd_bwd_tflops": (flops_fwd + flops_bwd) / both / 1e12, "peak_mib": peak_mib,
    }


def _run_backends(
    op: str, args: tuple, call: Callable[[str], torch.Tensor], leaves: list[torch.Tensor], flops_fwd: float,
    device: torch.device, repeats: int, warmup: int,
) -> dict[str, Any]:
    """Every registered backend of ``op``: its measurement, or why it was not measured."""
    bwd_factor = 2.5 if op == "attention" else 2.0  # backward GEMMs: 5 vs the forward's 2; 2 vs 1
    results: dict[str, Any] = {}
    for name in kernels.backend_names(op, device):
        try:
            kernels.resolve(op, device, name, args)
        except RuntimeError as err:
            results[name] = {"skipped": str(err).split("cannot run: ", 1)[-1]}
            continue
        if device.type == "cpu" and name == "triton":
            results[name] = {"skipped": "Triton's CPU interpreter is a correctness tool, not a timing"}
            continue
        results[name] = _measure(lambda: call(name), leaves, flops_fwd, bwd_factor, device, repeats, warmup)
    return results


def attention_cases(device: torch.device, dtype: torch.dtype, tokens_per_batch: int,
                    repeats: int, warmup: int) -> list[dict[str, Any]]:
    """ViT-B/L/g head layouts at every sequence length."""
    lengths = GPU_LENGTHS if device.type == "cuda" else CPU_LENGTHS
    cases = []
    for model in ATTENTION_MODELS:
        preset = get_preset(model)
        heads, head_dim = preset.num_heads, preset.embed_dim // preset.num_heads
        for length in lengths:
            batch = max(1, tokens_per_batch // length)
            q, k, v = (torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            flops = 4.0 * batch * heads * length * length * head_dim
            results = _run_backends(
                "attention", (q, k, v, None), lambda name: kernels.attention(q, k, v, backend=name),
                [q, k, v], flops, device, repeats, warmup,
            )
            cases.append({"op": "attention", "model": model, "batch": batch, "heads": heads, "tokens": length,
                          "head_dim": head_dim, "backends": results})
    return cases


def patch_embed_cases(device: torch.device, dtype: torch.dtype, batch: int,
                      repeats: int, warmup: int) -> list[dict[str, Any]]:
    """2D 224^2/16^2 and 3D 96^3 and 128^3 volumes in 16^3 and 8^3 patches, embed dim 768."""
    cases = []
    for spatial, patch, channels in GPU_PATCH_CASES if device.type == "cuda" else CPU_PATCH_CASES:
        patch_t = (patch,) * len(spatial)
        x = torch.randn(batch, channels, *spatial, device=device, dtype=dtype, requires_grad=True)
        weight = torch.randn(PATCH_EMBED_DIM, channels, *patch_t, device=device, dtype=dtype, requires_grad=True)
        bias = torch.zeros(PATCH_EMBED_DIM, device=device, dtype=dtype, requires_grad=True)
        tokens = 1
        for s, p in zip(spatial, patch_t):
            tokens *= s // p
        flops = 2.0 * batch * tokens * channels * patch**len(spatial) * PATCH_EMBED_DIM
        results = _run_backends(
            "patch_embed", (x, weight, bias, patch_t, None),
            lambda name: kernels.patch_embed(x, weight, bias, patch_t, backend=name),
            [x, weight, bias], flops, device, repeats, warmup,
        )
        cases.append({"op": "patch_embed", "input": f"{'x'.join(map(str, spatial))}/{patch}",
                      "batch": batch, "channels": channels, "tokens": tokens, "embed_dim": PATCH_EMBED_DIM,
                      "backends": results})
    return cases


def run_kernels_bench(dtype: str | None = None, tokens_per_batch: int | None = None, patch_batch: int | None = None,
                      repeats: int = 10, warmup: int = 3) -> dict[str, Any]:
    """Measure both ops on the default device (CUDA when present); defaults: bf16 on CUDA, fp32 on CPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype_name not in ("bfloat16", "float16", "float32"):
        raise BenchInputError(f"--dtype must be bfloat16, float16 or float32, got {dtype_name!r}")
    torch_dtype = getattr(torch, dtype_name)
    tokens_per_batch = tokens_per_batch or (32768 if device.type == "cuda" else 512)
    patch_batch = patch_batch or (32 if device.type == "cuda" else 1)
    cases = attention_cases(device, torch_dtype, tokens_per_batch, repeats, warmup)
    cases += patch_embed_cases(device, torch_dtype, patch_batch, repeats, warmup)
    note = None if device.type == "cuda" else (
        "CPU: only the PyTorch backends are timed, at small sizes; flash_attn and xformers need CUDA and "
        "Triton's CPU interpreter is not timed"
    )
    return {"dtype": dtype_name, "kernel_device": str(device), "note": note, "cases": cases}


def print_kernels_summary(result: dict[str, Any]) -> None:
    """One table row per case and backend."""
    rows = []
    for case in result["cases"]:
        label = (f"{case['model']} N={case['tokens']} B={case['batch']}" if case["op"] == "attention"
                 else f"{case['input']} B={case['batch']}")
        for name, r in case["backends"].items():
            if "skipped" in r:
                continue
            peak = "-" if r["peak_mib"] is None else round(r["peak_mib"], 1)
            bwd_tflops = "-" if r["bwd_tflops"] is None else r["bwd_tflops"]
            rows.append([case["op"], label, name, r["fwd_ms"], r["bwd_ms"], r["fwd_tflops"], bwd_tflops,
                         r["fwd_bwd_tflops"], peak])
    print(f"dtype {result['dtype']} on {result['kernel_device']}")
    print(format_table(["op", "case", "backend", "fwd ms", "bwd ms", "fwd TF/s", "bwd TF/s", "f+b TF/s", "peak MiB"],
                       rows))
    if result["note"]:
        print(result["note"])
