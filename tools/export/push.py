"""``pretrain export push PATH REPO_ID``: upload an export folder to the Hugging Face hub.

The token comes from the environment (``HF_TOKEN``, or what ``hf auth login``
stored); ``--dry-run`` lists every file and its size and contacts nobody. The
folder is checked first: an export's three files present, no pickle among them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# A pickle starts with the PROTO opcode (protocol >= 2); torch.save writes a zip archive of pickles.
_PICKLE_STARTS = (b"\x80", b"PK\x03\x04")


class PushError(ValueError):
    """The folder or the repository id is not fit to push; the message names what."""


def pickled_files(folder: Path) -> list[str]:
    """Files under ``folder`` that start like a pickle or a torch.save archive."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            if f.read(4).startswith(_PICKLE_STARTS):
                found.append(str(path.relative_to(folder)))
    return found


def check_export_folder(folder: str | Path) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file of an export folder; PushError when it is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder}: no such export folder")
    missing = [name for name in ("model.safetensors", "config.json", "README.md") if not (folder / name).is_file()]
    if missing:
        raise PushError(f"{folder}: not an export folder (missing {', '.join(missing)}); make one with `pretrain export`")
    try:
        json.loads((folder / "config.json").read_text())["medpretrain"]
    except (ValueError, KeyError):
        raise PushError(f"{folder / 'config.json'}: not a medpretrain export config (no 'medpretrain' entry)") from None
    pickles = pickled_files(folder)
    if pickles:
        raise PushError(f"{folder}: {', '.join(pickles)} look like pickles; exports hold safetensors and text only")
    return [(str(p.relative_to(folder)), p.stat().st_size) for p in sorted(folder.rglob("*")) if p.is_file()]


def push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         dry_run: bool = False) -> list[tuple[str, int]]:
    """Upload ``folder`` to ``repo_id`` (created when missing); returns the files. Nothing is sent on ``dry_run``."""
    if not _REPO_ID.match(repo_id):
        raise PushError(f"repo id {repo_id!r}: expected OWNER/NAME (letters, digits, '-', '_', '.')")
    files = check_export_folder(folder)
    if dry_run:
        return files
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
                          commit_message=f"medpretrain export ({len(files)} files)")
    except HfHubHTTPError as err:
        raise PushError(f"pushing {folder} to {repo_id}: {err}") from err
    return files
