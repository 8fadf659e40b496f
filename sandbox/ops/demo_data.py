"""Synthetic maintenance tickets from regional power-grid operators, for demos and tests.

All data here is SYNTHETIC. It is invented by this module from templates and a seeded
random generator, and describes no real operator, asset, place or person. It stands in for
an enterprise's private data so that a federation can be shown end to end without any.

Each node is one regional operator, and the data is non-IID the way a real federation is:
every region has its own label mix (two labels make up about 70 % of its tickets) and its
own vocabulary (weather, terrain, place names). The words that decide a label are shared by
all regions, so a model trained on the union generalises and region words are only flavour.
Some tickets describe a vague symptom, and some mention another label's equipment, so a
good classifier lands around 80-95 % rather than 100 %.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from sandbox.config import TASK_CAUSAL_LM, TASK_CLASSIFICATION
from sandbox.errors import ConfigError

DEMO_LABELS: tuple[str, ...] = (
    "vegetation",
    "transformer",
    "line-fault",
    "metering",
    "substation-scada",
)
# Node names in order; more nodes than regions reuse the profiles as "alpine-2", ...
_REGION_ORDER: tuple[str, ...] = ("alpine", "coastal", "desert", "plains", "forest", "urban")
DEMO_NODES: tuple[str, ...] = _REGION_ORDER[:3]

MIN_WORDS = 12
MAX_WORDS = 40
# Shares of the tickets, in percent, that blur the label (see the module docstring).
_VAGUE_PERCENT = 12
_DISTRACTOR_PERCENT = 12


@dataclass(frozen=True)
class _LabelVocab:
    """Words that mark one label in every region."""

    findings: tuple[str, ...]
    actions: tuple[str, ...]
    mention: str
    asset_prefix: str


@dataclass(frozen=True)
class _Region:
    """One operator's label mix (percent per label, in DEMO_LABELS order) and vocabulary."""

    mix: tuple[int, int, int, int, int]
    flavour: tuple[str, ...]
    places: tuple[str, ...]


_VOCAB: dict[str, _LabelVocab] = {
    "vegetation": _LabelVocab(
        findings=(
            "tree branches touching the conductor",
            "overgrown brush in the right-of-way",
            "fallen tree leaning on the span",
            "vines climbing the pole and guy wire",
            "tree clearance below the minimum distance",
            "dead tree at risk of falling onto the line",
            "hedge grown into the service drop",
        ),
        actions=("Trim crew requested.", "Tree crew scheduled.", "Clearance work order raised."),
        mention="the trees along the line",
        asset_prefix="P",
    ),
    "transformer": _LabelVocab(
        findings=(
            "oil leak from the pole-top transformer",
            "transformer humming loudly and running hot",
            "cracked bushing on the distribution transformer",
            "transformer tank bulging with an oil temperature alarm",
            "tap changer on the transformer stuck",
            "transformer fuse blown twice this week",
        ),
        actions=(
            "Transformer swap ordered.",
            "Oil sample taken for lab.",
            "Mobile unit on standby.",
        ),
        mention="the transformer",
        asset_prefix="TX",
    ),
    "line-fault": _LabelVocab(
        findings=(
            "conductor down across the road",
            "recloser locked out after a phase-to-ground fault",
            "broken insulator caused a flashover",
            "fault indicator lit and the line tripped",
            "sagging conductor with burn marks after a fault",
            "jumper burned open at the dead-end",
        ),
        actions=(
            "Line crew dispatched for repair.",
            "Section isolated, fault located.",
            "Conductor splice needed.",
        ),
        mention="the recloser",
        asset_prefix="SEG",
    ),
    "metering": _LabelVocab(
        findings=(
            "smart meter not reporting readings",
            "meter register does not match billed usage",
            "meter seal broken, possible tampering",
            "AMI collector offline and meters missing reads",
            "customer disputes the meter reading on the bill",
            "CT meter wiring found reversed",
        ),
        actions=("Meter exchange booked.", "Billing team notified.", "Manual read requested."),
        mention="the customer meter",
        asset_prefix="MTR",
    ),
    "substation-scada": _LabelVocab(
        findings=(
            "RTU lost communication with the SCADA master",
            "breaker status mismatch between SCADA and field",
            "protection relay alarm in the substation control house",
            "battery charger fault at the substation raised a SCADA alarm",
            "HMI showing stale telemetry for the bus",
            "SCADA points frozen after a firmware update",
        ),
        actions=("Relay technician assigned.", "SCADA engineer paged.", "Telemetry check queued."),
        mention="the SCADA alarms",
        asset_prefix="RTU",
    ),
}

_ASSET_PREFIXES = tuple(vocab.asset_prefix for vocab in _VOCAB.values())

