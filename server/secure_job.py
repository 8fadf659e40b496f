"""A federated job whose aggregator sees only the sum: secure aggregation's stages.

A secure training round (``mode`` secagg or ffa+secagg) runs *admit* and *instruct* as
any round does, then the stages of ``sandbox/secagg.py`` over Flower's Message API:
*advertise* (the training instruction's replies are the nodes' signed keys; they train
meanwhile), *share* (route the sealed shares), *mask* (collect masked inputs, each sealed
to this attested aggregator like an update, into one sum), *check* (the survivors sign one
split of the round into survivors and dropped) and *unmask* (survivors reveal shares;
the masks come off the sum). *commit* is the plain job's. Each stage logs who
took part; the unmask stage logs the dropped set whose masking keys were rebuilt.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log

from sandbox import events
from sandbox.digests import sha256_hex
from sandbox.errors import (
    AggregateInvalid,
    ConfigError,
    SecAggError,
    SecAggMessageInvalid,
    UpdateRejected,
)
from sandbox.lora import Adapter, is_trained
from sandbox.protocol import (
    CONFIG_KEY,
    SECAGG_ACTION,
    SECAGG_KEY,
    SECAGG_PAYLOAD,
    SECAGG_STAGE,
    round_config,
)
from sandbox.secagg import (
    MASKED_TENSOR,
    MAX_REPLY_BYTES,
    STAGE_CHECK,
    STAGE_MASK,
    STAGE_SHARE,
    STAGE_UNMASK,
    flatten,
    unflatten,
)
from server.app import FederatedJob, RoundState, Stage, _split_metrics
from server.channels import SealedChannel
from server.privacy import reported_spending
from server.secagg import ServerRound

SECAGG_QUERY = f"{MessageType.QUERY}.{SECAGG_ACTION}"


def _payload(reply: Message) -> bytes:
    """A reply's secure-aggregation message (KeyError/TypeError for a reply without one)."""
    blob = reply.content.config_records[SECAGG_KEY][SECAGG_PAYLOAD]
    if not isinstance(blob, bytes):
        raise TypeError("the secure-aggregation payload is not bytes")
    if len(blob) > MAX_REPLY_BYTES:
        raise SecAggMessageInvalid(
            f"a secure-aggregation reply of {len(blob)} bytes (at most {MAX_REPLY_BYTES})"
        )
    return blob


@dataclass
class SecureSum:
    """A secure round's unmasked sum, read by *commit* as a plain aggregator is: the
    weighted mean of the survivors' updates, checked before it is committed."""

    reference: Adapter  # the global adapter's trained tensors
    sums: np.ndarray  # the summed weighted deltas
    weight: float  # the summed weights (each in (0, 1])
    count: int
    max_norm: float
    examples_cap: int
    slack: float  # the quantization's bound on one element of the mean
    # Client-level DP: the nodes added noise shares, so the mean is not held to the bound.
    noisy: bool = False
    total_weight: float = field(init=False)

    def __post_init__(self) -> None:
        self.total_weight = self.weight * self.examples_cap

    def result(self) -> dict[str, np.ndarray]:
        """The new trained tensors; AggregateInvalid unless the summed weight is within
        (0, count], the mean finite and within ``update-norm-bound`` of the global adapter
        (what the nodes checked of each update before masking it, checked of the sum)."""
        if not (0 < self.weight <= self.count * (1 + 1e-6)):
            raise AggregateInvalid(
                f"the unmasked weight {self.weight:.6g} of {self.count} inputs is outside "
                f"(0, {self.count}]"
            )
        mean = self.sums / self.weight
        if not np.isfinite(mean).all():
            raise AggregateInvalid(f"the unmasked mean of {self.count} inputs is not finite")
        distance = float(np.linalg.norm(mean))
        if not self.noisy and not distance <= self.max_norm + self.slack * math.sqrt(mean.size):
            raise AggregateInvalid(
                f"the unmasked mean of {self.count} inputs moves {distance:.4g} from the "
                f"global adapter (L2), more than the bound {self.max_norm:g}"
            )
        names = sorted(self.reference)
        base = flatten(self.reference, names)
        shapes = {n: tuple(self.reference[n].shape) for n in names}
        dtypes = {n: str(self.reference[n].dtype) for n in names}
        return unflatten(base + mean, shapes, dtypes)


@dataclass
class SecureState:
    """A secure round's protocol state beside the plain round's."""

    protocol: ServerRound
    names: list[str]
    envelopes: dict[int, str] = field(default_factory=dict)


