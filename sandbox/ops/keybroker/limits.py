"""What one client may hold of the key broker, and how much it may make it write.

Key ids are public (every manifest names one), so anyone who reaches the broker can
open sessions and be denied. These limits keep that from becoming a lockout or a log
flood: a client's sessions are capped and it loses its own oldest first; a full table
takes the slot from the key id that holds the most; denials are logged one by one only
up to a budget per window, and the rest are counted into one summary per window.

Pure state with no I/O and no clock of its own: the broker passes ``now`` in.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field

from sandbox.errors import ConfigError

# The client of a call made in this process rather than over gRPC (simulations, tests).
LOCAL_CLIENT = "local"


@dataclass(frozen=True)
class Limits:
    """The broker's flood limits, per client (one IP address; an IPv6 /64) and in all.

    Nodes behind one NAT share one client's limits, so the per-client numbers leave room
    for a site of a few dozen nodes, each holding a session or two for a few seconds.
    """

    # Sessions open at once, all clients together: the table's memory bound.
    open_sessions: int = 10_000
    # Sessions one client holds at once; its next one evicts its oldest.
    sessions_per_client: int = 64
    # Denials logged one by one per client per window; the rest are counted.
    denials_per_client: int = 16
    # Denials logged one by one per window, all clients together (a flood from many
    # addresses); the rest are counted into one summary for the window.
    denials_in_all: int = 256
    window: dt.timedelta = dt.timedelta(seconds=60)

    def __post_init__(self) -> None:
        for name in (
            "open_sessions",
            "sessions_per_client",
            "denials_per_client",
            "denials_in_all",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"must be a positive integer, not {value!r}", key=name)
        if self.sessions_per_client > self.open_sessions:
            raise ConfigError(
                f"{self.sessions_per_client} is more than open_sessions {self.open_sessions}",
                key="sessions_per_client",
            )
        if not isinstance(self.window, dt.timedelta) or self.window <= dt.timedelta(0):
            raise ConfigError(f"must be a positive duration, not {self.window!r}", key="window")


DEFAULT_LIMITS = Limits()


@dataclass
class Session:
    session_id: str
    nonce: bytes
    key_id: str
    expires_at: dt.datetime
    client: str = LOCAL_CLIENT
    used: bool = False


class SessionTable:
    """Open attestation sessions, bounded without ever refusing a new one.

    - A client holding ``sessions_per_client`` loses its own oldest session to its new
      one: a flood from one address churns only that address's sessions.
    - A full table loses the oldest session of the key id holding the most, so a flood
      on one public key id displaces its own sessions; another key id loses one only
      when it holds at least as many.

    Evicting rather than refusing means no one is ever locked out: an honest node's
    session survives as long as it takes the flood to open a cap's worth of new ones,
    and nodes attest within milliseconds of their challenge.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS):
        self.limits = limits
        self._sessions: dict[str, Session] = {}  # in the order they were opened
        self._by_client: dict[str, dict[str, None]] = {}  # ordered sets of session ids
        self._by_key: dict[str, dict[str, None]] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def held_by(self, client: str) -> int:
        return len(self._by_client.get(client, ()))

    def held_for(self, key_id: str) -> int:
        return len(self._by_key.get(key_id, ()))

    def drop_expired(self, now: dt.datetime) -> None:
        """Drop sessions past their expiry, oldest first.

        Sessions are opened with one TTL, so the oldest expires first; a clock that steps
        back only delays this sweep (the broker checks expiry when a session is used).
        """
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if oldest.expires_at > now:
                return
            self._drop(oldest.session_id)

    def add(self, session: Session) -> list[Session]:
        """Open ``session``; return the sessions evicted to make room for it."""
        evicted: list[Session] = []
        own = self._by_client.get(session.client, {})
        if len(own) >= self.limits.sessions_per_client:
            evicted.append(self._drop(next(iter(own))))
        elif len(self._sessions) >= self.limits.open_sessions:
            largest = max(self._by_key.values(), key=len)
            evicted.append(self._drop(next(iter(largest))))
        self._sessions[session.session_id] = session
        self._by_client.setdefault(session.client, {})[session.session_id] = None
        self._by_key.setdefault(session.key_id, {})[session.session_id] = None
        return evicted

    def _drop(self, session_id: str) -> Session:
        session = self._sessions.pop(session_id)
        for index, group in ((self._by_client, session.client), (self._by_key, session.key_id)):
            members = index[group]
            del members[session_id]
            if not members:
                del index[group]
        return session


# The summary window counting every client's denials together.
ALL_CLIENTS = "*"


@dataclass
class DenialWindow:
    """One client's denials (or everyone's, for ``ALL_CLIENTS``) in one fixed window."""

    client: str
    start: dt.datetime
    end: dt.datetime
    logged: int = 0
    suppressed: Counter[str] = field(default_factory=Counter)  # by denial code

    @property
    def suppressed_total(self) -> int:
        return sum(self.suppressed.values())


class DenialBudget:
    """Fixed windows of denials: per client, and for all clients together.

    A window opens at a client's first denial and lasts ``limits.window``. Within it the
    first ``denials_per_client`` denials are logged one by one, as long as fewer than
    ``denials_in_all`` have been in the shared window; further ones are counted by code.
    A window that ends with denials counted is returned once by :meth:`closed`, for the
    broker to log as one summary. The log therefore grows by at most
    ``denials_in_all`` denials (each with its appraisal), ``denials_in_all //
    denials_per_client`` client summaries and one shared summary per window, however
    many addresses a flood comes from.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS):
        self.limits = limits
        self._clients: dict[str, DenialWindow] = {}  # in the order they opened
        self._all: DenialWindow | None = None
        self._closed: list[DenialWindow] = []

    def admit(self, client: str, code: str, now: dt.datetime) -> DenialWindow | None:
        """None if this denial may be logged; otherwise the window it was counted in."""
        self._close(now)
        own = self._clients.get(client)
        if own is None:
            own = self._clients[client] = self._open(client, now)
        if self._all is None:
            self._all = self._open(ALL_CLIENTS, now)
        if own.logged >= self.limits.denials_per_client:
            own.suppressed[code] += 1
            return own
        if self._all.logged >= self.limits.denials_in_all:
            self._all.suppressed[code] += 1
            return self._all
        own.logged += 1
        self._all.logged += 1
        return None

    def closed(self, now: dt.datetime) -> list[DenialWindow]:
        """Windows that ended with denials counted and not logged, once each."""
        self._close(now)
        closed, self._closed = self._closed, []
        return closed

    def close_all(self) -> list[DenialWindow]:
        """Every window still open that has denials counted, closed now (shutdown)."""
        windows = [*self._clients.values(), *([self._all] if self._all else [])]
        self._clients, self._all = {}, None
        return [window for window in windows if window.suppressed]

    def _open(self, client: str, now: dt.datetime) -> DenialWindow:
        return DenialWindow(client, now, now + self.limits.window)

    def _close(self, now: dt.datetime) -> None:
        ended = []
        for client, window in self._clients.items():
            if window.end > now:
                break  # windows open in order and all last as long: the rest are later
            ended.append(client)
        windows = [self._clients.pop(client) for client in ended]
        if self._all is not None and self._all.end <= now:
            windows.append(self._all)
            self._all = None
        self._closed += [window for window in windows if window.suppressed]
