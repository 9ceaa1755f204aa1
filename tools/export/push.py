"""``pretrain export push PATH REPO_ID``: upload an export folder to the Hugging Face hub.

The token comes from the environment (``HF_TOKEN``, or what ``hf auth login``
stored); ``--dry-run`` lists every file and its size and contacts nobody. The
folder is checked first: an export's files present, no pickle among them. An
open_clip export is uploaded naming the repository as the place of its text
tower (``text_cfg.hf_model_name``), so ``hf-hub:REPO`` reads its own files.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .layout import CARD, OPEN_CLIP_CONFIG, WEIGHTS, export_meta

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# A pickle starts with the PROTO opcode (protocol >= 2); torch.save writes a zip archive of pickles.
_PICKLE_STARTS = (b"\x80", b"PK\x03\x04")


class PushError(ValueError):
    """The folder or the repository id is not fit to push; the message names what."""


def _is_safetensors(head: bytes, size: int) -> bool:
    """safetensors: a little-endian u64 header length, then that many bytes of JSON (its first byte can be
    0x80, the pickle PROTO opcode, so this is told apart first)."""
    if len(head) < 9:
        return False
    length = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 8 + length <= size


def pickled_files(folder: Path) -> list[str]:
    """Files under ``folder`` that start like a pickle or a torch.save archive."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            head = f.read(9)
        if not _is_safetensors(head, path.stat().st_size) and head.startswith(_PICKLE_STARTS):
            found.append(str(path.relative_to(folder)))
    return found


def check_export_folder(folder: str | Path) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file of an export folder; PushError when it is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder}: no such export folder")
    try:
        meta = export_meta(folder)
    except ValueError as err:
        raise PushError(str(err)) from None
    weights = "open_clip_model.safetensors" if meta.get("target") == "open_clip" else WEIGHTS
    missing = [name for name in (weights, CARD) if not (folder / name).is_file()]
    if missing:
        raise PushError(f"{folder}: not a complete export (missing {', '.join(missing)}); make one with `pretrain export`")
    pickles = pickled_files(folder)
    if pickles:
        raise PushError(f"{folder}: {', '.join(pickles)} look like pickles; exports hold safetensors and text only")
    return [(str(p.relative_to(folder)), p.stat().st_size) for p in sorted(folder.rglob("*")) if p.is_file()]


@contextmanager
def as_uploaded(folder: Path, repo_id: str) -> Iterator[Path]:
    """The folder as it is uploaded to ``repo_id``: itself, or for an open_clip export a linked copy whose
    config names the repository as the text tower's place."""
    config = folder / OPEN_CLIP_CONFIG
    if not config.is_file():
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix=".upload.", dir=folder.parent) as tmp:
        view = Path(tmp)
        for path in folder.iterdir():
            if path.is_file() and path.name != OPEN_CLIP_CONFIG:
                try:
                    os.link(path, view / path.name)  # no copy of the weights
                except OSError:
                    shutil.copy2(path, view / path.name)
        content = json.loads(config.read_text())
        text = content["model_cfg"]["text_cfg"]
        text["hf_model_name"] = text["hf_tokenizer_name"] = repo_id
        (view / OPEN_CLIP_CONFIG).write_text(json.dumps(content, indent=2) + "\n")
        yield view


def push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         dry_run: bool = False) -> list[tuple[str, int]]:
    """Upload ``folder`` to ``repo_id`` (created when missing); returns the files. Nothing is sent on ``dry_run``."""
    if not _REPO_ID.match(repo_id):
        raise PushError(f"repo id {repo_id!r}: expected OWNER/NAME (letters, digits, '-', '_', '.')")
    check_export_folder(folder)
    with as_uploaded(Path(folder), repo_id) as view:
        files = check_export_folder(view)
        if not dry_run:
            _upload(view, repo_id, private=private, revision=revision, files=len(files))
    return files


def _upload(folder: Path, repo_id: str, *, private: bool, revision: str | None, files: int) -> None:
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    token = get_token()  # HF_TOKEN, else the token `hf auth login` stored
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a write token)")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                          commit_message=f"medpretrain export ({files} files)")
    except HfHubHTTPError as err:
        raise PushError(f"pushing {folder} to {repo_id}: {err}") from err
