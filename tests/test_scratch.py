"""The ServerApp's scratch store: per-node records on disk, in a private folder, removed."""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sandbox.channel import DOWNLINK, STAGE_TRAIN, ChannelContext, open_sealed, seal_tensors
from sandbox.errors import ConfigError
from sandbox.seal.envelope import SUITE_MLKEM768_X25519, SUITE_X25519, RecipientKey
from server import scratch
from server.sandbox import NodePeer, PeerTable
from server.scratch import LOCK_FILE, PAGE_ROWS, PREFIX, ScratchMap, json_text, use_folder


def _peer(node_id: int, suite: str = SUITE_X25519) -> tuple[NodePeer, RecipientKey]:
    key = RecipientKey.generate(suite)
    nonce = bytes([node_id % 256]) * 32
    peer = NodePeer(node_id, nonce, None, key.public_bytes, suite, f"ueid:{node_id}", "ab" * 32)
    return peer, key


@pytest.fixture
def table(scratch_root: Path) -> PeerTable:
    return PeerTable()


@pytest.mark.parametrize("suite", [SUITE_X25519, SUITE_MLKEM768_X25519])
def test_a_peer_read_back_is_the_one_kept_and_its_key_seals_to_the_node(
    table: PeerTable, suite: str
) -> None:
    big = 2**64 - 7  # Flower's node ids are unsigned 64-bit
    peer, key = _peer(big, suite)
    table.add(peer)
    back = table[big]
    assert (back.node_id, back.nonce, back.key_bytes, back.suite, back.ueid, back.ear_sha256) == (
        big,
        peer.nonce,
        peer.key_bytes,
        suite,
        f"ueid:{big}",
        "ab" * 32,
    )
    # The key loaded from the row is the node's: what is sealed to it opens with its secret.
    context = ChannelContext("1", 1, str(big), "m" * 64, DOWNLINK, STAGE_TRAIN)
    tensors = {"w": np.arange(4, dtype=np.float32)}
    blob = seal_tensors(tensors, back.public_key, context, suite=suite)
    opened, _ = open_sealed(blob, key.private_key, context, suite=suite)
    assert np.array_equal(opened["w"], tensors["w"])
    assert big in table
    assert 8 not in table
    assert len(table) == 1
    assert table.get(8) is None
    with pytest.raises(KeyError):
        table[8]


def test_a_channel_key_is_held_by_one_node_and_a_node_is_replaced_not_doubled(
    table: PeerTable,
) -> None:
    first, _ = _peer(1)
    table.add(first)
    assert table.holder(first.key_bytes) == 1
    assert table.holder(b"\x00" * 32) is None
    # A second node with the first one's key: refused by the table itself, nothing kept.
    thief = NodePeer(2, b"n" * 32, None, first.key_bytes, SUITE_X25519, "ueid:2", "cd" * 32)
    with pytest.raises(sqlite3.IntegrityError):
        table.add(thief)
    assert 2 not in table
    assert table.holder(first.key_bytes) == 1
    # The same node shaking hands again with a new key: one row, the new key.
    again, _ = _peer(1)
    table.add(again)
    assert len(table) == 1
    assert table[1].key_bytes == again.key_bytes
    assert table.holder(first.key_bytes) is None
    table.discard(1)
    assert len(table) == 0
    table.discard(1)  # nothing to drop: no error


def test_the_store_is_private_and_removed_when_closed(tmp_path: Path, table: PeerTable) -> None:
    (folder,) = tmp_path.iterdir()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    table.add(_peer(3)[0])
    table.close()
    table.close()  # once is enough; again does nothing
    assert not any(tmp_path.iterdir())
    with pytest.raises(sqlite3.ProgrammingError):
        3 in table  # noqa: B015 - the closed table refuses to answer


def test_a_scratch_map_reads_back_what_a_dict_would_in_the_same_order() -> None:
    """Against a dict fed the same operations: items, order, overwrite in place, delete,
    NaN, nested values, and iteration across more than one page of rows."""
    ours, theirs = ScratchMap(), dict[str, Any]()
    for i in range(PAGE_ROWS * 2 + 3):
        for mapping in (ours, theirs):
            mapping[f"node-{i}"] = {"accuracy": i / 7, "loss": [i, -i]}
    for mapping in (ours, theirs):
        mapping["node-5"] = "rejected: ticket"  # overwritten: keeps its place
        del mapping["node-9"]
        mapping["late"] = float("nan")
    assert list(ours) == list(theirs)
    assert len(ours) == len(theirs) == PAGE_ROWS * 2 + 3
    assert ours["node-5"] == "rejected: ticket"
    assert ours["node-300"] == theirs["node-300"]
    assert math.isnan(ours["late"])
    assert {k: v for k, v in ours.items() if k != "late"} == {
        k: v for k, v in theirs.items() if k != "late"
    }
    with pytest.raises(KeyError):
        ours["node-9"]
    with pytest.raises(KeyError):
        del ours["node-9"]
    with pytest.raises(TypeError, match="text"):
        ours[7] = 1.0  # type: ignore[index]
    copy = ours["node-1"]
    copy["accuracy"] = 99.0
    assert ours["node-1"]["accuracy"] == 1 / 7, "a value read is a copy"
    assert ScratchMap({"a": 1}) == {"a": 1}
    assert ScratchMap([("b", 2.5)]) == {"b": 2.5}


