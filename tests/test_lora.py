"""Tests for LoRA adapters (sandbox.lora), model directories (sandbox.models) and local
training and evaluation (clients.training), all on tiny random models."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from clients.data import Example
from clients.training import encode, evaluate, macro_f1, train_local
from sandbox.config import (
    MODE_FEDAVG,
    MODE_FFA,
    TASK_CAUSAL_LM,
    TASK_CLASSIFICATION,
    LoraSpec,
    RunSpec,
)
from sandbox.errors import AdapterMismatch, ConfigError, ModelError
from sandbox.lora import (
    DEFAULT_TARGETS,
    adapter_state,
    build_peft_model,
    export_peft_adapter,
    load_adapter_state,
    target_modules,
)
from sandbox.models import inspect_model_dir, load_pretrained
from tests.conftest import make_spec

LABELS = ("a", "b", "c")
WORDS = {"a": "alpha", "b": "beta", "c": "gamma"}


def _node_model(spec: RunSpec) -> tuple[Any, Any]:
    info = inspect_model_dir(spec.model_path, spec.task)
    base, tokenizer = load_pretrained(info, num_labels=len(spec.labels))
    model = build_peft_model(
        base, spec.lora, task=spec.task, model_type=info.model_type, mode=spec.lora_mode
    )
    return model.eval(), tokenizer


def _perturbed(adapter: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Every LoRA B (zero at init) and the classifier set to seeded random values."""
    rng = np.random.default_rng(seed)
    out = dict(adapter)
    for name, array in adapter.items():
        if ".lora_B." in name or ".classifier." in name:
            out[name] = rng.normal(scale=0.5, size=array.shape).astype(np.float32)
    return out


def _classification_examples(per_label: int = 8) -> list[Example]:
    examples = []
    for i in range(per_label):
        for label, word in WORDS.items():
            examples.append(Example(" ".join([word] * (2 + i % 3)), label))
    return examples


def _lm_examples() -> list[Example]:
    return [
        Example(f"the answer for {word}", f"is {word} {word}")
        for word in ("alpha", "beta", "gamma", "delta")
    ]


def _logits(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model.eval()(**inputs).logits
    return logits


def test_classification_export_loads_in_stock_peft(tiny_bert_dir: Path, tmp_path: Path) -> None:
    spec = make_spec(tiny_bert_dir, TASK_CLASSIFICATION)
    model, tokenizer = _node_model(spec)
    adapter = _perturbed(adapter_state(model), seed=0)
    out = export_peft_adapter(model, adapter, tmp_path / "adapter")
    assert out == tmp_path / "adapter"
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert not list(out.glob("*.bin"))

    inputs = dict(tokenizer(["alpha beta gamma", "beta"], padding=True, return_tensors="pt"))
    expected = _logits(model, inputs)

    base = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_bert_dir), num_labels=3, local_files_only=True
    )
    without_adapter = _logits(base, inputs)
    loaded = PeftModel.from_pretrained(base, str(out))
    got = _logits(loaded, inputs)

    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(without_adapter, expected, atol=1e-3)


def test_causal_lm_export_loads_in_stock_peft(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = make_spec(tiny_llama_dir, TASK_CAUSAL_LM)
    model, tokenizer = _node_model(spec)
    adapter = _perturbed(adapter_state(model), seed=1)
    assert any(".lora_B." in name for name in adapter)
    out = export_peft_adapter(model, adapter, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == spec.lora.r
    assert sorted(config["target_modules"]) == sorted(DEFAULT_TARGETS["llama"])

    inputs = dict(tokenizer(["the answer for alpha"], return_tensors="pt"))
    expected = _logits(model, inputs)

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), local_files_only=True)
    without_adapter = _logits(base, inputs)
    loaded = PeftModel.from_pretrained(base, str(out))
    got = _logits(loaded, inputs)

    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(without_adapter, expected, atol=1e-3)


