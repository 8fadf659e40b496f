"""C2SP signed notes and tlog checkpoints, signed with Ed25519.

A checkpoint is the text ``origin\\nsize\\nbase64(root)\\n`` (optionally followed by
extension lines). A signed note is that text, a blank line, and one line per signature:
``— <key name> base64(key id ‖ signature)``. The key id is the first four bytes of
``SHA-256(name ‖ "\\n" ‖ 0x01 ‖ public key)``, 0x01 naming Ed25519. Verifier keys travel
as ``<name>+<hex key id>+base64(0x01 ‖ public key)`` (a "vkey").

Opening a note collapses nothing: a malformed note, a note signed by no trusted key,
and a bad signature by a trusted key are three different errors.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sandbox.errors import (
    NoteMalformed,
    NoteSignatureInvalid,
    NoteUnknownSigner,
    OriginMismatch,
)

ED25519 = b"\x01"
SIGNATURE_PREFIX = "\u2014 "  # em dash and a space
MAX_SIGNATURES = 100
MAX_NOTE_BYTES = 1 << 20


def _b64decode(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise NoteMalformed(f"{what} is not valid base64") from exc


def _check_name(name: str) -> str:
    # Not printable: control characters (NUL among them) and lone surrogates, which
    # could not be hashed into a key id (UTF-8 cannot encode them).
    if not name or "+" in name or any(ch.isspace() for ch in name) or not name.isprintable():
        raise NoteMalformed(
            f"key name {name[:64]!r} is empty, has a space or '+', or is not printable text"
        )
    return name


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(name: str, public_key: Ed25519PublicKey) -> bytes:
    """The C2SP key id of an Ed25519 note key: four bytes naming (name, key)."""
    digest = hashlib.sha256(name.encode() + b"\n" + ED25519 + _raw_public(public_key)).digest()
    return digest[:4]


def log_origin(public_key: Ed25519PublicKey) -> str:
    """The origin line of a provider's log: stable, and unique to its checkpoint key."""
    return f"ark-sandbox.local/log/{hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]}"


@dataclass(frozen=True)
class NoteVerifier:
    """A trusted note key: its name, key id and Ed25519 public key."""

    name: str
    public_key: Ed25519PublicKey

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.public_key)

    def vkey(self) -> str:
        """This key in the C2SP verifier-key encoding."""
        blob = base64.b64encode(ED25519 + _raw_public(self.public_key)).decode()
        return f"{self.name}+{self.key_id.hex()}+{blob}"

    @classmethod
    def from_vkey(cls, vkey: str) -> NoteVerifier:
        """Parse ``name+hexid+base64(0x01‖key)``; raises :class:`NoteMalformed`."""
        parts = vkey.strip().split("+", 2)  # the base64 key may itself hold a '+'
        if len(parts) != 3:
            raise NoteMalformed("a verifier key is name+keyid+key")
        name, hex_id, blob = parts
        _check_name(name)
        raw = _b64decode(blob, "the verifier key")
        if len(raw) != 33 or raw[:1] != ED25519:
            raise NoteMalformed("the verifier key is not an Ed25519 note key")
        verifier = cls(name, Ed25519PublicKey.from_public_bytes(raw[1:]))
        if hex_id.lower() != verifier.key_id.hex():
            raise NoteMalformed(f"verifier key id {hex_id[:16]!r} does not match its key")
        return verifier


@dataclass(frozen=True)
class NoteSigner:
    """Signs note text as ``name`` with an Ed25519 private key."""

    name: str
    private_key: Ed25519PrivateKey

    def __post_init__(self) -> None:
        _check_name(self.name)

    @property
    def verifier(self) -> NoteVerifier:
        return NoteVerifier(self.name, self.private_key.public_key())

    def signature_line(self, text: str) -> str:
        signature = self.private_key.sign(text.encode("utf-8"))
        blob = base64.b64encode(self.verifier.key_id + signature).decode()
        return f"{SIGNATURE_PREFIX}{self.name} {blob}\n"

    def sign(self, text: str) -> str:
        """The signed note: ``text``, a blank line and this key's signature line."""
        _check_text(text)
        return f"{text}\n{self.signature_line(text)}"


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise NoteMalformed("note text must end with a newline")
    if any((ord(ch) < 0x20 and ch != "\n") or ord(ch) == 0x7F for ch in text):
        raise NoteMalformed("note text has a control character")
    _utf8(text, "note text")


