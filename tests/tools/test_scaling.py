"""Scaling laws: the fitter recovers known laws with intervals that cover the truth about as often as they
claim, refits the published Chinchilla replication, finds IsoFLOP minima and the compute-optimal allocation
in closed form; plans lie on their IsoFLOP curves; FLOPs of one block by hand; the commands end to end."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.launch.sweep import load_sweep
from pretrain.tools.cli.main import main
from pretrain.tools.scaling.collect import read_table, write_table
from pretrain.tools.scaling.downstream import saturating_fit
from pretrain.tools.scaling.fit import fit_table
from pretrain.tools.scaling.isoflop import isoflop_fit
from pretrain.tools.scaling.law import compute_optimal, fit_law, predict

TRUE = {"E": 1.6, "A": 300.0, "B": 900.0, "alpha": 0.34, "beta": 0.30}
SMALL_GRID = {"alpha": [0.3, 0.8], "beta": [0.3, 0.8], "e": [0.0], "a": [5, 10], "b": [5, 10]}  # a smooth problem
CHINCHILLA = Path(__file__).resolve().parents[2] / "docs" / "scaling" / "chinchilla" / "table.csv"


def _synthetic(rng, sigma=0.01):
    n, d = np.meshgrid(np.geomspace(1e6, 1e9, 8), np.geomspace(1e8, 1e11, 6))
    n, d = n.ravel(), d.ravel()
    return n, d, predict(TRUE, n, d) * np.exp(sigma * rng.standard_normal(n.shape))


def test_law_recovers_known_parameters_and_its_intervals_cover_them():
    covered, checks, estimates = 0, 0, []
    for draw in range(10):
        n, d, loss = _synthetic(np.random.default_rng(draw))
        fit = fit_law(n, d, loss, grid=SMALL_GRID, bootstrap=30, seed=draw, restarts=1)
        estimates.append([fit.params[k] for k in ("E", "alpha", "beta")])
        for key in ("E", "alpha", "beta"):
            lo, hi = fit.interval(key, level=0.9)
            covered += lo <= TRUE[key] <= hi
            checks += 1
    assert np.allclose(np.median(estimates, axis=0), [TRUE["E"], TRUE["alpha"], TRUE["beta"]], rtol=0.05)
    # 90 % intervals: about 27 of 30 should cover; intervals a third as wide cover about half (measured)
    assert covered / checks >= 0.7, (covered, checks)
    # and they are not uselessly wide
    assert fit.interval("alpha", 0.9)[1] - fit.interval("alpha", 0.9)[0] < 0.2


def test_a_term_the_runs_cannot_identify_is_flagged_and_the_fit_stays_finite():
    # the loss does not depend on N at all (as on the first 9-run CPU grid): no A / N^alpha to find
    n, d = np.meshgrid(np.geomspace(1e6, 1e7, 3), np.geomspace(1e3, 1e5, 3))
    n, d = n.ravel(), d.ravel()
    loss = 0.8 + 0.4 / d ** 0.1
    fit = fit_law(n, d, loss, grid=SMALL_GRID, bootstrap=0)
    assert fit.unidentified and set(fit.unidentified) <= {"A", "alpha"}
    assert all(np.isfinite(list(fit.params.values())))
    assert np.allclose(predict(fit.params, n, d), loss, rtol=1e-3)


def test_chinchilla_refit_recovers_the_published_replication():
    rows = read_table(CHINCHILLA)
    assert len(rows) == 245
    result = fit_table(rows, loss="loss", drop_highest=5, grid="coarse", bootstrap=40, metrics=[])
    law = result["law"]
    published = {"E": 1.82, "A": 482.0, "B": 2085.0, "alpha": 0.348, "beta": 0.366}  # Besiroglu et al. 2024
    for key, value in published.items():
        lo, hi = law["intervals"][key]
        assert lo <= value <= hi, (key, value, lo, hi)
    # the optimum itself, as refitted by hand beside the data (E 1.817, A 477.8, B 2143, alpha 0.347, beta 0.367)
    got = law["params"]
    assert got["E"] == pytest.approx(1.817, abs=2e-3) and got["alpha"] == pytest.approx(0.347, abs=2e-3)
    assert got["beta"] == pytest.approx(0.367, abs=2e-3) and got["A"] == pytest.approx(477.8, rel=0.01)
    assert result["used"] == 240 and result["flops_model"]["gamma"] == pytest.approx(1.0)
    # approach 2 on the same points, budgets found by grouping C: N* grows about as C^0.5 (Hoffmann et al.: 0.49)
    assert 0.4 < result["isoflop"]["N_opt"]["exponent"] < 0.6


def test_compute_optimal_matches_the_closed_form():
    a, b = TRUE["alpha"], TRUE["beta"]
    g = (a * TRUE["A"] / (b * TRUE["B"])) ** (1 / (a + b))
    for c in (1e18, 1e21, 1e24):
        opt = compute_optimal(TRUE, c, k=6.0, gamma=1.0)
        assert opt["N"] == pytest.approx(g * (c / 6) ** (b / (a + b)), rel=1e-4)
        assert opt["N"] * opt["D"] * 6 == pytest.approx(c, rel=1e-9)


def test_isoflop_parabolas_find_the_minima_and_their_exponent():
    rows = []
    for c in (1e18, 1e19, 1e20, 1e21):
        n_star = compute_optimal(TRUE, c, 6.0, 1.0)["N"]
        for n in n_star * np.geomspace(1 / 8, 8, 7):
            d = c / (6 * n)
            rows.append({"N": n, "D": d, "C": c, "budget": c, "flops_per_sample": 6 * n, "loss": float(predict(TRUE, n, d))})
    iso = isoflop_fit(rows, "loss", bootstrap=50)
    for entry in iso["budgets"]:
        truth = compute_optimal(TRUE, entry["budget"], 6.0, 1.0)["N"]
        assert entry["minimum_inside"] and entry["N_opt"] == pytest.approx(truth, rel=0.1)
    beta_share = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    assert iso["N_opt"]["exponent"] == pytest.approx(beta_share, abs=0.02)
    assert iso["D_opt"]["exponent"] == pytest.approx(1 - beta_share, abs=0.02)
    assert "interval" in iso["N_opt"]


def test_saturating_law_for_downstream_metrics():
    rng = np.random.default_rng(0)
    c = np.geomspace(1e12, 1e16, 12)
    acc = 0.9 - 40.0 * c ** -0.15 + 0.004 * rng.standard_normal(c.shape)
    fit = saturating_fit(c, acc, bootstrap=60)
    assert fit["params"]["m_inf"] == pytest.approx(0.9, abs=0.03) and fit["params"]["c"] == pytest.approx(0.15, abs=0.05)
    lo, hi = fit["intervals"]["m_inf"]
    assert lo <= 0.9 <= hi
    with pytest.raises(ValueError, match="at least 4 runs"):
        saturating_fit(c[:3], acc[:3])


def test_flops_of_one_block_by_hand_and_by_the_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain.models.vit import VisionTransformer, ViTConfig

    def vit(depth):
        return VisionTransformer(ViTConfig(embed_dim=64, depth=depth, num_heads=2, img_size=32, patch_size=8,
                                           in_chans=1, spatial_dims=2))

    # 17 tokens (16 patches + class), width 64, MLP 256: qkv 2*17*64*192, q k^T and attn v 2 * 2*17*17*64,
    # output projection 2*17*64*64, MLP 2 * 2*17*64*256
    by_hand = 417_792 + 73_984 + 139_264 + 1_114_112
    assert vit(2).forward_flops() - vit(1).forward_flops() == by_hand
    block = vit(1).blocks[0]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        block(torch.randn(1, 17, 64))  # the math backend: its matmuls are what the counter sees on CPU
    assert counter.get_total_flops() == by_hand


def test_parameter_counts_split_off_the_embeddings():
    from pretrain.engine.compute import parameter_counts
    from pretrain.models.vit import VisionTransformer, ViTConfig

    enc = VisionTransformer(ViTConfig(embed_dim=64, depth=2, num_heads=2, img_size=32, patch_size=8, in_chans=1,
                                      spatial_dims=2))
    counts = parameter_counts(enc)
    embedding = enc.patch_embed.proj.weight.numel() + enc.patch_embed.proj.bias.numel() + enc.pos_embed.numel() \
        + enc.cls_token.numel()
    assert counts == {"total": sum(p.numel() for p in enc.parameters()), "embedding": embedding,
                      "non_embedding": sum(p.numel() for p in enc.parameters()) - embedding}


def test_plan_points_lie_on_their_isoflop_curves(tmp_path, capsys):
    out = tmp_path / "sweep.yaml"
    budgets = ["3e11", "1e12"]
    assert main(["scaling", "plan", "configs/demo.yaml", "objective.decoder_depth=1", "--budgets", *budgets,
                 "--models", "nano", "96x3", "micro", "--out", str(out), "--name", "iso"]) == 0
    assert "6 runs" in capsys.readouterr().out
    sweep = load_sweep(out)  # what launch slurm --sweep reads
    assert sweep.name == "iso" and len(sweep.points) == 6
    meta = __import__("yaml").safe_load(out.read_text())["meta"]
    for point, planned in zip(sweep.points, meta["points"]):
        steps = planned["steps"]
        assert f"train.steps={steps}" in point.overrides and "objective.decoder_depth=1" in point.overrides
        # on the curve up to the rounding of the step count
        assert abs(planned["compute"] / planned["budget"] - 1) <= 0.5 / steps + 1e-12
        assert planned["compute"] == pytest.approx(planned["flops_per_sample"] * planned["samples"])
    sizes = {p["model"]: p["N"] for p in meta["points"]}
    assert sizes["nano"] < sizes["96x3"] < sizes["micro"]
    assert "model.embed_dim=96" in sweep.points[2].overrides and "model.num_heads=3" in sweep.points[2].overrides
    # launch local runs it point by point, in the run directories launch slurm would use; collect reads the
    # sweep folder and refuses the points not run yet
    from pretrain.launch.local import sweep_point_overrides

    overrides = sweep_point_overrides(str(out), 4, str(tmp_path / "runs"))
    assert overrides[-1] == f"train.run_dir={tmp_path / 'runs' / sweep.points[4].name}"
    assert "model.preset=micro" in overrides and "train.steps=" + str(meta["points"][4]["steps"]) in overrides
    assert main(["scaling", "collect", str(tmp_path / "runs"), "--out", str(tmp_path / "t.csv")]) == 2
    assert "6 run(s) not finished" in capsys.readouterr().err
    with pytest.raises(ValueError, match="points 0..5"):
        sweep_point_overrides(str(out), 6, None)
    # bad input: one message, no traceback
    assert main(["scaling", "plan", "configs/demo.yaml", "--budgets", "1e3", "--models", "nano",
                 "--out", str(tmp_path / "x.yaml")]) == 2
    assert "no point of the plan has enough steps" in capsys.readouterr().err
    assert main(["scaling", "plan", "configs/demo.yaml", "--budgets", "1e12", "--models", "70x3x4",
                 "--out", str(tmp_path / "x.yaml")]) == 2
    assert "not divisible" in capsys.readouterr().err


def test_fit_and_predict_commands_write_the_report_figures_and_tensorboard(tmp_path, capsys):
    rng = np.random.default_rng(1)
    rows = []
    for budget in (1e17, 1e18, 1e19):
        n_star = compute_optimal(TRUE, budget, 6.0, 1.0)["N"]
        for i, n in enumerate(n_star * np.geomspace(1 / 6, 6, 4)):
            d = budget / (6 * n)
            loss = float(predict(TRUE, n, d) * math.exp(0.003 * rng.standard_normal()))
            rows.append({"run": f"r{budget:.0e}-{i}", "model": f"m{i}", "budget": budget, "N": n, "D": d, "C": budget,
                         "flops_per_sample": 6 * n, "final_loss": loss, "smoothed_loss": loss,
                         "knn": 0.9 - 20 * budget ** -0.07, "linear": 0.95 - 30 * budget ** -0.07})
    table = write_table(rows, tmp_path / "table.csv")
    out = tmp_path / "fit"
    assert main(["scaling", "fit", str(table), "--out", str(out), "--grid", "coarse", "--bootstrap", "15",
                 "--predict-compute", "1e21"]) == 0
    printed = capsys.readouterr().out
    assert "alpha" in printed and "C = 1e+21" in printed
    result = json.loads((out / "fit.json").read_text())
    assert result["loss"] == "smoothed_loss" and set(result["downstream"]) == {"knn", "linear"}
    assert len(result["law"]["samples"]) == 15 and len(result["compute_optimal"]) == 3
    figures = {p.name for p in out.glob("*.png")}
    assert figures == {"loss_vs_compute.png", "isoflop.png", "predicted_vs_observed.png", "residuals.png"}
    report = (out / "report.md").read_text()
    assert "| alpha |" in report and "![isoflop](isoflop.png)" in report and "N*(C)" in report
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0}).Reload()
    assert {f"scaling/{Path(f).stem}" for f in figures} == set(events.Tags()["images"])
    assert main(["scaling", "predict", str(out / "fit.json"), "--compute", "1e21", "--at", "1e8,1e10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("C = 1e+21: N* = ") and "[" in lines[1]
    assert main(["scaling", "predict", str(out / "fit.json"), "--at", "1e8"]) == 2
    assert main(["scaling", "fit", str(tmp_path / "missing.csv"), "--out", str(out)]) == 2


@pytest.mark.parametrize("command", ["plan", "collect", "fit", "predict"])
def test_every_scaling_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["scaling", command, "--help"])
    assert exit_info.value.code == 0 and "usage: pretrain scaling" in capsys.readouterr().out
