"""Error roots for Ark Sandbox, one per domain, split by cause.

Untrusted or user-supplied input raises a subclass of :class:`ArkError`;
calling things in the wrong order raises :class:`RuntimeError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sandbox.reasons import NodeReason


class ArkError(Exception):
    """Root of every error Ark Sandbox raises on bad input or a failed check."""


class ConfigError(ArkError):
    """A configuration file or value is invalid.

    The message names the file (when there is one), the key and the bad value.
    """

    def __init__(self, message: str, *, path: Path | str | None = None, key: str | None = None):
        where = []
        if path is not None:
            where.append(str(path))
        if key is not None:
            where.append(f"key {key!r}")
        prefix = f"{': '.join(where)}: " if where else ""
        super().__init__(f"{prefix}{message}")
        self.path = None if path is None else Path(path)
        self.key = key


class DataError(ArkError):
    """A private data file is missing or malformed; names the file and the row."""

    def __init__(self, path: Path | str, message: str, *, row: int | None = None):
        location = f"{path}" if row is None else f"{path}, row {row}"
        super().__init__(f"{location}: {message}")
        self.path = Path(path)
        self.row = row


class ModelError(ArkError):
    """A base model directory is missing, has no weights, or is unsupported."""

    def __init__(self, path: Path | str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = Path(path)


class CheckpointError(ArkError):
    """A round checkpoint is missing, corrupt, or belongs to a different job."""


class UpdateRejected(ArkError):
    """A node's update failed validation and is left out of the aggregate."""


class FederationError(ArkError):
    """The federation could not be started or a run could not finish.

    Raised for a busy port, a process that exits early, too few nodes, or a
    run that Flower reports as failed.
    """


class AggregateInvalid(FederationError):
    """A round's aggregate is not finite, or lies further than ``update-norm-bound`` from
    the previous global adapter, although every update in it passed validation.

    It is never checkpointed, logged as committed or sent; the job stops at the last
    good round and names the cause.
    """


class GatewayError(FederationError):
    """The node-facing gateway (nginx) could not be configured or started.

    Raised for a missing nginx, a config nginx refuses, a SuperLink address off
    loopback, or a gateway that does not come up; the message names the value or file.
    """


class TopologyError(FederationError):
    """A test-host network (network namespaces, bridge, veth links) could not be made,
    changed or removed, or a change was asked of a loopback one (whose link cannot be cut).

    ``command`` is the command that failed (None when none ran); the message names it
    and what it wrote to stderr.
    """

    def __init__(self, message: str, *, command: Sequence[str] | None = None):
        super().__init__(message)
        self.command = None if command is None else tuple(command)


class AdapterMismatch(ArkError):
    """An adapter's tensor names or shapes do not fit the model it is loaded into."""


class ProtocolError(ArkError):
    """A Flower message does not follow the Ark app protocol (missing or mistyped field)."""


class SealedModelError(ArkError):
    """A sealed model package failed a check: signature, digest, size or decryption.

    Crypto failures collapse into this one error; the detail stays in the message for
    the local log and is never sent to a peer.
    """


class CatalogError(ArkError):
    """A provider's signed model catalog (``ark-model-catalog/1``) failed a check.
    Subclasses name the cause; ``ark node catalog`` and ``ark compare run`` exit with
    each one's ``exit_code``."""

    exit_code = 50


class CatalogInvalid(CatalogError):
    """A catalog (or an entry meant for one) is malformed: not strict JSON, a key missing,
    unknown or of the wrong type, a model id twice, a package name that is not one plain
    path component. Names the file (when there is one), the key and the problem."""

    exit_code = 53

    def __init__(self, problem: str, *, path: Path | str | None = None, key: str | None = None):
        where = [str(path)] if path is not None else []
        where += [f"key {key!r}"] if key is not None else []
        super().__init__(f"{': '.join(where)}: {problem}" if where else problem)
        self.problem = problem
        self.path = None if path is None else Path(path)
        self.key = key


class CatalogUntrusted(CatalogError):
    """No key this node's operator trusts verifies the catalog's signature: it was signed
    by another provider, altered after signing, or the node trusts no catalog key yet."""

    exit_code = 51


class CatalogDigestMismatch(CatalogError):
    """The sealed package a catalog entry names is not the one the provider signed into
    the catalog: the SHA-256 of its ``manifest.json`` differs from the entry's."""

    exit_code = 52

    def __init__(self, model_id: str, expected: str, found: str, package: Path | str):
        super().__init__(
            f"{package}: model {model_id!r}: the catalog pins manifest SHA-256 {expected}, "
            f"the package's manifest has {found}"
        )
        self.model_id = model_id
        self.expected = expected
        self.found = found
        self.package = Path(package)


