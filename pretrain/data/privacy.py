"""Keep patient identity out of shards: salted keys and a metadata whitelist.

Every DICOM UID or patient identifier that names a sample is replaced by
``hmac-sha256(salt, value)``. The salt is a secret the user keeps (an
environment variable or a file outside the output folder); it is never
written anywhere, so the keys cannot be reversed or re-derived without it,
yet the same salt always gives the same keys (restartable, joinable runs).

Only the metadata keys in ``SAFE_META_KEYS`` reach a sample's ``.json``;
``IDENTIFYING_DICOM_ATTRIBUTES`` lists the DICOM attributes that must never
be copied into shard bytes or manifests.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Any

SALT_ENV = "MEDPRETRAIN_SALT"
SALT_FILE_ENV = "MEDPRETRAIN_SALT_FILE"
MIN_SALT_BYTES = 16
KEY_HEX_CHARS = 32  # 128 bits: collisions are out of reach for any dataset size

IDENTIFYING_DICOM_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientMotherBirthName",
    "MedicalRecordLocator",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingPhysician",
    "StationName",
    "DeviceSerialNumber",
    "StudyID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "InstanceCreationDate",
    "StudyTime",
    "SeriesTime",
    "AcquisitionTime",
    "ContentTime",
    "AcquisitionDateTime",
)

SAFE_META_KEYS = frozenset(
    {
        "kind",  # "dicom", "nifti" or "image"
        "modality",
        "body_part",
        "spatial_dims",
        "channels",
        "spacing",
        "orientation",
        "original_orientation",
        "time_point",  # which volume of a 4-D NIfTI file the sample is
        "rescale_applied",
        "photometric_inverted",
        "resampled_from_spacing",
        "intensity",
        "label",
        "label_name",
        "split",
        "patient",  # the salted HMAC of the patient identifier (a pseudonym), never the identifier itself
        "shape",
        "dtype",
    }
)


class SaltError(ValueError):
    """No usable salt was given; the message says where one is looked for."""


def salt_from_environment() -> bool:
    """Whether ``$MEDPRETRAIN_SALT`` or ``$MEDPRETRAIN_SALT_FILE`` names a salt."""
    return bool(os.environ.get(SALT_ENV) or os.environ.get(SALT_FILE_ENV))


def load_salt(salt: str | bytes | Path | None = None) -> bytes:
    """The secret salt as bytes.

    ``salt`` may be the secret itself (``str``/``bytes``) or a ``Path`` to a
    file holding it. With ``None`` the environment variable ``MEDPRETRAIN_SALT``
    is used, else the file named by ``MEDPRETRAIN_SALT_FILE``. The salt must be
    at least 16 bytes (after stripping surrounding whitespace from files).
    """
    where = "the salt argument"
    if salt is None:
        if os.environ.get(SALT_ENV):
            salt, where = os.environ[SALT_ENV], f"${SALT_ENV}"
        elif os.environ.get(SALT_FILE_ENV):
            salt, where = Path(os.environ[SALT_FILE_ENV]), f"${SALT_FILE_ENV}"
        else:
            raise SaltError(
                f"no salt: pass --salt-file PATH, set ${SALT_ENV}, or point ${SALT_FILE_ENV} at a file you keep private "
                f"(e.g. `head -c 32 /dev/urandom | base64 > ~/.medpretrain_salt`)"
            )
    if isinstance(salt, Path):
        try:
            value = salt.read_bytes().strip()
        except OSError as e:
            raise SaltError(f"salt file {salt} is not readable: {e}") from e
        where = f"salt file {salt}"
    else:
        value = salt.encode("utf-8") if isinstance(salt, str) else bytes(salt)
    if len(value) < MIN_SALT_BYTES:
        raise SaltError(f"{where}: salt has {len(value)} bytes; use at least {MIN_SALT_BYTES} random bytes")
    return value


def hashed_key(salt: bytes, value: str) -> str:
    """``hmac-sha256(salt, value)`` as hex, truncated to 128 bits; safe as a webdataset key."""
    if not value:
        raise ValueError("cannot hash an empty identifier")
    return hmac.new(salt, value.encode("utf-8"), hashlib.sha256).hexdigest()[:KEY_HEX_CHARS]


def salt_fingerprint(salt: bytes) -> str:
    """A non-reversible tag of the salt, so a resumed run can check it uses the same one."""
    return hashed_key(salt, "medpretrain-salt-fingerprint")[:16]


def safe_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """Only the whitelisted, non-identifying keys of ``meta``."""
    return {k: v for k, v in meta.items() if k in SAFE_META_KEYS}