_REGIONS: dict[str, _Region] = {
    # Mix order: vegetation, transformer, line-fault, metering, substation-scada.
    "alpine": _Region(
        mix=(30, 10, 40, 10, 10),
        flavour=(
            "Heavy snow load on the span.",
            "Ice build-up overnight at -12 °C.",
            "Access road in the avalanche zone is closed.",
            "Pylon on the ridge, snowcat access only.",
            "Freezing fog since dawn.",
            "Ski lift operator called it in.",
        ),
        places=("Hochalm", "Passo Nero", "Gletschtal", "Alpe Rossa"),
    ),
    "coastal": _Region(
        mix=(10, 30, 10, 10, 40),
        flavour=(
            "Salt spray crust on all hardware.",
            "Heavy corrosion on the cross-arm.",
            "Storm surge flooded the access road.",
            "Gull nests on the structure again.",
            "Sea fog, visibility low.",
            "Site is next to the harbour breakwater.",
        ),
        places=("Harbour Road", "Cliffside", "Dune Lane", "Pier 7"),
    ),
    "desert": _Region(
        mix=(10, 40, 10, 30, 10),
        flavour=(
            "Ambient heat 47 °C at noon.",
            "Dust storm passed overnight.",
            "Sand abrasion visible on housings.",
            "Next to the solar inverter station.",
            "Flash flood wash across the access track.",
            "Crew carrying extra water in the heat.",
        ),
        places=("Mesa Flats", "Dry Creek", "Sunbelt Park", "Red Wash"),
    ),
    "plains": _Region(
        mix=(10, 10, 30, 40, 10),
        flavour=(
            "Hail damage reported in the area.",
            "High winds across the open prairie.",
            "Tornado watch in effect.",
            "Field access muddy after rain.",
            "Site is near the grain elevator.",
            "Irrigation pivot runs close by.",
        ),
        places=("Millerton", "Grain Road", "Prairie Junction", "Oakfield"),
    ),
    "forest": _Region(
        mix=(40, 10, 30, 10, 10),
        flavour=(
            "Wildfire smoke in the valley.",
            "Logging road access only.",
            "Bark beetle kill across the slope.",
            "Remote trail, crew hiking in.",
            "Thick pine needle litter everywhere.",
            "Elk herd near the access gate.",
        ),
        places=("Pine Hollow", "Timber Ridge", "Fernbrook", "Cedar Gap"),
    ),
    "urban": _Region(
        mix=(10, 10, 10, 30, 40),
        flavour=(
            "Traffic control needed downtown.",
            "Underground vault, confined space permit.",
            "High-rise construction next door.",
            "Street closed for a festival.",
            "Tram overhead line runs nearby.",
            "Night work only under noise rules.",
        ),
        places=("Central Station", "Market Street", "Dockside", "Old Town"),
    ),
}

_OPENERS = (
    "Crew reports",
    "Patrol found",
    "Line tech notes",
    "Control room logged",
    "Customer call:",
    "Inspection found",
    "Dispatcher ticket:",
)
_GENERIC_ACTIONS = (
    "Crew dispatched.",
    "Follow-up scheduled.",
    "Priority 2, next business day.",
    "Photos attached to ticket.",
    "Awaiting parts.",
)
# Symptoms any label can produce; such a ticket is only guessable from the region's mix.
_SYMPTOMS = (
    "customers report a short outage",
    "lights flickering along the street",
    "loud bang heard, then power out",
    "low voltage complaints from several customers",
    "alarm received, cause unclear",
    "intermittent supply problems since yesterday",
)
_DISTRACTORS = (
    "Also checked {m}, no issue found.",
    "Caller first blamed {m}.",
    "Inspected {m} too, looks fine.",
)


def node_names(n_nodes: int) -> list[str]:
    """Return the names of the first ``n_nodes`` demo nodes, one region each."""
    if n_nodes < 1:
        raise ConfigError(f"need at least 1 node, got {n_nodes}", key="nodes")
    names = []
    for i in range(n_nodes):
        region = _REGION_ORDER[i % len(_REGION_ORDER)]
        lap = i // len(_REGION_ORDER)
        names.append(region if lap == 0 else f"{region}-{lap + 1}")
    return names