class CatalogEntryUnknown(CatalogError):
    """A run or command names a model id that the catalog does not list."""

    exit_code = 54

    def __init__(self, model_id: str, known: Sequence[str], *, source: Path | str | None = None):
        where = f"{source}: " if source is not None else ""
        listed = ", ".join(repr(m) for m in known) or "none"
        super().__init__(f"{where}no model {model_id!r} in the catalog (it lists {listed})")
        self.model_id = model_id


class AttestationError(ArkError):
    """Evidence failed appraisal. Subclasses name the cause.

    ``dimension`` is the EAR trustworthiness-vector claim the failure contraindicates.
    """

    dimension = "instance-identity"


class EvidenceFormatError(AttestationError):
    """Evidence is not a well-formed signed EAT (bad encoding, missing claim, wrong alg)."""


class SignatureInvalid(AttestationError):
    """The evidence signature does not verify with the attestation key."""


class ChainUntrusted(AttestationError):
    """The attestation key's certificate chain does not reach a trusted root, or is expired."""


class NonceMismatch(AttestationError):
    """The evidence nonce is not the one the verifier issued, or is too short."""

    dimension = "runtime-opaque"


class ReportDataMismatch(AttestationError):
    """report_data does not bind the nonce and the TEE public key the caller presented."""

    dimension = "runtime-opaque"


class DebugEnabled(AttestationError):
    """The TEE reports debug enabled, or does not report its debug status at all."""

    dimension = "configuration"


class MeasurementRejected(AttestationError):
    """A measured digest is not among the policy's reference values."""

    dimension = "executables"


class TeeNotAccepted(AttestationError):
    """The TEE kind is not accepted by policy (including stubs where stubs are not allowed)."""

    dimension = "hardware"


class NodeNotAllowed(AttestationError):
    """The attested TEE instance (its ueid) is not on the policy's node allowlist."""


class NodeAlreadyAdmitted(AttestationError):
    """The attested TEE instance (its ueid) is already admitted to this run as another
    node: one TEE may not take part as several nodes (a Sybil)."""


class SessionError(AttestationError):
    """The attestation session is unknown, expired or already used."""

    dimension = "runtime-opaque"


class SessionUnknown(SessionError):
    """No such session: never issued, or issued by another broker instance."""


class SessionExpired(SessionError):
    """The session's nonce expired before evidence arrived."""


class SessionUsed(SessionError):
    """The session's nonce was already used once; nonces are single-use."""


class ResultInvalid(AttestationError):
    """An attestation result (EAR) is malformed, tampered, not affirming or not ours."""


class ResultExpired(ResultInvalid):
    """An attestation result (EAR) is past its ``exp``."""


class KeyReleaseDenied(ArkError):
    """The key broker refused to release a key. Carries its denial code and public reason."""

    def __init__(self, code: str, reason: str):
        super().__init__(f"key release denied ({code}): {reason}")
        self.code = code
        self.reason = reason


class KeyBrokerUnavailable(ArkError):
    """The key broker could not be reached, or its TLS identity did not verify."""


class EnvelopeError(ArkError):
    """An HPKE envelope did not open: wrong key, wrong context, or tampered. Deliberately opaque."""


class PublicKeyRejected(EnvelopeError):
    """A peer's HPKE public key is malformed, or of small order (every shared secret with
    it is zero, whatever the other key): nothing is certified, admitted or sealed to it."""


class EgressViolation(ArkError):
    """An outgoing message carries something outside the node's egress allowlist."""


class ReplyMetadataAltered(EgressViolation):
    """A reply's metadata is not what its instruction sets (run, group, type, ids, TTL)."""


class AggregatorRefused(ArkError):
    """This node could not verify the aggregator (its evidence, key or channel), so it
    does not train; the message says why and goes back in the node's error reply."""


class SandboxError(ArkError):
    """The node's ClientApp and its sandbox process could not complete a request."""


class SandboxUnavailable(SandboxError):
    """The sandbox's socket is missing, refused the connection or did not answer."""


class SandboxRefused(SandboxError):
    """The sandbox answered with a fixed code (its detail stays in its own journal)."""

    def __init__(self, message: str, *, reason: NodeReason):
        super().__init__(message)
        self.reason = reason


