"""`handoff optimize` on real generated projects: every form the default example allows is made and
scored, the chosen one is what export's folder now holds (model.onnx, example.json, export.json,
the Triton repository) with the fp32 model kept beside it, and each way a form is refused (not
allowed, an int8 metric drop the contract does not allow, an op ONNX Runtime's quantizer does not
quantize) falls back to fp32 with the sentence a user reads.

The default project is trained once per module (a few epochs, in this process, with model.py's
own hooks) and exported once; each test optimizes a copy of that export with its own contract.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.utils.data import DataLoader

from handoff.checkpoints import save_checkpoint
from handoff.contract import DEFAULT_FORM_PARITY, OPTIMIZE_FORMS
from handoff.errors import HandoffError
from handoff.files import read_json, sha256_of
from handoff.project import Project
from handoff.steps.evaluate import evaluate
from handoff.steps.export import export
from handoff.steps.optimize import OptimizeResult, optimize, predictor_threads

from .conftest import edit_yaml, mlflow_state_restored, replace_in

pytestmark = pytest.mark.local

MODEL = "digits-classifier"  # the default project's contract name (its Triton model folder)
EPOCHS = 4  # enough for the starter CNN to pass its contract's accuracy floor (0.95)
SUITE_METRICS = {"accuracy", "macro_f1", "ece", "val_loss"}
INT8 = {"int8_static", "int8_dynamic"}


@dataclass(frozen=True)
class Exported:
    """The default project, its trained weights and export's folder for them."""

    project: Path
    checkpoint: Path
    model_dir: Path


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """CI runs two test workers on two cores: a second intra-op thread only contends with the other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(project: Project, epochs: int) -> tuple[dict[str, torch.Tensor], Any]:
    """A short seeded run of model.py's own model, data and loss (what `handoff train` does, less
    its MLflow run, which costs more here than the training)."""
    cfg = project.config({"epochs": epochs})
    torch.manual_seed(cfg.seed)
    model = project.hooks.build_model(cfg)
    train_set, _ = project.hooks.build_datasets(cfg)
    order = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=order)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    model.train()
    for _ in range(cfg.epochs):
        for inputs, target in loader:
            optimizer.zero_grad()
            project.hooks.loss(model(inputs), (inputs, target)).backward()
            optimizer.step()
    return model.state_dict(), cfg


@pytest.fixture(scope="module")
def exported(default_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    root = tmp_path_factory.mktemp("optimize")
    project_dir = Path(shutil.copytree(default_project, root / MODEL))
    weights, cfg = _train(Project.load(project_dir), EPOCHS)
    checkpoint = root / "model.pt"
    save_checkpoint(checkpoint, {"model": weights, "config": dataclasses.asdict(cfg)})
    export(project_dir, checkpoint, root / "export")
    return Exported(project_dir, checkpoint, root / "export")


def _copies(exported: Exported, tmp_path: Path) -> tuple[Path, Path]:
    """A private project and export folder, safe to edit and to optimize."""
    project = Path(shutil.copytree(exported.project, tmp_path / MODEL))
    return project, Path(shutil.copytree(exported.model_dir, tmp_path / "export"))


def _set_slo(project: Path, **fields: Any) -> None:
    edit_yaml(project / "contract.yaml", lambda c: c["slo"].update(fields))


def _optimize_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("handoff: optimize:")]


def _candidates(result: OptimizeResult) -> dict[str, dict[str, Any]]:
    return {c["form"]: c for c in result.candidates}


def _example(model_dir: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """example.json's inputs and expected outputs as arrays."""
    payload = read_json(model_dir / "example.json")

    def arrays(tensors: list[dict[str, Any]]) -> list[np.ndarray]:
        return [np.asarray(t["data"], dtype=np.float32).reshape(t["shape"]) for t in tensors]

    return arrays(payload["inputs"]), arrays(payload["expected_outputs"])


def _run(model: Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, inputs, strict=True)))