def test_a_scratch_map_holds_no_memory_per_item_and_drops_its_table_when_collected() -> None:
    """What the process holds for a map of 5,000 nodes' metrics is what it holds for one."""
    from pympler import asizeof

    small, large = ScratchMap({"n": {"accuracy": 0.5}}), ScratchMap()
    for i in range(5000):
        large[f"node-{i}"] = {"accuracy": 0.5, "loss": 1.25}
    sized: Callable[[Any], int] = asizeof.asizeof  # pympler ships no annotations
    assert sized(large) == sized(small)
    table = large._table
    db = large._db
    del large
    gc.collect()
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
    assert table not in tables
    assert small._table in tables


@pytest.mark.parametrize(
    "value",
    [
        {},
        [],
        {"rounds": {"1": {"local": {}, "missing": [], "seconds": 0.5}}},
        {"a": [1, [2, []], {"b": None}], "é": "ünïcode", "n": float("nan"), "t": True},
        [{"x": -1e300}, "s", 3, None, (4, 5)],
        "text",
        7.25,
    ],
)
def test_json_text_writes_what_json_dumps_writes(value: Any) -> None:
    assert "".join(json_text(value)) == json.dumps(value, indent=2)


def test_json_text_writes_a_scratch_map_as_the_dict_it_holds() -> None:
    """A checkpoint written from disk-backed maps is the file the same dicts would make."""
    nodes = {f"{i}": {"accuracy": i / 3, "loss": float("inf")} for i in range(PAGE_ROWS + 5)}
    document = {"weights": ScratchMap({"u": 2.0}), "history": {"local": ScratchMap(nodes)}}
    plain = {"weights": {"u": 2.0}, "history": {"local": nodes}}
    assert "".join(json_text(document)) == json.dumps(plain, indent=2)
    with pytest.raises(TypeError, match="text"):
        "".join(json_text({1: "a"}))


def test_a_scratch_map_keeps_any_text_key_and_answers_other_keys_as_a_dict_would() -> None:
    """A key with a lone surrogate (a ueid from a node's evidence may hold one) goes in and
    comes back; a key that is not text is simply absent, as from a dict of text keys."""
    odd = "ueid:\ud800-tee"
    mapping = ScratchMap({odd: 7})
    assert list(mapping) == [odd]
    assert mapping[odd] == 7
    assert dict(mapping.items()) == {odd: 7}
    number: Any = 7
    assert number not in mapping
    assert mapping.get(number) is None
    with pytest.raises(KeyError):
        del mapping[number]


def test_a_peer_with_an_odd_ueid_is_kept_and_a_refused_add_keeps_the_earlier_peer(
    table: PeerTable,
) -> None:
    first, _ = _peer(1)
    table.add(dataclasses.replace(first, ueid="ueid:\udfff"))
    assert table[1].ueid == "ueid:\udfff"
    other, _ = _peer(2)
    table.add(other)
    # Node 1 shaking hands again with node 2's key: refused, and node 1 keeps its peer.
    with pytest.raises(sqlite3.IntegrityError):
        table.add(dataclasses.replace(first, key_bytes=other.key_bytes))
    assert table[1].key_bytes == first.key_bytes


def test_a_forked_child_leaves_its_parents_maps_alone() -> None:
    """A child that collects its copy of a map drops nothing of the parent's, and makes
    its own store for maps of its own."""
    kept = ScratchMap({"n": 1})
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            del kept
            gc.collect()
            own = ScratchMap({"c": 2})
            code = 0 if own["c"] == 2 and own._store.pid == os.getpid() else 1
            own._store.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert kept == {"n": 1}


def test_a_jobs_folder_loses_what_dead_processes_left_and_keeps_the_living(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ServerApp killed before its exit handlers ran leaves its stores in the job's
    folder: the next one removes those whose lock no one holds, and leaves alone a live
    store (this process's own), a folder that is no store, and the folder's other files;
    its own new stores go there."""
    monkeypatch.setattr(scratch, "_root", None)  # both restored after the test
    monkeypatch.setattr(scratch, "_shared", None)
    folder = tmp_path / "scratch"
    folder.mkdir(mode=0o700)
    left = folder / f"{PREFIX}4000000-abc"  # a dead process's: its lock is free
    left.mkdir()
    (left / LOCK_FILE).write_text("")
    (left / "records.sqlite").write_bytes(b"x" * 100)
    not_ours = folder / f"{PREFIX}1-nolock"
    not_ours.mkdir()
    other = folder / "notes.txt"
    other.write_text("{}")
    monkeypatch.setattr(scratch, "_root", folder)
    live = scratch.Scratch([])  # holds its lock, as a running ServerApp's store does
    use_folder(folder)
    assert not left.exists()
    assert live.folder.exists()
    assert not_ours.exists()
    assert other.exists()
    made = ScratchMap({"a": 1})
    assert made._store.folder.parent == folder
    live.close()
    assert not live.folder.exists()


@pytest.mark.parametrize("kind", ["open to others", "a symlink"])
def test_a_scratch_folder_others_could_reach_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.setattr(scratch, "_root", None)
    monkeypatch.setattr(scratch, "_shared", None)
    folder = tmp_path / "scratch"
    if kind == "a symlink":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        folder.symlink_to(elsewhere)
    else:
        folder.mkdir()
        folder.chmod(0o770)
    with pytest.raises(ConfigError, match="mode 0700") as refused:
        use_folder(folder)
    assert refused.value.key == "output-dir"
    assert scratch._root is None