class AdapterStoreError(ArkError):
    """A fine-tuned adapter kept on the node (encrypted at rest) cannot be read back: the
    file is missing, malformed, for another run, or does not decrypt under this sandbox's
    key (tampered with, or sealed by another code or model). Names the file."""

    def __init__(self, path: Path | str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = Path(path)


class InferenceError(ArkError):
    """The node sandbox cannot serve an inference request; subclasses name the cause and
    ``code`` is the fixed label the local API answers with (never the request's texts)."""

    code = "inference-failed"


class InferenceInputInvalid(InferenceError):
    """The request is malformed or over a bound (batch size, text length, field types)."""

    code = "bad-request"


class InferenceUnavailable(InferenceError):
    """This sandbox is not attested (an unprotected node) so it keeps no adapter."""

    code = "not-attested"


class NoAdapterStored(InferenceError):
    """No attested adapter is stored yet for the run (or any run) asked for."""

    code = "no-adapter"


class InferenceTaskMismatch(InferenceError):
    """The stored adapter's run is of another task than the endpoint serves."""

    code = "wrong-task"


class AppNotApproved(ArkError):
    """The app a run ships is not among this node's approved app digests."""


class LogUnavailable(ArkError):
    """The transparency log could not be reached or read (address, TLS or database)."""

    exit_code = 40


class LogEntryTooLarge(ArkError, ValueError):
    """An entry larger than the log's per-entry limit: an emitter that should have logged
    a growing list one entry per member (:mod:`sandbox.events.members`)."""


class AuditTooLarge(ArkError):
    """The log is larger than an audit may hold in memory (``ark audit --max-entries``)."""


class LogVerificationError(ArkError):
    """The transparency log, a checkpoint, a proof or a journal failed verification.

    Each subclass carries the ``exit_code`` that ``ark audit`` exits with.
    """

    exit_code = 20


class InclusionProofError(LogVerificationError):
    """An inclusion proof is malformed or does not lead to the checkpoint's root."""

    exit_code = 25


class ConsistencyProofError(LogVerificationError):
    """A consistency proof is malformed or the two trees are not one growing log."""

    exit_code = 20


class LogRollback(ConsistencyProofError):
    """The log is smaller than a checkpoint seen before: truncated or rolled back."""

    exit_code = 21


class LogFork(ConsistencyProofError):
    """Two signed checkpoints of the same size with different roots: a forked log."""

    exit_code = 22


class EntryTampered(InclusionProofError):
    """An entry the log serves does not hash to the tree its checkpoint signs: edited."""

    exit_code = 23


class EntryMissing(InclusionProofError):
    """The log serves fewer entries than its checkpoint signs, or leaves a gap: deleted."""

    exit_code = 24


class NoteError(LogVerificationError):
    """A signed note or checkpoint failed verification."""

    exit_code = 10


class NoteSignatureInvalid(NoteError):
    """A signature line by a trusted key does not verify over the note's text."""

    exit_code = 10


class NoteUnknownSigner(NoteError):
    """No signature on the note is by a key the verifier trusts."""

    exit_code = 11


class NoteMalformed(NoteError):
    """The note or the checkpoint inside it does not follow the C2SP format."""

    exit_code = 12


class OriginMismatch(NoteError):
    """The checkpoint names another log (origin) than the one being verified."""

    exit_code = 13


class PolicyViolation(LogVerificationError):
    """The events in the log break a rule that must hold across them."""

    exit_code = 30


class ReleaseWithoutAppraisal(PolicyViolation):
    """A key release with no affirming appraisal of the same session and key before it."""

    exit_code = 31


class UpdateFromUnattested(PolicyViolation):
    """An accepted update from a node that was not attested and admitted in that run."""

    exit_code = 32


class AggregateUnaccepted(PolicyViolation):
    """A committed aggregate lists an update that was not accepted in that round."""

    exit_code = 33


class NodeAdmittedTwice(PolicyViolation):
    """One attested TEE instance (ueid) admitted as two different nodes in one run."""

    exit_code = 36


class ScorecardRootMismatch(PolicyViolation):
    """A node scored a model on another held-out set than the one it committed to: a
    scorecard's held-out root (or count) is not its node's committed one, or comes before
    any commitment; or one node committed two different sets in one comparison."""

    exit_code = 37


class ScorecardMissing(PolicyViolation):
    """A comparison finished without a valid scorecard for some model of it from some node
    that committed a held-out set: a result was left out (say, the losing model's)."""

    exit_code = 38


class ScorecardUnattested(PolicyViolation):
    """A held-out commitment or scorecard does not verify (malformed, bad signature), or its
    signer is not a sandbox key the key broker certified for signing, for the same ueid,
    earlier in the log."""

    exit_code = 39


class SecAggInconsistent(PolicyViolation):
    """A secure-aggregation round whose logged stages break the protocol: out of order or
    twice; a stage naming nodes the one before it did not; survivors or dropped nodes that
    are not the mask stage's nodes and the rest (a node that sent a masked input listed as
    dropped, whose masking key was then rebuilt); or an individual update accepted in it."""

    exit_code = 41


class PrivacyLedgerMismatch(PolicyViolation):
    """A node's logged differential-privacy spending does not hold up: the epsilon it
    logged for a run is not what an independent accountant computes from its logged
    rounds (noise multiplier, sampling rate, steps, delta), it passes the node's declared
    budget or the run's ask, a round it sent an update in is missing from its ledger, or
    the aggregate's client-level epsilon is not what its logged noise gives."""

    exit_code = 42


class ListCommitmentMismatch(PolicyViolation):
    """A list logged one entry per member (``list_member``) does not match the count and
    Merkle root its event commits to: a member missing, added, changed, out of order or
    logged twice, members no event commits, or an event with both forms of one list."""

    exit_code = 43


class JournalMismatch(LogVerificationError):
    """A node journal records something the provider's log does not."""

    exit_code = 34


class JournalInvalid(LogVerificationError):
    """A node journal's chain or signatures do not verify: edited, reordered or cut."""

    exit_code = 35


class CanonicalJSONError(ArkError, ValueError):
    """A value has no RFC 8785 canonical form (an integer beyond 2**53 - 1, a non-finite
    float, a non-string key or a non-JSON type); the message says where it sits. Also a
    ``ValueError``, as the encoder's own error was, for callers that catch that."""


class EventInvalid(ArkError):
    """A record is not a well-formed event of the schema (:mod:`sandbox.events`): an
    unknown kind, a missing or extra field, or a value of the wrong type.

    ``kind`` is the event kind (None when the record names none) and ``key`` the field at
    fault (None when the record as a whole is wrong); both are in the message.
    """

    def __init__(self, message: str, *, kind: str | None, key: str | None = None):
        key = None if key is None else str(key)  # a sandbox.events.Key reads as its name
        where = f"event {kind!r}" if kind is not None else "event"
        if key is not None:
            where += f", key {key!r}"
        super().__init__(f"{where}: {message}")
        self.kind = kind
        self.key = key


class ComparisonInvalid(ConfigError):
    """A comparison's results file (``comparison.json``, written from other parties'
    scorecards) cannot be read, or is malformed: a missing, unknown or mistyped key, a
    non-finite number, a scorecard for an unknown model or node, a duplicate or missing
    scorecard. The message names the file and the key (``scorecards[2].after.accuracy``)."""


class ScorecardError(ArkError):
    """A held-out commitment or a scorecard (:mod:`sandbox.scorecard`) failed a check."""


class ScorecardInvalid(ScorecardError):
    """A commitment or scorecard, or the signed record carrying one, is malformed (a field
    missing, extra, of the wrong type or out of bounds; named with its value), over the size
    limit, or its signature does not verify under the key it names."""


class SecAggError(ArkError):
    """Secure aggregation (:mod:`sandbox.secagg`) failed a check or cannot go on."""


class SecAggMessageInvalid(SecAggError):
    """A secure-aggregation message from another party is malformed (a key missing, extra
    or mistyped, a blob of the wrong size) or a sealed share does not open."""


class AdvertisementInvalid(SecAggError):
    """A node's key advertisement is not signed by an attested identity: its
    certification does not verify, is not an affirming ``signing`` result for the key that
    signed, or the signature does not verify. The node is left out of the round."""


class QuantizationOverflow(SecAggError):
    """An update cannot be quantized without risking an overflow of the 32-bit sum: a
    value outside the clip range, a weight outside (0, 1], or no scale for the node count.
    Refused in the node's sandbox before anything is masked."""


class SecAggRefused(SecAggError):
    """A node's sandbox refuses an aggregator's secure-aggregation request that breaks the
    protocol's rules (a roster it did not advertise to, a second unmask, shares of a node
    both ways, fewer survivors than the threshold); nothing is revealed."""


class SecAggFailed(FederationError):
    """A secure-aggregation round cannot finish: fewer than the threshold of nodes reached
    a stage, or the shares do not rebuild a node's secret. It fails closed: nothing is
    unmasked, committed or sent."""


class PrivacyError(ArkError):
    """Differential privacy (:mod:`sandbox.privacy`) cannot be applied as asked."""


class PrivacyBudgetRefused(PrivacyError):
    """A run asks for a looser privacy setting than the node's own budget allows (a larger
    epsilon, delta or clip): the node takes no part in it."""


class PrivacyBudgetExhausted(PrivacyError):
    """Training this round would spend more than the node's privacy budget (or the run's
    ask): the node declines the round, and its ledger is unchanged."""