def generate_node_rows(node: str, n_rows: int, *, seed: int) -> list[dict[str, str]]:
    """Generate ``n_rows`` synthetic tickets ``{"text", "label"}`` for one node.

    The label counts follow the region's mix exactly (every label at least once, so the
    union of all nodes has every label); their order and wording come from ``seed``.
    """
    region = _region_of(node)
    if n_rows < len(DEMO_LABELS):
        raise ConfigError(
            f"need at least {len(DEMO_LABELS)} rows per node so every label appears, got {n_rows}",
            key="rows-per-node",
        )
    # A string seed is hashed with SHA-512, so it does not depend on PYTHONHASHSEED.
    rng = random.Random(f"ark-demo/v1/{node}/{seed}")
    labels = [
        label
        for label, count in zip(DEMO_LABELS, _counts(region.mix, n_rows), strict=True)
        for _ in range(count)
    ]
    rng.shuffle(labels)
    return [{"text": _ticket(rng, region, label), "label": label} for label in labels]


def as_completion(row: dict[str, str]) -> dict[str, str]:
    """The causal-LM form of a ticket: the model completes the ticket's category."""
    return {"prompt": f"Ticket: {row['text']}\nCategory:", "completion": row["label"]}


def write_demo_data(
    out_dir: Path,
    n_nodes: int = 3,
    *,
    rows_per_node: int = 240,
    seed: int = 7,
    task: str = TASK_CLASSIFICATION,
) -> dict[str, Path]:
    """Write ``<node>.jsonl`` for each demo node into ``out_dir``; return node name -> path.

    Rows are ``text,label`` for classification and ``prompt,completion`` for causal LM.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for node in node_names(n_nodes):
        rows = generate_node_rows(node, rows_per_node, seed=seed)
        if task == TASK_CAUSAL_LM:
            rows = [as_completion(row) for row in rows]
        path = out_dir / f"{node}.jsonl"
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        path.write_text(text, encoding="utf-8", newline="\n")
        paths[node] = path
    return paths


def _region_of(node: str) -> _Region:
    region, sep, lap = node.partition("-")
    if region in _REGIONS and (not sep or lap.isdigit()):
        return _REGIONS[region]
    raise ConfigError(
        f"unknown demo node {node!r}; expected one of {', '.join(_REGION_ORDER)}, "
        "optionally with a suffix such as '-2'",
        key="node",
    )


def _counts(mix: tuple[int, ...], n_rows: int) -> list[int]:
    """Split ``n_rows`` by the percentages in ``mix``, giving every label at least one row."""
    counts = [max(1, n_rows * percent // 100) for percent in mix]
    by_weight = sorted(range(len(mix)), key=lambda i: -mix[i])
    step = 0
    while sum(counts) < n_rows:
        counts[by_weight[step % len(mix)]] += 1
        step += 1
    while sum(counts) > n_rows:
        largest = max(range(len(mix)), key=lambda i: counts[i])
        counts[largest] -= 1
    return counts


def _ticket(rng: random.Random, region: _Region, label: str) -> str:
    vocab = _VOCAB[label]
    vague = rng.randrange(100) < _VAGUE_PERCENT
    finding = rng.choice(_SYMPTOMS if vague else vocab.findings)
    own_prefix = not vague and rng.random() < 0.6
    prefix = vocab.asset_prefix if own_prefix else rng.choice(_ASSET_PREFIXES)
    asset = f"{prefix}-{rng.randint(1000, 9999)}"
    head = f"{rng.choice(_OPENERS)} {finding} {_location(rng, region)}, asset ID {asset}."

    logged = f"Logged {rng.randrange(24):02d}:{rng.randrange(0, 60, 5):02d}."
    action = rng.choice(_GENERIC_ACTIONS if vague or rng.random() < 0.5 else vocab.actions)
    flavour = rng.choice(region.flavour)
    distractor = ""
    if rng.randrange(100) < _DISTRACTOR_PERCENT:
        other = _VOCAB[rng.choice([o for o in DEMO_LABELS if o != label])]
        distractor = rng.choice(_DISTRACTORS).format(m=other.mention)
    # Reading order; when a ticket runs long the time goes first, then the action.
    parts = [
        part
        for part, keep in (
            (flavour, rng.random() < 0.9),
            (distractor, bool(distractor)),
            (action, rng.random() < 0.8),
            (logged, rng.random() < 0.5),
        )
        if keep
    ]
    for part in (logged, action, flavour):
        if _words(head, *parts) <= MAX_WORDS:
            break
        if part in parts:
            parts.remove(part)
    return " ".join([head, *parts])


def _location(rng: random.Random, region: _Region) -> str:
    feeder = f"F-{rng.randint(1, 64)}"
    place = rng.choice(region.places)
    pole = rng.randint(1000, 9990)
    options = (
        f"near feeder {feeder} at {place}",
        f"on feeder {feeder} between poles P-{pole} and P-{pole + rng.randint(1, 9)}",
        f"at {place}, feeder {feeder}",
        f"{rng.randint(1, 19)} km past {place} on feeder {feeder}",
    )
    return rng.choice(options)


def _words(*parts: str) -> int:
    return sum(len(part.split()) for part in parts)