def test_adapter_moves_between_independently_built_models(tiny_bert_dir: Path) -> None:
    spec = make_spec(tiny_bert_dir, TASK_CLASSIFICATION)
    sender, tokenizer = _node_model(spec)
    receiver, _ = _node_model(spec)
    load_adapter_state(sender, _perturbed(adapter_state(sender), seed=2))
    inputs = dict(tokenizer(["gamma gamma", "alpha"], padding=True, return_tensors="pt"))
    # Fresh LoRA A and classifier are random, so the two models start out different.
    assert not torch.allclose(_logits(sender, inputs), _logits(receiver, inputs), atol=1e-4)

    load_adapter_state(receiver, adapter_state(sender))

    torch.testing.assert_close(_logits(receiver, inputs), _logits(sender, inputs))
    received = adapter_state(receiver)
    for name, array in adapter_state(sender).items():
        np.testing.assert_array_equal(received[name], array)


@pytest.mark.parametrize("fault", ["missing", "extra"])
def test_load_adapter_state_rejects_names_that_do_not_fit(tiny_bert_dir: Path, fault: str) -> None:
    model, _ = _node_model(make_spec(tiny_bert_dir, TASK_CLASSIFICATION))
    adapter = adapter_state(model)
    dropped = sorted(adapter)[0]
    if fault == "missing":
        del adapter[dropped]
        expected = f"missing \\['{dropped}'\\]"
    else:
        adapter["base_model.model.stray.lora_B.weight"] = np.zeros((2, 2), np.float32)
        expected = "extra \\['base_model.model.stray.lora_B.weight'\\]"
    before = adapter_state(model)
    with pytest.raises(AdapterMismatch, match=expected):
        load_adapter_state(model, adapter)
    after = adapter_state(model)
    for name, array in before.items():
        np.testing.assert_array_equal(after[name], array)


def test_default_targets_are_used_only_when_none_are_configured() -> None:
    assert target_modules(LoraSpec(), "bert") == ("query", "value")
    assert target_modules(LoraSpec(target_modules=("key",)), "bert") == ("key",)
    assert target_modules(LoraSpec(target_modules=("proj",)), "not-a-model") == ("proj",)
    with pytest.raises(ConfigError, match="'not-a-model'") as excinfo:
        target_modules(LoraSpec(), "not-a-model")
    assert excinfo.value.key == "lora-target-modules"


def test_unknown_model_type_without_targets_fails_to_build(tiny_bert_dir: Path) -> None:
    info = inspect_model_dir(tiny_bert_dir, TASK_CLASSIFICATION)
    base, _ = load_pretrained(info, num_labels=3)
    with pytest.raises(ConfigError, match="no default LoRA targets"):
        build_peft_model(
            base, LoraSpec(), task=TASK_CLASSIFICATION, model_type="vit", mode=MODE_FEDAVG
        )
    with pytest.raises(ConfigError) as excinfo:
        build_peft_model(
            base,
            LoraSpec(target_modules=("no_such_layer",)),
            task=TASK_CLASSIFICATION,
            model_type=info.model_type,
            mode=MODE_FEDAVG,
        )
    assert excinfo.value.key == "lora-target-modules"


def _loss_on(model: Any, tokenizer: Any, examples: list[Example], spec: RunSpec) -> float:
    batch = encode(examples, tokenizer, spec)
    with torch.no_grad():
        return float(model.eval()(**batch.inputs, labels=batch.labels).loss)


@pytest.mark.parametrize("mode", [MODE_FEDAVG, MODE_FFA])
def test_classification_training_lowers_loss_and_moves_the_adapter(
    tiny_bert_dir: Path, mode: str
) -> None:
    # A freshly initialised tiny encoder barely separates the classes at first, so the
    # step size is larger than a real run would use.
    spec = make_spec(tiny_bert_dir, TASK_CLASSIFICATION, mode=mode, learning_rate=5e-2)
    torch.manual_seed(0)  # fixes the fresh LoRA A, the classifier and dropout
    model, tokenizer = _node_model(spec)
    examples = _classification_examples()
    before_state = adapter_state(model)
    before_loss = _loss_on(model, tokenizer, examples, spec)

    train_loss = train_local(model, tokenizer, examples, spec, seed=0, steps=45)

    assert math.isfinite(train_loss)
    assert not model.training
    # FFA learns more slowly than FedAvg from a fresh adapter: only B and the head move.
    assert _loss_on(model, tokenizer, examples, spec) < 0.95 * before_loss
    after_state = adapter_state(model)
    for name, before in before_state.items():
        unchanged = np.array_equal(after_state[name], before)
        # FFA must leave every A exactly as the shared initial adapter had it.
        assert unchanged == (mode == MODE_FFA and ".lora_A." in name), name

    metrics = evaluate(model, tokenizer, examples, spec)
    assert set(metrics) == {"accuracy", "macro_f1"}
    assert 0.0 <= metrics["macro_f1"] <= 1.0
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["accuracy"] > 1 / 3


