"""The pseudonym key: from the config, the environment, or a key file made once, never beside the outputs.

In that order: ``ingest.salt`` (never saved with the config), ``MEDRAY_PSEUDONYM_SALT``, else a key
file — ``ingest.salt_file``, ``MEDRAY_SALT_FILE`` or ``~/.config/medray/salt`` — which is created with
a random key, owner-only (0600), the first time it is needed and read on every later ingest, so that
one patient keeps one pseudonym across ingests. A key file others can read, or one in the manifest's
folder, is refused: anyone holding the key can test a guessed ID against a pseudonym. Only where the
key came from (a variable's name or the file's path) is ever logged or printed, never the key.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import uuid

from medray.io import storage

log = logging.getLogger("medray.ingest")
SALT_ENV = "MEDRAY_PSEUDONYM_SALT"
SALT_FILE_ENV = "MEDRAY_SALT_FILE"


class KeyFileError(ValueError):
    """A key file that cannot be used as it is (an adapter's ValueError: one line on the command line)."""


def default_key_file() -> str:
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(config_home, "medray", "salt")


def resolve(salt: str | None, key_file: str | None, out: str) -> tuple[bytes, str]:
    """(the key, where it came from) for an ingest writing ``out``."""
    if salt:
        return salt.encode(), "ingest.salt"
    if os.environ.get(SALT_ENV):
        return os.environ[SALT_ENV].encode(), SALT_ENV
    path = os.path.abspath(os.path.expanduser(key_file or os.environ.get(SALT_FILE_ENV) or default_key_file()))
    outputs = os.path.dirname(storage.absolute(out))
    # The manifest's own folder is what gets copied and shared; a folder above it may be the user's home.
    if not storage.is_s3(out) and os.path.dirname(path) == outputs:
        raise KeyFileError(
            f"the key file {path} lies in the output folder {outputs}: keep it elsewhere (ingest.salt_file or {SALT_FILE_ENV})"
        )
    return _read_or_create(path), path


def _read_or_create(path: str) -> bytes:
    if not os.path.lexists(path):
        _create(path)
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"the key file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise KeyFileError(f"the key file {path} can be read by others (mode {stat.S_IMODE(info.st_mode):o}): chmod 600 {path}")
    with open(path, "rb") as f:
        key = f.read(4096).strip()
    if not key:
        raise KeyFileError(f"the key file {path} is empty: delete it to have a new key made (and new pseudonyms), or restore it")
    return key


def _create(path: str) -> None:
    """A new random key, written whole before it appears under ``path``: two ingests starting at once
    both end up with the first one's key, and neither ever reads a half-written file."""
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temporary, path)  # fails if another ingest made it first: theirs is kept
        except FileExistsError:
            return
    finally:
        os.unlink(temporary)
    log.info("created the pseudonym key file %s (owner-only): keep it, and its pseudonyms stay the same next time", path)
