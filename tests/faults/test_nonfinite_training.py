"""A run that stops being finite rolls back or stops with a diagnosis; it never ends with exit 0 on NaN weights,
never checkpoints them and never exports them (issue 17: optim.lr far too high, steps that are all skipped)."""
from __future__ import annotations


import pytest
import torch

from pretrain.config import load_config
from pretrain.engine import checkpoint as ckpt
from pretrain.engine import run_lock
from pretrain.engine.distributed import setup_distributed, teardown_distributed
from pretrain.engine.nonfinite import TrainingDiverged
from pretrain.engine.trainer import Trainer
from pretrain.tools.cli.main import EXIT_TRAINING, main
from tests.faults.conftest import config_yaml, run_config, write_shard


@pytest.fixture
def shards(tmp_path):
    return write_shard(tmp_path / "shards" / "good.tar", 256, {}).parent


def run_with_faults(tmp_path, cfg: dict, *, nan_forwards=(), nan_weights_after_step=None):
    """A real Trainer whose loss is NaN on the listed forward calls (counted over the run, 1-based), and whose
    weights are poisoned after the given step: faults a bad batch or a bad kernel would cause."""
    path = config_yaml(tmp_path, cfg)
    trainer = Trainer(load_config(path), setup_distributed())
    calls = {"n": 0}
    forward = trainer.objective.forward

    def faulty_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in nan_forwards:
            out = dict(out, loss=out["loss"] * float("nan"))
        return out

    trainer.objective.forward = faulty_forward
    if nan_weights_after_step is not None:
        after_step = trainer.objective.after_step

        def poisoning_after_step(step):
            after_step(step)
            if step + 1 == nan_weights_after_step and not calls.get("poisoned"):
                calls["poisoned"] = True
                with torch.no_grad():
                    next(trainer.objective.parameters()).fill_(float("nan"))

        trainer.objective.after_step = poisoning_after_step
    try:
        return trainer.fit()
    finally:
        run_lock.release_all()
        teardown_distributed(barrier=False)


def test_nan_steps_in_a_row_roll_back_past_their_batches_and_the_run_finishes(tmp_path, shards, single_process):
    cfg = run_config(tmp_path, shards, train={"steps": 10, "ckpt_every": 4})
    summary = run_with_faults(tmp_path, cfg, nan_forwards={6, 7, 8})  # steps 6-8: three in a row
    assert summary["steps"] == 10 and summary["final_loss"] is not None
    (rollback,) = summary["rollbacks"]
    assert rollback == {"from_step": 8, "to_step": 4, "reason": "3 steps in a row (to step 8) had a non-finite loss"}
    assert summary["skipped_nonfinite"] == 0  # the skipped steps went with the abandoned ones
    # The run resumes from its last checkpoint like any other: the stream went on past the 4 batches of the
    # abandoned steps 5-8, and the checkpoint says so (10 steps took 14 batches).
    cfg["train"]["steps"] = 12
    resumed = Trainer(load_config(config_yaml(tmp_path, cfg)), setup_distributed())
    try:
        assert resumed.step == 10 and resumed.history["batches_skipped"] == 4
        assert resumed.history["rollbacks"] == [rollback]
        assert resumed.fit()["steps"] == 12
    finally:
        run_lock.release_all()
        teardown_distributed(barrier=False)


def test_nan_weights_are_never_checkpointed_the_run_rolls_back_and_finishes(tmp_path, shards, single_process):
    cfg = run_config(tmp_path, shards, train={"steps": 8, "ckpt_every": 3})
    summary = run_with_faults(tmp_path, cfg, nan_weights_after_step=5)  # poisoned after step 5, saved at 6
    (rollback,) = summary["rollbacks"]
    assert rollback["from_step"] == 6 and rollback["to_step"] == 3 and "weights are not finite" in rollback["reason"]
    assert summary["steps"] == 8
    state = final_weights(tmp_path)
    assert all(torch.isfinite(v).all() for v in state.values())


def test_when_rollbacks_are_used_up_the_run_stops_with_exit_6_and_keeps_its_checkpoints(tmp_path, shards,
                                                                                       single_process):
    cfg = run_config(tmp_path, shards, train={"steps": 10, "ckpt_every": 2, "max_rollbacks": 0})
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row \(to step 7\).*max_rollbacks=0.*up to step 6"):
        run_with_faults(tmp_path, cfg, nan_forwards={5, 6, 7})
    assert ckpt.latest_tag(tmp_path / "run" / "checkpoints") == ckpt.tag_for(6)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_high_share_of_skipped_steps_stops_the_run(tmp_path, shards, single_process):
    cfg = run_config(tmp_path, shards, train={"steps": 30, "ckpt_every": 100})
    with pytest.raises(TrainingDiverged, match=r"3 of the first 20 steps .* train.max_skipped_fraction=0.1"):
        run_with_faults(tmp_path, cfg, nan_forwards={2, 9, 16})  # never two in a row


def test_an_lr_that_blows_the_weights_up_ends_in_exit_6_not_an_exported_nan_model(tmp_path, shards, single_process,
                                                                                   capsys):
    cfg = run_config(tmp_path, shards, optim={"lr": 1e30, "warmup_steps": 0},
                     train={"steps": 12, "export_on_end": True})
    assert main(["train", config_yaml(tmp_path, cfg)]) == EXIT_TRAINING
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "no checkpoint to roll back to" in err and "lower optim.lr" in err
    assert "Traceback" not in err
    run = tmp_path / "run"
    assert not (run / "export").exists() and not (run / "summary.json").exists()
    assert ckpt.latest_tag(run / "checkpoints") is None


def final_weights(tmp_path) -> dict[str, torch.Tensor]:
    from pretrain.storage.checkpoints import fp32_state_dict, resolve_checkpoint

    return fp32_state_dict(resolve_checkpoint(tmp_path / "run"))