def test_training_is_reproducible_for_a_seed(tiny_bert_dir: Path) -> None:
    spec = make_spec(tiny_bert_dir, TASK_CLASSIFICATION, learning_rate=1e-2)
    examples = _classification_examples(per_label=3)
    first, tokenizer = _node_model(spec)
    second, _ = _node_model(spec)
    load_adapter_state(second, adapter_state(first))
    # Dropout is on in train mode; the seed fixes batch order, torch's RNG the dropout.
    torch.manual_seed(1)
    loss_first = train_local(first, tokenizer, examples, spec, seed=3)
    torch.manual_seed(1)
    loss_second = train_local(second, tokenizer, examples, spec, seed=3)
    assert loss_first == loss_second
    got = adapter_state(second)
    for name, array in adapter_state(first).items():
        np.testing.assert_array_equal(got[name], array)


def test_causal_lm_training_and_perplexity(tiny_llama_dir: Path) -> None:
    spec = make_spec(tiny_llama_dir, TASK_CAUSAL_LM, learning_rate=2e-2)
    torch.manual_seed(0)
    model, tokenizer = _node_model(spec)
    examples = _lm_examples()
    before = evaluate(model, tokenizer, examples, spec)

    train_loss = train_local(model, tokenizer, examples, spec, seed=0, steps=10)

    after = evaluate(model, tokenizer, examples, spec)
    assert math.isfinite(train_loss)
    for metrics in (before, after):
        assert set(metrics) == {"loss", "perplexity"}
        assert metrics["loss"] > 0
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-9)
    assert after["loss"] < before["loss"]


def test_causal_lm_encoding_scores_only_the_completion(tiny_llama_dir: Path) -> None:
    spec = make_spec(tiny_llama_dir, TASK_CAUSAL_LM)
    _, tokenizer = load_pretrained(inspect_model_dir(tiny_llama_dir, TASK_CAUSAL_LM))
    example = Example("the answer for alpha", "is alpha")
    batch = encode([example, Example("x", "y")], tokenizer, spec)
    prompt = tokenizer(example.text)["input_ids"]
    completion = tokenizer(" " + example.target, add_special_tokens=False)["input_ids"]
    ids = prompt + completion + [tokenizer.eos_token_id]
    assert batch.inputs["input_ids"][0].tolist() == ids
    assert batch.labels[0].tolist() == [-100] * len(prompt) + completion + [102]
    # The shorter row is padded, and its padding is neither attended to nor scored.
    short = int(batch.inputs["attention_mask"][1].sum())
    assert short < len(ids)
    assert batch.labels[1, short:].eq(-100).all()
    assert batch.inputs["input_ids"][1, short:].eq(tokenizer.pad_token_id).all()


def test_macro_f1_by_hand() -> None:
    # label 0: tp=1 fp=0 fn=1 -> 2/3; label 1: tp=2 fp=1 fn=0 -> 4/5; label 2 absent, skipped.
    assert macro_f1([0, 0, 1, 1], [0, 1, 1, 1], 3) == pytest.approx((2 / 3 + 4 / 5) / 2)
    # label 2 predicted but never true: F1 0 for it, and it counts.
    assert macro_f1([0, 1], [0, 2], 3) == pytest.approx((1.0 + 0.0 + 0.0) / 3)
    assert macro_f1([1, 0, 2], [1, 0, 2], 3) == 1.0
    assert macro_f1([], [], 3) == 0.0


def _model_dir_copy(source: Path, tmp_path: Path) -> Path:
    path = tmp_path / "model"
    shutil.copytree(source, path)
    return path


def _set_model_type(path: Path, model_type: str | None) -> None:
    config = json.loads((path / "config.json").read_text())
    if model_type is None:
        del config["model_type"]
    else:
        config["model_type"] = model_type
    (path / "config.json").write_text(json.dumps(config))


def _drop_weights(path: Path) -> None:
    for weights in path.glob("*.safetensors"):
        weights.unlink()