def assert_serves_the_chosen_form(result: OptimizeResult, source: Path, out: Path) -> None:
    """What evaluate, register and deploy read from ``out`` is the chosen form, in export's layout."""
    chosen = _candidates(result)[result.form]
    served = out / "model.onnx"
    assert chosen["made"], chosen
    assert chosen["kept"] or result.form == "fp32", chosen  # fp32 is the fallback, kept or not
    assert sha256_of(served) == chosen["sha256"] == result.onnx_sha256
    assert served.stat().st_size == chosen["size_bytes"]
    assert result.fp32_sha256 == sha256_of(source / "model.onnx") == _candidates(result)["fp32"]["sha256"]
    assert result.reason.startswith(f"{result.form}: ")
    # The exported model beside a form that is not it, byte for byte; nothing stale beside fp32.
    kept = out / "model.fp32.onnx"
    if result.form == "fp32":
        assert not kept.exists()
    else:
        assert kept.read_bytes() == (source / "model.onnx").read_bytes()
    # The smoke test's request is export's; its expected answer is the served model's own.
    inputs, expected = _example(out)
    exported_inputs, _ = _example(source)
    for mine, theirs in zip(inputs, exported_inputs, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    for want, got in zip(expected, _run(served, inputs), strict=True):
        np.testing.assert_allclose(want, got, rtol=0, atol=1e-6)
    record = read_json(out / "export.json")
    exported_record = read_json(source / "export.json")
    assert record["onnx_sha256"] == result.onnx_sha256 and record["form"] == result.form
    assert record["onnx_bytes"] == served.stat().st_size
    assert record["fp32_sha256"] == exported_record["onnx_sha256"] == result.fp32_sha256
    assert record["form_parity_max_abs_diff"] == chosen["parity_max_abs_diff"]
    assert read_json(out / "config.json") == read_json(source / "config.json")
    triton = out / "triton" / MODEL
    assert sha256_of(triton / "1" / "model.onnx") == result.onnx_sha256
    assert (triton / "config.pbtxt").is_file() and (triton / "contract.yaml").is_file()
    assert read_json(out / "optimize.json") == dataclasses.asdict(result)


def test_every_form_of_the_default_example_is_made_scored_and_the_chosen_one_served(
    exported: Exported, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project, source = _copies(exported, tmp_path)
    out = tmp_path / "optimized"
    capsys.readouterr()

    result = optimize(project, source, out)

    candidates = _candidates(result)
    assert list(candidates) == list(OPTIMIZE_FORMS)
    # Timed as the default predictor serves: on the CPU, with its one CPU as ONNX Runtime's threads.
    assert result.execution_provider == "CPUExecutionProvider, 1 thread(s) as serving.kserve.cpu allows"
    fp32 = candidates["fp32"]
    assert fp32["size_bytes"] == (source / "model.onnx").stat().st_size
    assert fp32["parity_max_abs_diff"] == 0.0
    assert fp32["metrics"]["accuracy"] >= 0.95, fp32  # the trained model passes the starter's floor
    for form, candidate in candidates.items():
        assert candidate["made"], candidate
        assert candidate["size_bytes"] > 0 and len(candidate["sha256"]) == 64
        assert 0 < candidate["latency_p50_ms"] <= candidate["latency_p99_ms"], candidate
        assert set(candidate["metrics"]) >= SUITE_METRICS, candidate
        assert candidate["parity_max_abs_diff"] >= 0, candidate
        assert candidate["parity_tolerance"] == pytest.approx(DEFAULT_FORM_PARITY[form])
        assert candidate["kept"] == (not candidate["why_not"]), candidate
    assert len({c["sha256"] for c in candidates.values()}) == len(candidates)  # five different files
    # What quantizing buys, whichever form is fastest on this machine: int8 weights are a quarter
    # of fp32's and fp16's half (plus the graph).
    for form in INT8:
        assert candidates[form]["size_bytes"] < fp32["size_bytes"] / 2, candidates[form]
    assert candidates["fp16"]["size_bytes"] < fp32["size_bytes"] * 0.7
    # The starter's model quantizes without losing what its contract allows.
    for form in INT8:
        drop = fp32["metrics"]["accuracy"] - candidates[form]["metrics"]["accuracy"]
        assert drop <= 0.005 + 1e-9 or not candidates[form]["kept"], candidates[form]
    assert_serves_the_chosen_form(result, source, out)
    assert "CPUExecutionProvider" in result.execution_provider
    # One line on stderr: what is served and why; no form failed to be made.
    assert _optimize_lines(capsys.readouterr().err) == [f"handoff: optimize: serving {result.reason}"]


def test_a_form_that_alone_keeps_the_size_slo_is_served_with_fp32_beside_it_then_a_rerun_cleans_up(
    exported: Exported, tmp_path: Path
) -> None:
    """Deterministic on any machine: only int8 fits 0.06 MB, so fp32 breaks an SLO an int8 form
    keeps and that form is served (min_speedup does not apply). Rerun with no other form allowed
    into the same folder: fp32 is served and the fp32 copy beside it is gone."""
    project, source = _copies(exported, tmp_path)
    out = tmp_path / "optimized"
    _set_slo(project, max_model_size_mb=0.06)

    result = optimize(project, source, out)

    candidates = _candidates(result)
    assert result.form in INT8, result.reason
    fp32_mb = candidates["fp32"]["size_bytes"] / 1e6
    assert result.reason == (
        f"{result.form}: fp32 breaks model.onnx {fp32_mb:.3f} MB > slo.max_model_size_mb 0.06 MB, "
        f"{result.form} keeps every SLO"
    )
    for form in ("fp32", "fp32_optimized", "fp16"):
        assert not candidates[form]["kept"]
        assert any("slo.max_model_size_mb 0.06 MB" in why for why in candidates[form]["why_not"])
    assert_serves_the_chosen_form(result, source, out)
    # The expected answer is the int8 model's, not fp32's.
    _, served = _example(out)
    _, fp32_answer = _example(source)
    assert not np.array_equal(served[0], fp32_answer[0])
    assert "tensorrt" not in (out / "triton" / MODEL / "config.pbtxt").read_text()  # a CPU predictor
    # Evaluate's readiness report shows every candidate and why this one, and the served form's parity.
    with mlflow_state_restored():
        evaluated = evaluate(project, out, report_dir=tmp_path / "report")
    markdown = (tmp_path / "report" / "readiness.md").read_text()
    assert f"## Optimized forms: {result.reason}" in markdown
    for form in OPTIMIZE_FORMS:  # one row each; the served one marked, those not kept crossed
        assert re.search(rf"\n\| {form}( \(served\))?( ✗)? \| ", markdown), form
    assert f"\n| {result.form} (served) | " in markdown and "\n| fp32 ✗ | " in markdown
    assert "<h2>Optimized forms</h2>" in (tmp_path / "report" / "readiness.html").read_text()
    assert (tmp_path / "report" / "optimized_forms.png").stat().st_size > 1000
    (parity,) = [i for i in evaluated.readiness if i.name == "ONNX parity"]
    assert parity.passed and f"served form {result.form}: max |fp32 − {result.form}| " in parity.evidence
    assert evaluated.model_size_mb < 0.06 and evaluated.gate.passed, evaluated.gate.reasons

    _set_slo(project, max_model_size_mb=50, optimize={"forms": []})
    again = optimize(project, source, out)

    assert again.form == "fp32" and again.reason == "fp32: no other form is allowed"
    assert [c["form"] for c in again.candidates] == ["fp32"]
    assert_serves_the_chosen_form(again, source, out)
    assert (out / "model.onnx").read_bytes() == (source / "model.onnx").read_bytes()
    assert "tensorrt" not in (out / "triton" / MODEL / "config.pbtxt").read_text()
    assert not list(out.glob(".candidates-*"))  # the scratch folder is gone


def test_forms_that_exclude_int8_make_no_int8_candidate(
    exported: Exported, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project, source = _copies(exported, tmp_path)
    _set_slo(project, optimize={"forms": ["fp32_optimized", "fp16"]})
    capsys.readouterr()

    result = optimize(project, source, tmp_path / "optimized")

    assert [c["form"] for c in result.candidates] == ["fp32", "fp32_optimized", "fp16"]
    assert all(c["made"] for c in result.candidates)
    assert result.form in {"fp32", "fp32_optimized", "fp16"}
    recorded = read_json(tmp_path / "optimized" / "optimize.json")
    assert not [c for c in recorded["candidates"] if c["form"].startswith("int8")]
    assert "int8" not in result.reason
    assert_serves_the_chosen_form(result, source, tmp_path / "optimized")
    assert _optimize_lines(capsys.readouterr().err) == [f"handoff: optimize: serving {result.reason}"]


def test_a_contract_without_slo_optimize_serves_the_exported_model_as_it_is(
    exported: Exported, tmp_path: Path
) -> None:
    """A contract written before optimize existed never gets another model unasked."""
    project, source = _copies(exported, tmp_path)
    edit_yaml(project / "contract.yaml", lambda c: c["slo"].pop("optimize"))

    result = optimize(project, source, tmp_path / "optimized")

    assert [c["form"] for c in result.candidates] == ["fp32"]
    assert (result.form, result.reason) == ("fp32", "fp32: no other form is allowed")
    assert (tmp_path / "optimized" / "model.onnx").read_bytes() == (source / "model.onnx").read_bytes()
    assert_serves_the_chosen_form(result, source, tmp_path / "optimized")


def test_a_gpu_predictor_is_offered_fp32_and_fp16_and_measured_where_it_serves(
    exported: Exported, tmp_path: Path
) -> None:
    """The int8 forms are CPU forms: a GPU predictor is offered fp32 and fp16 only. Where CUDA is
    not available to optimize, CPU timings would rank forms for a GPU wrongly, so fp32 is served
    and the reason says why; its Triton config keeps the default CUDA provider."""
    project, source = _copies(exported, tmp_path)
    edit_yaml(project / "handoff.yaml", lambda s: s["serving"]["kserve"].update(gpus=1))

    result = optimize(project, source, tmp_path / "optimized")

    candidates = _candidates(result)
    for form in ("fp32_optimized", "int8_static", "int8_dynamic"):
        assert candidates[form]["reason"] == (
            "made for CPU predictors; a GPU predictor (serving.kserve.gpus) is offered fp32 and fp16 only"
        )
    assert candidates["fp16"]["made"] and candidates["fp16"]["kept"], candidates["fp16"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert result.form == "fp32"
        assert result.reason.startswith(
            "fp32: a GPU predictor's latency cannot be measured here (CUDAExecutionProvider is not "
            "available where optimize ran), so no form replaces fp32; on the CPU, "
        )
        assert (
            result.execution_provider
            == "CPUExecutionProvider (CUDAExecutionProvider is not available here), 1 thread(s) as "
            "serving.kserve.cpu allows"
        )
        assert result.triton_precision is None
        assert "tensorrt" not in (tmp_path / "optimized" / "triton" / MODEL / "config.pbtxt").read_text()
    elif result.form == "fp16":
        assert result.triton_precision == "FP16"
    assert_serves_the_chosen_form(result, source, tmp_path / "optimized")


# A head whose input carries one constant activation of OUTLIER beside the CNN's ten logits, which
# it multiplies by zero: fp32 answers exactly as the CNN, while int8 quantizes that tensor per
# tensor with a step of about OUTLIER / 255, which rounds every logit to zero (argmax: class 0).
OUTLIER = 1e6
OUTLIER_MODEL = f'''

class OutlierHead(nn.Module):
    """The CNN's logits and one constant activation of {OUTLIER:g}, into a linear layer that
    ignores the constant (its column of weights is zero)."""

    def __init__(self, cnn: nn.Module) -> None:
        super().__init__()
        self.cnn = cnn
        self.head = nn.Linear(11, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.cnn(image)
        return self.head(torch.cat([logits, torch.full_like(logits[:, :1], {OUTLIER!r})], dim=1))


def build_model(cfg: Config) -> nn.Module:
    return OutlierHead(build_cnn(cfg))
'''


def _rename_build_model(project: Path, to: str) -> None:
    """Keep the starter's network under another name; the test appends its own build_model."""
    signature = "(cfg: Config) -> nn.Module:"
    replace_in(project / "model.py", f"def build_model{signature}", f"def {to}{signature}")


def test_int8_that_loses_more_accuracy_than_allowed_falls_back_to_fp32_saying_so(
    exported: Exported, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project, _ = _copies(exported, tmp_path)
    _rename_build_model(project, "build_cnn")
    with (project / "model.py").open("a") as f:
        f.write(OUTLIER_MODEL)
    # The contract as a user writes it: the drop is named first, before the floor and parity
    # that such a model breaks too.
    _set_slo(
        project, optimize={"forms": ["int8_static", "int8_dynamic"], "max_metric_drop": {"accuracy": 0.005}}
    )
    # The trained CNN inside the head, which passes the CNN's logits through unchanged.
    state = torch.load(exported.checkpoint, weights_only=True)
    weights = {f"cnn.{name}": value for name, value in state["model"].items()}
    weights["head.weight"] = torch.cat([torch.eye(10), torch.zeros(10, 1)], dim=1)
    weights["head.bias"] = torch.zeros(10)
    checkpoint = tmp_path / "outlier.pt"
    save_checkpoint(checkpoint, {"model": weights, "config": state["config"]})
    export(project, checkpoint, tmp_path / "export")
    capsys.readouterr()

    result = optimize(project, tmp_path / "export", tmp_path / "optimized")

    candidates = _candidates(result)
    fp32_accuracy = candidates["fp32"]["metrics"]["accuracy"]
    assert fp32_accuracy >= 0.95  # the head changed nothing in fp32
    assert result.form == "fp32"
    for form in INT8:
        candidate = candidates[form]
        assert candidate["made"] and not candidate["kept"], candidate
        accuracy = candidate["metrics"]["accuracy"]
        assert accuracy < 0.5, candidate  # the outlier wiped the logits out
        drop = f"{fp32_accuracy - accuracy:.4f}"
        assert candidate["why_not"][0] == (
            f"accuracy {accuracy:.4f} is {drop} worse than fp32's {fp32_accuracy:.4f} "
            "(slo.optimize.max_metric_drop.accuracy 0.005)"
        )
        assert f"{form}: {candidate['why_not'][0]}" in result.reason
    assert result.reason.startswith("fp32: int8_static: accuracy ")
    assert_serves_the_chosen_form(result, tmp_path / "export", tmp_path / "optimized")
    assert _optimize_lines(capsys.readouterr().err) == [f"handoff: optimize: serving {result.reason}"]


EINSUM_MODEL = '''

class EinsumClassifier(nn.Module):
    """Logits as one Einsum of the image with a weight: an op ONNX Runtime's quantizer skips."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, 8, 8, 10) * 0.1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,chwk->bk", image, self.weight)


def build_model(cfg: Config) -> nn.Module:
    return EinsumClassifier()
'''


def test_a_model_whose_ops_the_quantizer_skips_falls_back_to_fp32_with_its_message(
    exported: Exported, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project, _ = _copies(exported, tmp_path)
    _rename_build_model(project, "unused_cnn")
    with (project / "model.py").open("a") as f:
        f.write(EINSUM_MODEL)
    # Untrained weights: no accuracy floor, so the only story is the int8 form that was not made.
    _set_slo(project, min_metrics={"accuracy": 0.0}, optimize={"forms": ["int8_static"]})
    loaded = Project.load(project)
    cfg = loaded.config()
    torch.manual_seed(0)
    checkpoint = tmp_path / "einsum.pt"
    model = loaded.hooks.build_model(cfg)
    save_checkpoint(checkpoint, {"model": model.state_dict(), "config": dataclasses.asdict(cfg)})
    export(project, checkpoint, tmp_path / "export")
    capsys.readouterr()

    result = optimize(project, tmp_path / "export", tmp_path / "optimized")

    candidates = _candidates(result)
    assert list(candidates) == ["fp32", "int8_static"]
    not_made = candidates["int8_static"]
    assert not not_made["made"] and not not_made["kept"]
    assert "quantized no op" in not_made["reason"] and "(Einsum)" in not_made["reason"]
    assert not_made["why_not"] == [not_made["reason"]]
    assert not_made["size_bytes"] == 0 and not_made["latency_p50_ms"] is None
    assert result.form == "fp32"
    assert result.reason == f"fp32: int8_static: {not_made['reason']}"
    assert_serves_the_chosen_form(result, tmp_path / "export", tmp_path / "optimized")
    assert _optimize_lines(capsys.readouterr().err) == [
        f"handoff: optimize: int8_static not made: {not_made['reason']}",
        f"handoff: optimize: serving {result.reason}",
    ]


def test_a_folder_without_model_onnx_is_refused_with_what_optimize_reads(
    exported: Exported, tmp_path: Path
) -> None:
    empty = tmp_path / "not-an-export"
    empty.mkdir()
    with pytest.raises(HandoffError) as raised:
        optimize(exported.project, empty, tmp_path / "optimized")
    wanted = "optimize reads the folder `handoff export` wrote"
    assert str(raised.value) == f"{empty}: no model.onnx here: {wanted}"


def test_optimize_never_writes_over_the_folder_it_reads(exported: Exported, tmp_path: Path) -> None:
    """--out naming export's folder would replace the fp32 model it measures against, and a folder
    optimize wrote holds a model that may be int8 already: both are refused before anything changes."""
    project, source = _copies(exported, tmp_path)
    before = {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()}
    with pytest.raises(HandoffError) as raised:
        optimize(project, source, source)
    assert str(raised.value) == (
        f"{source}: --out is the folder optimize reads: write the chosen form to another folder, "
        "so export's fp32 model stays as it was"
    )
    assert {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()} == before
    optimized = tmp_path / "optimized"
    optimize(project, source, optimized)
    with pytest.raises(HandoffError) as raised:
        optimize(project, optimized, tmp_path / "again")
    assert str(raised.value) == (
        f"{optimized}: this is a folder `handoff optimize` wrote: optimize reads the folder "
        "`handoff export` wrote"
    )


class MaskedAttention(torch.nn.Module):
    """One attention read-out over token embeddings, padding (token 0) masked with the float
    minimum before the softmax, as the text starter's encoder (and HuggingFace's) does."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 16)
        self.query = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        scores = (self.query(x) * x).sum(-1)
        scores = scores.masked_fill(tokens == 0, torch.finfo(scores.dtype).min)
        return self.out((scores.softmax(-1).unsqueeze(-1) * x).sum(1))


def test_static_int8_keeps_a_masked_softmax_in_fp32(tmp_path: Path) -> None:
    """Quantizing the softmax's input would give the mask's fill value the whole uint8 range and the
    real scores none: the text starter lost 10 accuracy points that way. Its outputs stay close."""
    from handoff.onnx_forms import make_form

    generator = np.random.default_rng(0)
    tokens = generator.integers(1, 50, size=(64, 12))
    tokens[:, 8:] = 0  # padded
    fp32 = tmp_path / "fp32.onnx"
    batch = torch.export.Dim("batch")
    torch.onnx.export(
        MaskedAttention().eval(),
        (torch.from_numpy(tokens[:2]),),
        str(fp32),
        input_names=["tokens"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        dynamo=True,
        external_data=False,
    )
    feeds = [{"tokens": tokens[i : i + 16]} for i in range(0, 64, 16)]
    int8 = make_form("int8_static", fp32, tmp_path / "int8.onnx", feeds)

    def run(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"tokens": tokens})[0]

    # With the softmax quantized: max diff 1.04 on outputs up to 1.14, half the argmaxes changed.
    reference, quantized = run(fp32), run(int8)
    assert np.abs(quantized - reference).max() < 0.15 * np.abs(reference).max()
    assert (quantized.argmax(1) == reference.argmax(1)).mean() >= 0.95


def test_every_form_reads_back_as_the_registry_loads_it(exported: Exported, tmp_path: Path) -> None:
    """mlflow.onnx.load_model checks the graph (topological order among others): fp16's converter
    appends its input casts last, which MLflow refused before the form was sorted."""
    import mlflow.onnx
    import onnx

    from handoff.onnx_forms import make_form

    fp32 = exported.model_dir / "model.onnx"
    feeds = [{"image": np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)}]
    for form in ("fp32_optimized", "int8_static", "int8_dynamic", "fp16"):
        path = make_form(form, fp32, tmp_path / f"{form}.onnx", feeds)
        mlflow.onnx.save_model(onnx.load(str(path)), str(tmp_path / form))
        assert isinstance(mlflow.onnx.load_model(str(tmp_path / form)), onnx.ModelProto), form


@pytest.mark.parametrize(("cpu", "threads"), [("500m", 1), ("1", 1), ("1500m", 2), ("4", 4)])
def test_forms_are_timed_with_the_threads_a_predictor_replica_may_use(
    exported: Exported, tmp_path: Path, cpu: str, threads: int
) -> None:
    project, _ = _copies(exported, tmp_path)
    edit_yaml(project / "handoff.yaml", lambda s: s["serving"]["kserve"].update(cpu=cpu))
    assert predictor_threads(Project.load(project)) == threads