class SecureJob(FederatedJob):
    """A :class:`~server.app.FederatedJob` whose training rounds aggregate securely."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(self.channel, SealedChannel):
            raise ConfigError("secure aggregation needs the sealed channel", key="protection")
        self.sealed: SealedChannel = self.channel
        self._secure: dict[int, SecureState] = {}

    def training_stages(self) -> list[Stage]:
        return [
            self.admit,
            self.instruct,
            self.advertise,
            self.share,
            self.mask,
            self.check,
            self.unmask,
            self.commit,
        ]

    def _query(self, rnd: int, node_id: int, stage: str, payload: bytes) -> Message:
        content = RecordDict(
            {
                CONFIG_KEY: round_config(rnd),
                SECAGG_KEY: ConfigRecord({SECAGG_STAGE: stage, SECAGG_PAYLOAD: payload}),
            }
        )
        return Message(content, node_id, SECAGG_QUERY, group_id=str(rnd))

    def _failed(self, node_id: int, reply: Message, rnd: int, stage: str) -> None:
        reason = self._declined(node_id, reply, rnd)
        log(WARNING, "[ark] round %d: node %s failed the %s stage: %s", rnd, node_id, stage, reason)

    def advertise(self, state: RoundState) -> None:
        """Stage 1: push the training instructions; each reply is the node's signed keys,
        checked against the key broker's certification and the node's admitted ueid."""
        rnd = state.round
        names = sorted(k for k in state.adapter if is_trained(k, self.spec.lora_mode))
        length = sum(int(np.prod(state.adapter[n].shape)) for n in names)
        protocol = ServerRound(
            self.run_id,
            rnd,
            self.spec.secagg_threshold,
            self.spec.secagg_clip,
            length,
            self.sealed.sandbox.result_key,
            clock=self.sealed.sandbox.clock,
        )
        self._secure[rnd] = SecureState(protocol, names)
        accepted: list[events.SecaggNode] = []
        for node_id, reply in self._call().replies(state.messages):
            if reply.has_error():
                self._failed(node_id, reply, rnd, "advertise")
                continue
            try:
                ueid = protocol.add_advert(node_id, _payload(reply))
                if ueid != self.channel.ueid(node_id):
                    protocol.adverts.pop(node_id)
                    protocol.ueids.pop(node_id)
                    raise SecAggError(f"node {node_id}: keys certified for another TEE")
            except (SecAggError, KeyError, TypeError) as exc:
                log(WARNING, "[ark] round %d: node %s's keys refused: %s", rnd, node_id, exc)
                self._event(events.NodeRefused, node=node_id, reason=str(exc))
                continue
            signer = protocol.adverts[node_id].signer
            accepted.append(
                events.SecaggNode(node=node_id, ueid=ueid, signer_sha256=sha256_hex(signer))
            )
        self._event(events.SecaggAdvertised, round=rnd, nodes=accepted)
        log(INFO, "[ark] round %d: %d nodes advertised keys", rnd, len(accepted))

    def _stage(
        self, state: RoundState, stage: str, requests: dict[int, bytes]
    ) -> list[tuple[int, Message]]:
        """Send each node its ``stage`` request; the replies that are not errors."""
        rnd = state.round
        messages = [self._query(rnd, n, stage, payload) for n, payload in requests.items()]
        good: list[tuple[int, Message]] = []
        call = self._call()
        for node_id, reply in call.replies(messages):
            if reply.has_error():
                self._failed(node_id, reply, rnd, stage)
            else:
                good.append((node_id, reply))
        if call.missing:
            log(WARNING, "[ark] round %d: no %s reply from %s", rnd, stage, sorted(call.missing))
        return good

    def share(self, state: RoundState) -> None:
        """Stage 2: every advertised node gets all advertisements and seals its shares."""
        rnd = state.round
        protocol = self._secure[rnd].protocol
        request = protocol.share_request().to_bytes()
        shared: list[int] = []
        for node_id, reply in self._stage(
            state, STAGE_SHARE, dict.fromkeys(protocol.roster, request)
        ):
            try:
                protocol.add_shares(node_id, _payload(reply))
            except (SecAggError, KeyError, TypeError) as exc:
                log(
                    WARNING,
                    "[ark] round %d: node %s's shares refused: %s",
                    state.round,
                    node_id,
                    exc,
                )
                continue
            shared.append(node_id)
        self._event(events.SecaggStage, round=rnd, stage=STAGE_SHARE, nodes=sorted(shared))

    def mask(self, state: RoundState) -> None:
        """Stage 3: each node that shared gets the shares sealed for it and answers with
        its masked input, sealed to this aggregator like an update; each is folded into
        the sum as it arrives."""
        rnd, training = state.round, state.training
        secure = self._secure[rnd]
        protocol = secure.protocol
        protocol.close_shares()  # SecAggFailed below the threshold
        requests = {n: protocol.mask_request(n).to_bytes() for n in sorted(protocol.bundles)}
        for node_id, reply in self._stage(state, STAGE_MASK, requests):
            key = str(node_id)
            try:
                envelope, _ = self.channel.envelope(reply)
                reported, before, after, loss = _split_metrics(reply)
                spent = reported_spending(reply, self.spec)
                opened = self.channel.open(node_id, reply, rnd, reported)
                if set(opened.tensors) != {MASKED_TENSOR}:
                    raise UpdateRejected("a masked input must be one tensor")
                protocol.add_masked(node_id, opened.tensors[MASKED_TENSOR])
            except (UpdateRejected, SecAggError, KeyError, TypeError, ValueError) as exc:
                training.rejected[key] = f"masked input rejected: {exc}"
                log(
                    WARNING,
                    "[ark] round %d: node %s's masked input rejected: %s",
                    rnd,
                    node_id,
                    exc,
                )
                self._event(
                    events.UpdateRejected,
                    round=rnd,
                    node=node_id,
                    envelope_sha256=events.NO_ENVELOPE,
                    reason=str(exc),
                )
                continue
            finally:
                del reply
            secure.envelopes[node_id] = envelope
            self._spent(rnd, node_id, spent)
            # The count the node reports beside its masked input; its weight is in the sum.
            training.examples[key] = reported
            state.held_out[key] = before
            training.local[key] = after
            training.train_loss[key] = loss
        masked = sorted(secure.envelopes)
        self._event(
            events.SecaggStage,
            round=rnd,
            stage=STAGE_MASK,
            nodes=masked,
            envelopes=[secure.envelopes[n] for n in masked],
        )
        log(INFO, "[ark] round %d: %d masked inputs summed", rnd, len(masked))

    def check(self, state: RoundState) -> None:
        """Stage 4: the survivors sign one split of the round into survivors and dropped
        (the consistency check), when anyone dropped or the mask graph is sparse. With
        fewer survivors than the threshold (overall, or among one node's holders) the
        round fails closed here, before anything is asked."""
        rnd = state.round
        protocol = self._secure[rnd].protocol
        if not protocol.needs_check:  # SecAggFailed below the threshold
            return  # full graph, nobody dropped: survivors reveal seed shares only, unsigned
        payload = protocol.check_request().to_bytes()
        requests = dict.fromkeys(protocol.check_request().survivors, payload)
        for node_id, reply in self._stage(state, STAGE_CHECK, requests):
            try:
                protocol.add_consistency(node_id, _payload(reply))
            except (SecAggError, KeyError, TypeError) as exc:
                log(WARNING, "[ark] round %d: node %s's signature refused: %s", rnd, node_id, exc)
        self._event(
            events.SecaggStage, round=rnd, stage=STAGE_CHECK, nodes=sorted(protocol.signatures)
        )

    def unmask(self, state: RoundState) -> None:
        """Stage 5: with the threshold of signatures, survivors reveal shares and the masks
        come off the sum; with fewer, the round fails closed before anything is asked."""
        rnd, training = state.round, state.training
        secure = self._secure.pop(rnd)
        protocol = secure.protocol
        request = protocol.unmask_request()  # SecAggFailed below the threshold
        # Each survivor's request carries its holders' signatures; in the full graph it is
        # one request for all, encoded once.
        mine = {n: protocol.unmask_request_for(n) for n in request.survivors}
        encoded = {id(r): r.to_bytes() for r in mine.values()}
        requests = {n: encoded[id(r)] for n, r in mine.items()}
        for node_id, reply in self._stage(state, STAGE_UNMASK, requests):
            try:
                protocol.add_reveal(node_id, _payload(reply))
            except (SecAggError, KeyError, TypeError) as exc:
                log(WARNING, "[ark] round %d: node %s's reveal refused: %s", rnd, node_id, exc)
        self._event(
            events.SecaggUnmasked,
            round=rnd,
            survivors=list(request.survivors),
            dropped=list(request.dropped),
            revealed_by=sorted(protocol.reveals),
        )
        sums, weight = protocol.result()
        reference = {n: state.adapter[n] for n in secure.names}
        quantization = protocol.quantization
        magnitude = float(np.abs(sums).max() / weight) if weight > 0 and sums.size else 0.0
        slack = quantization.bound(len(request.survivors), weight, magnitude) if weight > 0 else 0.0
        state.aggregator = SecureSum(
            reference,
            sums,
            weight,
            len(request.survivors),
            self.spec.update_norm_bound,
            self.spec.max_examples_per_update,
            slack,
            noisy=self.spec.client_dp,
        )
        state.accepted = {str(n): secure.envelopes[n] for n in request.survivors}
        training.missing = sorted(set(protocol.shared) - set(request.survivors))
        training.seconds = time.monotonic() - state.started
        log(
            INFO,
            "[ark] round %d: unmasked the sum of %d inputs (%d dropped)",
            rnd,
            len(request.survivors),
            len(request.dropped),
        )