def _pickled_weights(path: Path) -> None:
    _drop_weights(path)
    (path / "pytorch_model.bin").write_bytes(b"not really a pickle")


def _drop_tokenizer(path: Path) -> None:
    for name in ("tokenizer.json", "vocab.txt"):
        (path / name).unlink()


BROKEN_DIRS: dict[str, tuple[Any, str, str]] = {
    "no-config": (lambda p: (p / "config.json").unlink(), TASK_CLASSIFICATION, "no config.json"),
    "bad-json": (
        lambda p: (p / "config.json").write_text("{"),
        TASK_CLASSIFICATION,
        "unreadable config.json",
    ),
    "no-model-type": (
        lambda p: _set_model_type(p, None),
        TASK_CLASSIFICATION,
        "no 'model_type'",
    ),
    "vit-classifier": (
        lambda p: _set_model_type(p, "vit"),
        TASK_CLASSIFICATION,
        "unsupported architecture 'vit'",
    ),
    "invented-lm": (
        lambda p: _set_model_type(p, "not-a-model"),
        TASK_CAUSAL_LM,
        "unsupported architecture 'not-a-model'",
    ),
    "no-weights": (_drop_weights, TASK_CLASSIFICATION, "no \\*.safetensors weights"),
    "pickle-only": (_pickled_weights, TASK_CLASSIFICATION, "pytorch_model.bin.*refused"),
    "no-tokenizer": (_drop_tokenizer, TASK_CLASSIFICATION, "no tokenizer files"),
    "unknown-task": (lambda p: None, "translation", "unsupported task 'translation'"),
}


@pytest.mark.parametrize(
    ("breakage", "task", "message"), BROKEN_DIRS.values(), ids=BROKEN_DIRS.keys()
)
def test_inspect_model_dir_names_the_directory_and_the_problem(
    tiny_bert_dir: Path, tmp_path: Path, breakage: Any, task: str, message: str
) -> None:
    path = _model_dir_copy(tiny_bert_dir, tmp_path)
    inspect_model_dir(path, TASK_CLASSIFICATION)  # the copy is good before it is broken
    breakage(path)
    with pytest.raises(ModelError, match=message) as excinfo:
        inspect_model_dir(path, task)
    assert str(path) in str(excinfo.value)
    assert path in (excinfo.value.path, excinfo.value.path.parent)


def test_weights_without_pickle_do_not_mention_pickle(tiny_bert_dir: Path, tmp_path: Path) -> None:
    path = _model_dir_copy(tiny_bert_dir, tmp_path)
    _drop_weights(path)
    with pytest.raises(ModelError) as excinfo:
        inspect_model_dir(path, TASK_CLASSIFICATION)
    assert "refused" not in str(excinfo.value)


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_inspect_model_dir_rejects_a_path_that_is_not_a_directory(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "model"
    if kind == "file":
        path.write_text("{}")
    with pytest.raises(ModelError, match="does not exist" if kind == "missing" else "not a dir"):
        inspect_model_dir(path, TASK_CLASSIFICATION)
    with pytest.raises(ModelError) as excinfo:
        inspect_model_dir(path, TASK_CLASSIFICATION)
    assert str(path) in str(excinfo.value)


def test_tiny_models_pass_inspection(tiny_bert_dir: Path, tiny_llama_dir: Path) -> None:
    bert = inspect_model_dir(tiny_bert_dir, TASK_CLASSIFICATION)
    llama = inspect_model_dir(tiny_llama_dir, TASK_CAUSAL_LM)
    assert (bert.model_type, llama.model_type) == ("bert", "llama")
    assert [p.name for p in bert.weight_files] == ["model.safetensors"]
    assert [p.name for p in llama.weight_files] == ["model.safetensors"]


def test_load_adapter_state_rejects_wrong_shapes_before_loading(tiny_bert_dir: Path) -> None:
    model, _ = _node_model(make_spec(tiny_bert_dir, TASK_CLASSIFICATION))
    adapter = adapter_state(model)
    name = next(n for n in sorted(adapter) if ".lora_B." in n)
    adapter[name] = np.zeros((adapter[name].shape[0] + 1, adapter[name].shape[1]), np.float32)
    with pytest.raises(AdapterMismatch, match="wrong shape"):
        load_adapter_state(model, adapter)
