"""Checkpoints: atomic folders, the ``latest`` pointer, pruning, the stored config; refused resumes and failing ranks.

The save protocol is checked twice: directly, with a stand-in engine that can
crash half-way through a write (fast, every crash point), and end to end with
real `pretrain train` runs.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from pretrain.config import RunConfig, load_config
from pretrain.engine import checkpoint as ckpt
from pretrain.storage.checkpoints import CheckpointError, read_marker
from tests.engine.conftest import RankGroup, read_losses, run_ranks, train_args


class CrashingEngine:
    """Writes DeepSpeed-like files; with ``crash_after_files`` it dies half-way like a killed rank."""

    def __init__(self, crash_after_files: int | None = None) -> None:
        self.crash_after_files = crash_after_files

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        assert not save_latest, "DeepSpeed must not write its own 'latest': ours is the atomic one"
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]):
            if self.crash_after_files is not None and i >= self.crash_after_files:
                raise KeyboardInterrupt("simulated crash mid-write")
            (folder / name).write_bytes(b"state" * 10)


def _save(ckpt_dir: Path, step: int, keep: int = 2, engine: CrashingEngine | None = None) -> Path:
    return ckpt.save_checkpoint(engine or CrashingEngine(), ckpt_dir, step, {"step": step}, {}, f"steps: {step}\n", keep)


def _step_folders(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_"))


# --- the save protocol, in process ------------------------------------------------------------

def test_save_marks_complete_moves_latest_and_prunes(tmp_path: Path):
    ckpt_dir = tmp_path / "checkpoints"
    assert ckpt.latest_tag(ckpt_dir) is None
    for step in (2, 4, 6):
        final = _save(ckpt_dir, step, keep=2)
        assert final == ckpt_dir / ckpt.tag_for(step)
        assert ckpt.latest_tag(ckpt_dir) == ckpt.tag_for(step)
        marked_step, digests = read_marker(final)
        assert marked_step == step
        assert (final / "config.yaml").read_text() == f"steps: {step}\n"
        assert (final / "rank00000_state.pt").is_file()
        # every file of every rank, with its size and sha256
        assert sorted(digests) == sorted(p.name for p in final.iterdir() if p.name != ckpt.COMPLETE)
        for name, (size, sha) in digests.items():
            assert (size, sha) == (len((final / name).read_bytes()), hashlib.sha256((final / name).read_bytes()).hexdigest())
    assert _step_folders(ckpt_dir) == ["step_00000004", "step_00000006"]


@pytest.mark.parametrize("crash_after_files", [0, 1])
def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path: Path, crash_after_files: int):
    ckpt_dir = tmp_path / "checkpoints"
    _save(ckpt_dir, 2)
    with pytest.raises(KeyboardInterrupt):
        _save(ckpt_dir, 4, engine=CrashingEngine(crash_after_files))
    assert ckpt.latest_tag(ckpt_dir) == "step_00000002"
    assert _step_folders(ckpt_dir) == ["step_00000002", "step_00000004.partial"]
    assert not (ckpt_dir / "step_00000004.partial" / ckpt.COMPLETE).exists()

    _save(ckpt_dir, 4)  # the retry after a restart replaces the leftover
    assert ckpt.latest_tag(ckpt_dir) == "step_00000004"
    assert _step_folders(ckpt_dir) == ["step_00000002", "step_00000004"]


def test_leftover_partial_with_marker_neither_counts_nor_survives(tmp_path: Path):
    """A crash between writing COMPLETE and the rename leaves a marked .partial: it is no checkpoint."""
    ckpt_dir = tmp_path / "checkpoints"
    for step in (2, 4):
        _save(ckpt_dir, step, keep=3)
    stale = ckpt_dir / "step_00000099.partial"
    stale.mkdir()
    (stale / ckpt.COMPLETE).write_text("99\n")
    assert ckpt.latest_tag(ckpt_dir) == "step_00000004"
    _save(ckpt_dir, 6, keep=3)
    assert _step_folders(ckpt_dir) == ["step_00000002", "step_00000004", "step_00000006"]


def test_latest_naming_an_incomplete_folder_is_a_clear_error(tmp_path: Path):
    ckpt_dir = tmp_path / "checkpoints"
    (ckpt_dir / "step_00000008").mkdir(parents=True)
    (ckpt_dir / ckpt.LATEST).write_text("step_00000008\n")
    with pytest.raises(CheckpointError, match=r"step_00000008.*not a complete checkpoint.*no other checkpoint"):
        ckpt.latest_tag(ckpt_dir)


@pytest.mark.parametrize("pointer", [b"\xff\xfe\x00garbage", b"step_00000008\n", b"../../etc\n"])
def test_a_damaged_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path: Path, pointer: bytes, caplog):
    ckpt_dir = tmp_path / "checkpoints"
    for step in (2, 4):
        _save(ckpt_dir, step, keep=3)
    (ckpt_dir / "step_00000008").mkdir()  # begun, never completed
    (ckpt_dir / ckpt.LATEST).write_bytes(pointer)
    with caplog.at_level("WARNING"):
        assert ckpt.latest_tag(ckpt_dir) == "step_00000004"
    assert "using step_00000004, the newest complete checkpoint" in caplog.text


# --- end to end -------------------------------------------------------------------------------

def _expected_config(config: Path, run_dir: Path, overrides: list[str]) -> RunConfig:
    return load_config(config, [f"train.run_dir={run_dir}", *overrides])


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory: pytest.TempPathFactory, tiny_yaml: Path) -> Path:
    """A finished 1-rank run of 4 steps with checkpoints at 2 and 4; tests copy it before changing it."""
    work = tmp_path_factory.mktemp("one_rank")
    overrides = ["train.steps=4", "train.ckpt_every=2", "train.keep_checkpoints=3"]
    run_ranks(train_args(tiny_yaml, work / "run", *overrides), 1, work).assert_clean()
    return work / "run"


@pytest.mark.slow
def test_latest_is_always_complete_old_ones_pruned_and_config_stored(tiny_yaml: Path, tmp_path: Path):
    run_dir, ckpt_dir = tmp_path / "run", tmp_path / "run" / "checkpoints"
    overrides = ["train.steps=6", "train.ckpt_every=1", "train.keep_checkpoints=2"]
    seen: set[str] = set()
    broken: list[str] = []

    def watch_latest() -> bool:  # polled every 20 ms while the run saves a checkpoint every step
        pointer = ckpt_dir / ckpt.LATEST
        if pointer.is_file():
            tag = pointer.read_text().strip()
            seen.add(tag)
            if not (ckpt_dir / tag / ckpt.COMPLETE).is_file() and pointer.read_text().strip() == tag:
                broken.append(tag)
        return False

    group = RankGroup(train_args(tiny_yaml, run_dir, *overrides), 1, tmp_path)
    try:
        group.wait(until=watch_latest)
        group.results().assert_clean()
    finally:
        group.close()
    assert not broken, f"'latest' named folders without {ckpt.COMPLETE}: {broken}"
    assert len(seen) >= 2, f"the watcher saw too few checkpoints to mean anything: {seen}"

    assert ckpt.latest_tag(ckpt_dir) == "step_00000006"
    assert _step_folders(ckpt_dir) == ["step_00000005", "step_00000006"]
    expected = _expected_config(tiny_yaml, run_dir, overrides)
    assert load_config(run_dir / "config.yaml") == expected
    for tag in _step_folders(ckpt_dir):
        step, digests = read_marker(ckpt_dir / tag)
        assert step == int(tag.removeprefix("step_")) and "mp_rank_00_model_states.pt" in digests
        assert load_config(ckpt_dir / tag / "config.yaml") == expected, tag


@pytest.mark.slow
def test_leftover_partial_folders_do_not_break_resume_and_are_removed(one_rank_run: Path, tmp_path: Path,
                                                                       tiny_yaml: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(one_rank_run, run_dir)
    ckpt_dir = run_dir / "checkpoints"
    # A crash while writing step 6 (truncated file), and one between the COMPLETE marker and the rename.
    (ckpt_dir / "step_00000006.partial").mkdir()
    (ckpt_dir / "step_00000006.partial" / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x02trunc")
    (ckpt_dir / "step_00000099.partial").mkdir()
    (ckpt_dir / "step_00000099.partial" / ckpt.COMPLETE).write_text("99\n")

    results = run_ranks(train_args(tiny_yaml, run_dir, "train.steps=8", "train.ckpt_every=2",
                                   "train.keep_checkpoints=3"), 1, tmp_path)
    results.assert_clean()
    assert "resuming at step 4" in results.outputs[0]
    assert set(range(1, 9)) <= set(read_losses(run_dir))
    assert _step_folders(ckpt_dir) == ["step_00000004", "step_00000006", "step_00000008"]
    assert ckpt.latest_tag(ckpt_dir) == "step_00000008"


def _two_rank_run(tiny_yaml: Path, work: Path) -> Path:
    run_dir = work / "run2"
    run_ranks(train_args(tiny_yaml, run_dir, "train.steps=2", "train.ckpt_every=2"), 2, work).assert_clean()
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("saved_ranks, resumed_ranks", [(1, 2), (2, 1)])
def test_resume_with_another_world_size_fails_clearly_on_every_rank(saved_ranks: int, resumed_ranks: int,
                                                                   one_rank_run: Path, tiny_yaml: Path,
                                                                   tmp_path: Path):
    if saved_ranks == 1:
        run_dir = tmp_path / "run"
        shutil.copytree(one_rank_run, run_dir)
    else:
        run_dir = _two_rank_run(tiny_yaml, tmp_path)
    ckpt_dir = run_dir / "checkpoints"
    before = (ckpt.latest_tag(ckpt_dir), _step_folders(ckpt_dir))

    # Every rank must find the mismatch itself and exit 1; one that waits in a collective is killed (-9).
    results = run_ranks(train_args(tiny_yaml, run_dir, "train.steps=8", "train.ckpt_every=2"), resumed_ranks,
                        tmp_path, timeout=240)
    assert results.returncodes == [1] * resumed_ranks, results.describe()
    for out in results.outputs:
        assert f"was saved by {saved_ranks} ranks, this run has {resumed_ranks}" in out, out[-2000:]
    assert (ckpt.latest_tag(ckpt_dir), _step_folders(ckpt_dir)) == before, "a refused resume must not touch the checkpoints"


@pytest.mark.slow
def test_resume_with_another_data_layout_fails_clearly(one_rank_run: Path, tiny_yaml: Path, tmp_path: Path):
    """More DataLoader workers split the shards differently: the resume could not be exact."""
    run_dir = tmp_path / "run"
    shutil.copytree(one_rank_run, run_dir)
    results = run_ranks(train_args(tiny_yaml, run_dir, "train.steps=8", "train.ckpt_every=2", "data.num_workers=2"),
                        1, tmp_path, timeout=240)
    assert results.returncodes == [2], results.describe()  # a config the checkpoint disagrees with
    assert "saved with num_workers=1, this run has num_workers=2" in results.outputs[0], results.outputs[0][-2000:]
    assert "Traceback" not in results.outputs[0]
    assert "step_00000004" in results.outputs[0], "the error names the checkpoint"
    assert ckpt.latest_tag(run_dir / "checkpoints") == "step_00000004"


@pytest.mark.slow
def test_an_error_on_one_rank_ends_every_rank(tiny_yaml: Path, tmp_path: Path):
    """Rank 1 fails at start-up (a config error: exit 2) while rank 0 goes on to set up: both must exit by
    themselves, the error shown."""
    missing = tmp_path / "no_such_shards"

    def args(rank: int) -> list[str]:
        return train_args(tiny_yaml, tmp_path / "run", *([f"data.train={missing}"] if rank == 1 else []))

    # Generous: the point is that both ranks exit by themselves, not how fast a loaded machine starts them.
    results = run_ranks(args, 2, tmp_path, timeout=180)
    assert results.returncodes[0] != 0 and results.returncodes[1] == 2, results.describe()
    assert str(missing) in results.outputs[1] and "matches no shard" in results.outputs[1], results.outputs[1][-2000:]
    assert "config key 'data.train'" in results.outputs[1] and "Traceback" not in results.outputs[1]
