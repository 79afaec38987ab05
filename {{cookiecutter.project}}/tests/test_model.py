"""The project's own tests: fast checks that model.py still honours contract.yaml."""

from __future__ import annotations

from pathlib import Path

import torch
from handoff.check import check
from handoff.contract import load_contract
from handoff.eval_suite import evaluate_outputs
from handoff.hooks import load_model_module

PROJECT = Path(__file__).resolve().parents[1]


def test_model_satisfies_the_contract() -> None:
    report = check(PROJECT)
    assert [name for name, _ in report.passed][-1] == "ONNX export round trip"


def test_example_inputs_are_real_held_out_images() -> None:
    model_py = load_model_module(PROJECT)
    example = model_py.example_inputs(model_py.Config())
    spec = load_contract(PROJECT).inputs[0]
    assert list(example.shape[1:]) == spec.shape[1:]
    assert 0.0 <= float(example.min()) and float(example.max()) <= 1.0
    assert float(example.std()) > 0  # not a blank placeholder


def test_tiny_config_learns_something() -> None:
    model_py = load_model_module(PROJECT)
    cfg = model_py.Config.tiny()
    torch.manual_seed(cfg.seed)
    train, _ = model_py.build_datasets(cfg)
    model = model_py.build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    images, labels = train.tensors
    first = model_py.loss(model(images[:256]), (images[:256], labels[:256])).item()
    for _ in range(20):
        optimizer.zero_grad()
        model_py.loss(model(images[:256]), (images[:256], labels[:256])).backward()
        optimizer.step()
    assert model_py.loss(model(images[:256]), (images[:256], labels[:256])).item() < first


def test_the_shared_evaluation_suite_scores_what_the_gate_will_score() -> None:
    """The suite the pipeline's gate uses, run here on the torch model (research and production
    read the same metrics; `handoff evaluate` runs it on the exported ONNX model)."""
    model_py = load_model_module(PROJECT)
    cfg = model_py.Config.tiny()
    torch.manual_seed(cfg.seed)
    _, val = model_py.build_datasets(cfg)
    images, labels = val.tensors
    with torch.no_grad():
        scores = model_py.build_model(cfg)(images).numpy()
    result = evaluate_outputs(load_contract(PROJECT).task, scores, labels.numpy())
    assert {"accuracy", "macro_f1", "ece"} <= set(result.metrics)
    assert len(result.confusion) == scores.shape[1]
    assert sum(map(sum, result.confusion)) == len(labels)
    assert all(name.startswith("class=") for name in result.slices)
