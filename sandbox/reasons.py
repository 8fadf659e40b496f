"""The closed vocabulary of reasons a node's error reply may give: fixed codes, fixed text.

What leaves a node when it does not answer an instruction is one of these codes with
its label as the reason, nothing from the app or its data (a metric name, an exception
class or message could carry a private row). The detail stays in the node's own log
and journal. The ServerApp maps whatever arrives (a hostile node can send anything)
back into this vocabulary and stores only the label; a code or reason outside it
becomes ``unrecognized``.

Flower's own error codes are in the vocabulary by their code alone: Flower's runtime
sets them with a reason of its own making, which may quote an app's exception, so that
text is dropped.
"""

from __future__ import annotations

import enum

from flwr.app import Error
from flwr.common.constant import ErrorCode

# Ark's codes start above Flower's ErrorCode values, so the two never collide.
ARK_CODES = 1000


class NodeReason(enum.IntEnum):
    """Why a node answered with an error: the code, and its label (the name, kebab case)."""

    # Set by Flower's runtime (the SuperNode, the SuperLink) outside Ark's control.
    FLOWER_UNKNOWN = ErrorCode.UNKNOWN
    FLOWER_CLIENTAPP_LOAD_FAILED = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
    FLOWER_CLIENTAPP_RAISED = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    FLOWER_MESSAGE_UNAVAILABLE = ErrorCode.MESSAGE_UNAVAILABLE
    FLOWER_REPLY_UNAVAILABLE = ErrorCode.REPLY_MESSAGE_UNAVAILABLE
    FLOWER_NODE_UNAVAILABLE = ErrorCode.NODE_UNAVAILABLE
    FLOWER_MOD_FAILED_PRECONDITION = ErrorCode.MOD_FAILED_PRECONDITION
    FLOWER_INVALID_FAB = ErrorCode.INVALID_FAB
    FLOWER_CLIENTAPP_CRASHED = ErrorCode.CLIENT_APP_CRASHED
    # Sent by the node's egress guard (clients/egress.py) and launcher (sandbox/launcher.py).
    EGRESS_BLOCKED = ARK_CODES + 1
    REPLY_METADATA_ALTERED = ARK_CODES + 2
    NODE_CONFIG_UNUSABLE = ARK_CODES + 3
    CLIENTAPP_FAILED = ARK_CODES + 4
    CLIENTAPP_ERROR = ARK_CODES + 5
    AGGREGATOR_REFUSED = ARK_CODES + 6
    ATTESTATION_FAILED = ARK_CODES + 7
    KEY_RELEASE_DENIED = ARK_CODES + 8
    KEY_BROKER_UNAVAILABLE = ARK_CODES + 9
    APP_NOT_APPROVED = ARK_CODES + 10
    # The ClientApp could not reach the node's sandbox process (not running, restarting).
    SANDBOX_UNAVAILABLE = ARK_CODES + 11
    # The node's differential-privacy budget: the run asked for a looser one, or this round
    # would pass it (sandbox/privacy.py).
    PRIVACY_BUDGET_REFUSED = ARK_CODES + 12
    PRIVACY_BUDGET_EXHAUSTED = ARK_CODES + 13
    # The ServerApp's name for anything outside the vocabulary; no node sends it.
    UNRECOGNIZED = -1

    @property
    def label(self) -> str:
        """The fixed text that goes with the code, e.g. ``egress-blocked``."""
        return self.name.lower().replace("_", "-")

    def error(self) -> Error:
        """The Flower Error a node sends for this reason: the code and the label only."""
        return Error(code=self.value, reason=self.label)

    @classmethod
    def from_label(cls, label: str) -> NodeReason:
        """The Ark reason whose label is ``label``; anything else is ``unrecognized``."""
        for reason in cls:
            if reason.value >= ARK_CODES and reason.label == label:
                return reason
        return cls.UNRECOGNIZED

    @classmethod
    def of(cls, error: Error) -> NodeReason:
        """What a received error means in the vocabulary; its text is never kept.

        An Ark code counts only with its own label as the reason (anything else was not
        sent by a conforming node); a Flower code counts whatever Flower's text says.
        """
        try:
            reason = cls(error.code)
        except (TypeError, ValueError):
            return cls.UNRECOGNIZED
        if reason.value < ARK_CODES or error.reason == reason.label:
            return reason
        return cls.UNRECOGNIZED
