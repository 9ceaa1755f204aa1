"""DeepSpeed's C++ op is built into a folder of each environment's own: another environment never evicts it."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch.distributed as dist

from pretrain.engine.distributed import setup_distributed, teardown_distributed
from pretrain.storage.cache import extension_cache_dir

PRINT_DIR = "from pretrain.storage.cache import extension_cache_dir; print(extension_cache_dir())"


def test_two_environments_build_into_two_folders(tmp_path: Path):
    """A second environment (a venv that reaches this one's packages through a .pth file) gets its own folder;
    the same environment always gets the same one."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "env2")], check=True)
    other = tmp_path / "env2" / "bin" / "python"
    site = subprocess.run([str(other), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = Path(sysconfig.get_paths()["purelib"])
    # this environment's packages, and its .pth lines (the editable install's import hook among them)
    lines = [str(ours)] + [line for pth in sorted(ours.glob("*.pth")) for line in pth.read_text().splitlines()]
    Path(site, "medpretrain_test.pth").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, MEDPRETRAIN_CACHE=str(tmp_path / "cache"))
    dirs = [subprocess.run([str(python), "-c", PRINT_DIR], capture_output=True, text=True, env=env, cwd=tmp_path,
                           check=True).stdout.strip().splitlines()[-1]  # DeepSpeed's import talks first
            for python in (sys.executable, other, sys.executable)]
    assert dirs[0] == dirs[2] != dirs[1]
    assert all(Path(d).parent == tmp_path / "cache" / "torch_extensions" for d in dirs)


def test_setup_sets_the_folder_unless_the_user_did_and_teardown_takes_it_back(monkeypatch, tmp_path: Path):
    for key in ("TORCH_EXTENSIONS_DIR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    setup_distributed()
    try:
        assert os.environ["TORCH_EXTENSIONS_DIR"] == str(extension_cache_dir()) and dist.is_initialized()
    finally:
        teardown_distributed()
    assert "TORCH_EXTENSIONS_DIR" not in os.environ and "MASTER_PORT" not in os.environ

    mine = f"{extension_cache_dir()}{os.sep}."  # the user's own spelling (the same folder: no rebuild here)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", mine)
    monkeypatch.setenv("MEDPRETRAIN_CACHE", str(tmp_path / "cache"))
    setup_distributed()
    try:
        assert os.environ["TORCH_EXTENSIONS_DIR"] == mine
    finally:
        teardown_distributed()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == mine
