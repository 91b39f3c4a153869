"""SSH key material for guests: per-VM client keys and per-VM host keys.

herovm generates two Ed25519 keys per VM on the host:

* a *client* key: its public line goes into the guest's ``authorized_keys`` (via the config drive)
  and herovm logs in with the private half;
* a *host* key: the private half goes onto the config drive as the guest sshd's host key, and the
  public line is pinned by :class:`herovm.guest.ssh.GuestConnection`, so the host never has to
  trust a key on first use.

Private keys are written in OpenSSH format to files that are created with mode 0600 from the start.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import struct
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

__all__ = ["SUPPORTED_KEY_TYPES", "generate_keypair", "host_key_entry", "public_line"]

# Key types herovm can pin. herovm itself only generates ssh-ed25519.
SUPPORTED_KEY_TYPES = frozenset(
    {"ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa"}
)


def generate_keypair(private_path: Path, *, comment: str) -> str:
    """Generate an Ed25519 key, write the private half to ``private_path`` and return the public line.

    The file is created with ``O_CREAT | O_EXCL`` and mode 0600, so it is never readable by others,
    not even for an instant, and an existing file is never overwritten (``FileExistsError``).
    The returned line looks like ``"ssh-ed25519 AAAA... comment"``; storing it is the caller's job.
    """
    if any(c in comment for c in "\r\n"):
        raise ValueError("key comment must be a single line")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.OpenSSH,
        encryption_algorithm=serialization.NoEncryption(),
    )
    write_secret(Path(private_path), pem)
    return _public_line_of(key, comment)


def write_secret(path: Path, data: bytes) -> None:
    """Create ``path`` holding ``data``, mode exactly 0600; refuses to overwrite an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        # The mode given to open() is filtered by the umask, which can only remove bits; make it
        # exactly 0600 anyway in case the caller runs with an odd umask such as 0177.
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def generate_token(path: Path) -> str:
    """A new random secret (64 hex digits) written to ``path`` (0600), e.g. the VM's exec token."""
    token = secrets.token_hex(32)
    write_secret(path, token.encode())
    return token


def public_line(private_path: Path, *, comment: str = "") -> str:
    """Return the OpenSSH public key line (``"ssh-ed25519 AAAA... comment"``) of a private key file."""
    data = Path(private_path).read_bytes()
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except ValueError as exc:
        raise ValueError(f"{private_path} is not an unencrypted OpenSSH private key: {exc}") from None
    return _public_line_of(key, comment)


def host_key_entry(public_line: str) -> tuple[str, str]:
    """Split an OpenSSH public key line into ``(key_type, base64_blob)`` for pinning.

    The line may carry a trailing comment. Raises ``ValueError`` when the line is not a well-formed
    public key of a supported type (the type named in the line must match the one inside the blob).
    """
    fields = public_line.strip().split(None, 2)
    if len(fields) < 2:
        raise ValueError("expected an OpenSSH public key line like 'ssh-ed25519 AAAA... comment'")
    key_type, blob_b64 = fields[0], fields[1]
    if key_type not in SUPPORTED_KEY_TYPES:
        raise ValueError(f"unsupported host key type {key_type!r}; use one of {sorted(SUPPORTED_KEY_TYPES)}")
    try:
        blob = base64.b64decode(blob_b64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"host key for {key_type} is not valid base64") from None
    if len(blob) < 4:
        raise ValueError("host key blob is truncated")
    (name_len,) = struct.unpack(">I", blob[:4])
    if blob[4 : 4 + name_len] != key_type.encode():
        raise ValueError(f"host key blob does not contain a {key_type} key")
    return key_type, blob_b64


def _public_line_of(key: object, comment: str) -> str:
    public = key.public_key()  # type: ignore[attr-defined]
    line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}" if comment else line
