"""Tests for round checkpoints (server.checkpoint) and the run fingerprint that guards them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sandbox.config import MODE_FFA, TASK_CAUSAL_LM, LoraSpec, RunSpec
from sandbox.errors import CheckpointError
from server.checkpoint import STATE_FILE, CheckpointStore, JobState
from server.history import History, RoundRecord, Training
from tests.conftest import make_spec

FINGERPRINT = "f" * 64


def _adapter(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b = rng.normal(size=(8, 4)).astype(np.float32)
    # Values whose bits a lossy round trip would change: -0.0, a subnormal, the extremes.
    f32 = np.finfo(np.float32)
    b[0, :4] = np.array([-0.0, 1e-45, f32.max, f32.tiny], dtype=np.float32)
    return {
        "base_model.model.layer.0.lora_A.weight": rng.normal(size=(4, 8)).astype(np.float32),
        "base_model.model.layer.0.lora_B.weight": b,
        "base_model.model.classifier.bias": rng.normal(size=(3,)).astype(np.float32),
    }


def _state(server_round: int, **changes: Any) -> JobState:
    state = JobState(
        fingerprint=FINGERPRINT,
        round=server_round,
        history=History(
            {
                0: RoundRecord(held_out={"1": {"accuracy": 0.25}}),
                **{
                    r: RoundRecord(
                        held_out={"1": {"accuracy": 1.0 / r}},
                        training=Training(train_loss={"1": 1.0 / r}, missing=[1, 2], seconds=0.5),
                    )
                    for r in range(1, 3)
                },
            }
        ),
        finished=False,
    )
    return dataclasses.replace(state, **changes)


@pytest.fixture
def saved(tmp_path: Path) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save(_state(1), _adapter(1))
    return store


def test_round_trip_is_bitwise_and_keeps_the_state(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    state = _state(2, finished=True)
    adapter = _adapter(2)
    store.save(state, adapter)

    loaded = store.load(FINGERPRINT)
    assert loaded is not None
    got_state, got_adapter = loaded
    assert got_state == state
    assert set(got_adapter) == set(adapter)
    for name, array in adapter.items():
        assert got_adapter[name].dtype == array.dtype
        assert got_adapter[name].shape == array.shape
        assert got_adapter[name].tobytes() == array.tobytes()


def test_fresh_directory_loads_as_none(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path / "never-created").load(FINGERPRINT) is None
    (tmp_path / "empty").mkdir()
    assert CheckpointStore(tmp_path / "empty").load(FINGERPRINT) is None


def test_other_job_fingerprint_is_refused(saved: CheckpointStore) -> None:
    with pytest.raises(CheckpointError, match="different job configuration"):
        saved.load("0" * 64)


def test_tampered_adapter_is_refused(saved: CheckpointStore) -> None:
    path = saved.adapter_path(1)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # inside the last tensor's bytes: still a well-formed safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="digest") as excinfo:
        saved.load(FINGERPRINT)
    assert path.name in str(excinfo.value)


def test_missing_adapter_is_refused(saved: CheckpointStore) -> None:
    saved.adapter_path(1).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        saved.load(FINGERPRINT)


@pytest.mark.parametrize("adapter", ["../outside.safetensors", "/etc/passwd", ""])
def test_adapter_outside_the_directory_is_refused(saved: CheckpointStore, adapter: str) -> None:
    outside = saved.directory.parent / "outside.safetensors"
    outside.write_bytes(saved.adapter_path(1).read_bytes())
    state_file = saved.directory / STATE_FILE
    document = json.loads(state_file.read_text())
    document["adapter"] = adapter
    state_file.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="missing"):
        saved.load(FINGERPRINT)


CORRUPT_STATES = {
    "not-json": b'{"format": "ark-checkpoint/1", "round": ',
    "not-utf8": b"\xff\xfe\x00garbage",
    "json-list": b"[1, 2, 3]",
    "wrong-format": json.dumps({"format": "ark-checkpoint/0", "fingerprint": FINGERPRINT}).encode(),
    "no-format": json.dumps({"fingerprint": FINGERPRINT, "round": 1}).encode(),
}


@pytest.mark.parametrize("content", CORRUPT_STATES.values(), ids=CORRUPT_STATES.keys())
def test_corrupt_state_file_is_refused(saved: CheckpointStore, content: bytes) -> None:
    state_file = saved.directory / STATE_FILE
    state_file.write_bytes(content)
    with pytest.raises(CheckpointError) as excinfo:
        saved.load(FINGERPRINT)
    assert str(state_file) in str(excinfo.value)


MALFORMED_FIELDS = {
    "round-missing": {"round": None},
    "round-not-a-number": {"round": "one"},
    "history-a-list": {"history": [1, 2]},
    "history-a-string": {"history": "not a mapping"},
    "history-unknown-round-key": {"history": {"rounds": {"1": {"loss": 1.0}}}},
    "history-half-a-training": {"history": {"rounds": {"1": {"local": {}, "seconds": 1.0}}}},
    "history-round-not-a-number": {"history": {"rounds": {"one": {}}}},
    "history-files-a-list": {"history_files": ["a" * 64]},
    "history-file-round-not-a-number": {"history_files": {"one": "a" * 64}},
    "history-file-digest-not-sha256": {"history_files": {"1": "0" * 63}},
    "history-file-round-not-ascii-digits": {"history_files": {"\uff11": "0" * 64}},
    # "01" and "1" would both be round 1, and one of the two files would go unchecked
    "history-file-round-not-canonical": {"history_files": {"01": "0" * 64}},
}


@pytest.mark.parametrize("changes", MALFORMED_FIELDS.values(), ids=MALFORMED_FIELDS.keys())
def test_malformed_state_fields_are_refused(
    saved: CheckpointStore, changes: dict[str, Any]
) -> None:
    state_file = saved.directory / STATE_FILE
    document = json.loads(state_file.read_text())
    for key, value in changes.items():
        if value is None:
            del document[key]
        else:
            document[key] = value
    state_file.write_text(json.dumps(document))
    with pytest.raises(CheckpointError):
        saved.load(FINGERPRINT)


# A history as checkpoints have always written it: round 0 holds only the initial
# adapter's held-out metrics; a trained round its training, then (once the next round
# or the final evaluation reported them) its adapter's held-out metrics.
LEGACY_HISTORY: dict[str, Any] = {
    "rounds": {
        "0": {"global": {"1": {"accuracy": 0.5, "macro_f1": 0.4}, "2": {"accuracy": 0.6}}},
        "1": {
            "local": {"1": {"accuracy": 0.7, "macro_f1": 0.45}},
            "train_loss": {"1": 0.9, "2": float("nan")},
            "rejected": {"3": "node error: clientapp-error"},
            "examples": {"1": 10.0, "2": 30.0},
            "missing": [4],
            "seconds": 1.25,
            "global": {"2": {"accuracy": 0.65}, "1": {"accuracy": 0.75}},
        },
        "2": {
            "local": {},
            "train_loss": {},
            "rejected": {},
            "examples": {"1": 10.0},
            "missing": [],
            "seconds": 0.5,
        },
    }
}


def test_the_typed_history_reads_and_writes_the_checkpoint_json_unchanged(
    tmp_path: Path,
) -> None:
    history = History.from_json(json.loads(json.dumps(LEGACY_HISTORY)))
    assert json.dumps(history.to_json()) == json.dumps(LEGACY_HISTORY)
    assert history.rounds[0].training is None
    training = history.rounds[1].training
    assert training is not None
    assert (training.examples, training.missing, training.seconds) == (
        {"1": 10.0, "2": 30.0},
        [4],
        1.25,
    )
    assert history.held_out(2) == {}

    # Saved at round 2, rounds 0 and 1 are final: each goes to its own file in the same
    # JSON, and state.json keeps round 2 only; read back, the history is whole again.
    store = CheckpointStore(tmp_path / "checkpoints")
    state = _state(2, history=history)
    store.save(state, _adapter(2))
    written = json.loads((store.directory / STATE_FILE).read_text())
    assert json.dumps(written["history"]) == json.dumps(
        {"rounds": {"2": LEGACY_HISTORY["rounds"]["2"]}}
    )
    for rnd in ("0", "1"):
        archived = json.loads(store.history_path(int(rnd)).read_text())
        assert json.dumps(archived) == json.dumps(LEGACY_HISTORY["rounds"][rnd])
    assert sorted(written["history_files"]) == ["0", "1"]
    assert json.dumps(store.history(state).to_json()) == json.dumps(LEGACY_HISTORY)
    loaded = store.load(FINGERPRINT)
    assert loaded is not None
    assert json.dumps(store.history(loaded[0]).to_json()) == json.dumps(LEGACY_HISTORY)


def test_a_rounds_records_leave_memory_once_the_next_round_commits(tmp_path: Path) -> None:
    """What the job holds of its history is the open rounds only, at any number of rounds:
    each earlier round is in its own file, named with its digest in the state."""
    store = CheckpointStore(tmp_path / "checkpoints")
    state = JobState(fingerprint=FINGERPRINT, round=0)
    state.history.round(0).held_out["1"] = {"accuracy": 0.5}
    store.save(state, _adapter(0))
    for rnd in range(1, 6):
        state.history.round(rnd - 1).held_out["2"] = {"accuracy": 0.5 + rnd / 100}
        state.history.round(rnd).training = Training(train_loss={"1": 1.0 / rnd})
        state.round = rnd
        store.save(state, _adapter(rnd))
        assert set(state.history.rounds) == {rnd}
        assert set(state.archived) == set(range(rnd))
    whole = store.history(state)
    assert sorted(whole.rounds) == list(range(6))
    assert whole.held_out(4) == {"2": {"accuracy": 0.55}}
    assert whole.held_out(0) == {"1": {"accuracy": 0.5}, "2": {"accuracy": 0.51}}


def test_a_state_from_before_archiving_resumes_and_archives_at_its_next_save(
    tmp_path: Path,
) -> None:
    """A state.json that holds every round inline (no history_files) loads as it is."""
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save(_state(1), _adapter(1))  # rounds 1 and 2 in memory, none before round 1
    state_file = store.directory / STATE_FILE
    document = json.loads(state_file.read_text())
    document.pop("history_files")
    document["history"] = LEGACY_HISTORY
    state_file.write_text(json.dumps(document))
    loaded = store.load(FINGERPRINT)
    assert loaded is not None
    state = loaded[0]
    assert state.archived == {}
    assert json.dumps(store.history(state).to_json()) == json.dumps(LEGACY_HISTORY)
    state.round = 2
    store.save(state, _adapter(2))
    assert set(state.archived) == {0, 1}
    assert json.dumps(store.history(state).to_json()) == json.dumps(LEGACY_HISTORY)


@pytest.mark.parametrize("damage", ["changed", "missing", "not-json"])
def test_a_damaged_history_file_is_refused_naming_it(tmp_path: Path, damage: str) -> None:
    """When the job resumes (load), and when the results are built (history)."""
    store = CheckpointStore(tmp_path / "checkpoints")
    state = _state(2)
    store.save(state, _adapter(2))
    path = store.history_path(1)
    if damage == "changed":  # still well-formed JSON: only its digest tells
        path.write_text(path.read_text().replace("0.5", "0.9"))
    elif damage == "missing":
        path.unlink()
    else:
        path.write_bytes(b"{")
    for read in (lambda: store.load(FINGERPRINT), lambda: store.history(state)):
        with pytest.raises(CheckpointError) as excinfo:
            read()
        assert path.name in str(excinfo.value)
        assert damage == "missing" or "digest does not match" in str(excinfo.value)


INCONSISTENT_ARCHIVES: dict[str, tuple[dict[str, Any], str]] = {
    # round 1 inline again (as empty records) beside its archived file
    "inline-and-archived": (
        {"history": {"rounds": {"1": {}, "2": {}}}},
        "both inline and archived",
    ),
    # a file named for the state's own round, whose records are still open
    "archived-not-below-the-round": (
        {"history": {"rounds": {}}, "history_files": {"0": "0" * 64, "1": "0" * 64, "2": "0" * 64}},
        "archived round 2 is not below round 2",
    ),
    # a state at round 0 has nothing final yet
    "archived-at-round-0": (
        {"round": 0, "history": {"rounds": {}}, "history_files": {"0": "0" * 64}},
        "archived round 0 is not below round 0",
    ),
    # an entry deleted from history_files: its round would read back empty
    "round-in-neither": ({"history_files": {"1": None}}, "round 1's records are neither"),
}


@pytest.mark.parametrize(
    ("changes", "message"), INCONSISTENT_ARCHIVES.values(), ids=INCONSISTENT_ARCHIVES.keys()
)
def test_a_state_whose_rounds_do_not_add_up_is_refused(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save(_state(2), _adapter(2))
    state_file = store.directory / STATE_FILE
    document = json.loads(state_file.read_text())
    for key, value in changes.items():
        if key == "history_files" and None in value.values():
            document[key] = {k: v for k, v in document[key].items() if k not in value}
        else:
            document[key] = value
    state_file.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match=message) as excinfo:
        store.load(FINGERPRINT)
    assert str(state_file) in str(excinfo.value)


def test_records_made_again_for_an_archived_round_are_refused_not_saved(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    state = _state(2)
    store.save(state, _adapter(2))
    archived = store.history_path(1).read_bytes()
    state.history.round(1).held_out["9"] = {"accuracy": 0.0}  # would shadow the archived one
    with pytest.raises(CheckpointError, match="round 1's records were archived already"):
        store.save(state, _adapter(2))
    assert store.history_path(1).read_bytes() == archived


def test_later_round_leaves_earlier_adapter_untouched(saved: CheckpointStore) -> None:
    first = saved.adapter_path(1)
    before = first.read_bytes()
    saved.save(_state(2), _adapter(2))

    assert first.read_bytes() == before
    assert saved.adapter_path(2).is_file()
    loaded = saved.load(FINGERPRINT)
    assert loaded is not None
    state, adapter = loaded
    assert state.round == 2
    for name, array in _adapter(2).items():
        assert adapter[name].tobytes() == array.tobytes()
    # No temporary files are left behind by the atomic writes.
    assert sorted(p.name for p in saved.directory.iterdir()) == [
        "history-0000.json",
        "history-0001.json",
        "round-0001.safetensors",
        "round-0002.safetensors",
        STATE_FILE,
    ]


BASE_SPEC = make_spec(Path("/models/tiny"), labels=("a", "b", "c"))

IDENTITY_CHANGES: dict[str, dict[str, Any]] = {
    "labels": {"labels": ("a", "b", "d")},
    "label-order": {"labels": ("b", "a", "c")},
    "model": {"model_path": Path("/models/other")},
    "task": {"task": TASK_CAUSAL_LM, "labels": ()},
    "mode": {"mode": MODE_FFA},
    "lora-r": {"lora": LoraSpec(r=8, alpha=8)},
    "lora-alpha": {"lora": LoraSpec(r=4, alpha=16)},
    "lora-targets": {"lora": LoraSpec(r=4, alpha=8, target_modules=("query",))},
}
VOLATILE_CHANGES: dict[str, dict[str, Any]] = {
    "num-rounds": {"num_rounds": 50},
    "round-timeout": {"round_timeout": 5.0},
    "min-nodes": {"min_nodes": 7},
    "output-dir": {"output_dir": Path("/elsewhere")},
}


@pytest.mark.parametrize("changes", IDENTITY_CHANGES.values(), ids=IDENTITY_CHANGES.keys())
def test_fingerprint_changes_with_job_identity(changes: dict[str, Any]) -> None:
    changed: RunSpec = dataclasses.replace(BASE_SPEC, **changes)
    assert changed.fingerprint() != BASE_SPEC.fingerprint()


@pytest.mark.parametrize("changes", VOLATILE_CHANGES.values(), ids=VOLATILE_CHANGES.keys())
def test_fingerprint_ignores_settings_a_resumed_job_may_change(changes: dict[str, Any]) -> None:
    changed: RunSpec = dataclasses.replace(BASE_SPEC, **changes)
    assert changed.fingerprint() == BASE_SPEC.fingerprint()


def test_fingerprint_is_a_stable_sha256() -> None:
    again = make_spec(Path("/models/tiny"), labels=("a", "b", "c"))
    assert again.fingerprint() == BASE_SPEC.fingerprint()
    assert len(BASE_SPEC.fingerprint()) == 64
    int(BASE_SPEC.fingerprint(), 16)