def _utf8(text: str, what: str) -> bytes:
    """``text`` as UTF-8; a lone surrogate (which UTF-8 cannot encode) is malformed."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise NoteMalformed(f"{what} is not UTF-8 text (a lone surrogate)") from exc


def open_note(note: str | bytes, verifiers: Sequence[NoteVerifier]) -> str:
    """The text of ``note`` once a signature by one of ``verifiers`` checks out.

    Raises :class:`NoteMalformed` for a note that breaks the format,
    :class:`NoteSignatureInvalid` if a trusted key's signature does not verify, and
    :class:`NoteUnknownSigner` if no signature is by a trusted key.
    """
    # Text is checked as the bytes it would be signed as: every character at least one.
    if len(note) > MAX_NOTE_BYTES:
        raise NoteMalformed(f"note is {len(note)} long, more than {MAX_NOTE_BYTES}")
    raw = _utf8(note, "note") if isinstance(note, str) else note
    if len(raw) > MAX_NOTE_BYTES:
        raise NoteMalformed(f"note is {len(raw)} bytes, more than {MAX_NOTE_BYTES}")
    try:
        note = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NoteMalformed("note is not UTF-8") from exc
    split = note.rfind("\n\n")
    if split < 0:
        raise NoteMalformed("note has no blank line before its signatures")
    text, block = note[: split + 1], note[split + 2 :]
    _check_text(text)
    if not block.endswith("\n"):
        raise NoteMalformed("note signatures must end with a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteMalformed(f"note has {len(lines)} signatures, more than {MAX_SIGNATURES}")
    trusted = {(v.name, v.key_id): v for v in verifiers}
    verified = False
    for line in lines:
        if not line.startswith(SIGNATURE_PREFIX):
            raise NoteMalformed("a signature line does not start with an em dash")
        fields = line[len(SIGNATURE_PREFIX) :].split(" ")
        if len(fields) != 2:
            raise NoteMalformed("a signature line is not '— name signature'")
        name, blob = _check_name(fields[0]), _b64decode(fields[1], "a signature")
        if len(blob) < 5:
            raise NoteMalformed("a signature is too short to hold a key id")
        verifier = trusted.get((name, blob[:4]))
        if verifier is None:
            continue  # another party's signature (a witness, say): not ours to judge
        try:
            verifier.public_key.verify(blob[4:], text.encode("utf-8"))
        except InvalidSignature as exc:
            raise NoteSignatureInvalid(f"signature by {name} does not verify") from exc
        verified = True
    if not verified:
        names = ", ".join(sorted({v.name for v in verifiers})) or "none"
        raise NoteUnknownSigner(f"note is not signed by a trusted key (trusted: {names})")
    return text


@dataclass(frozen=True)
class Checkpoint:
    """A C2SP tlog checkpoint: which log, how many entries, and the tree's root."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def to_text(self) -> str:
        root = base64.b64encode(self.root).decode()
        return "".join(
            f"{line}\n" for line in (self.origin, str(self.size), root, *self.extensions)
        )

    @classmethod
    def from_text(cls, text: str) -> Checkpoint:
        """Parse checkpoint text; raises :class:`NoteMalformed` naming the bad line."""
        if not text.endswith("\n"):
            raise NoteMalformed("checkpoint must end with a newline")
        _check_text(text)  # no control characters or lone surrogates in any line
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise NoteMalformed(f"checkpoint has {len(lines)} lines, needs origin, size and root")
        origin, size_text, root_text, *extensions = lines
        if not origin:
            raise NoteMalformed("checkpoint origin is empty")
        if (
            not size_text.isascii()
            or not size_text.isdigit()
            or (size_text.startswith("0") and size_text != "0")
            or len(size_text) > 20
            or int(size_text) >= 2**64
        ):
            raise NoteMalformed(
                f"checkpoint size {size_text[:32]!r} is not a decimal number below 2**64"
            )
        root = _b64decode(root_text, "checkpoint root")
        if len(root) != 32:
            raise NoteMalformed(f"checkpoint root is {len(root)} bytes, not 32")
        if any(not line for line in extensions):
            raise NoteMalformed("checkpoint has an empty extension line")
        return cls(origin, int(size_text), root, tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, signer: NoteSigner) -> str:
    """The checkpoint as a signed note."""
    return signer.sign(checkpoint.to_text())


def verify_checkpoint(
    note: str | bytes, verifier: NoteVerifier, *, origin: str | None = None
) -> Checkpoint:
    """The checkpoint in ``note`` once its signature and origin check out.

    ``origin`` defaults to the verifier key's name, as C2SP logs name their key after
    their origin. Raises a :class:`~sandbox.errors.NoteError` subclass.
    """
    checkpoint = Checkpoint.from_text(open_note(note, [verifier]))
    expected = verifier.name if origin is None else origin
    if checkpoint.origin != expected:
        raise OriginMismatch(
            f"checkpoint is for log {checkpoint.origin[:128]!r}, expected {expected!r}"
        )
    return checkpoint
