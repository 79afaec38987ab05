"""Names of the files steps hand to each other (kept apart so no step imports another's engine)."""

ONNX_FILE = "model.onnx"  # the one self-contained ONNX model
EXAMPLE_FILE = "example.json"  # contract example as a V2 request, with the expected outputs
EXPORT_RECORD_FILE = "export.json"  # export's result (sha256, parity), read by evaluation
FP32_FILE = "model.fp32.onnx"  # the exported fp32 model, beside the optimized form served
OPTIMIZE_RECORD_FILE = "optimize.json"  # optimize's candidates and choice, read by evaluate and register
CONFIG_FILE = "config.json"  # the model.py Config the weights were trained with
EXTRA_DIR = "extra_files"  # where MLflow's log_model(extra_files=...) puts them in a model's folder
# The version's reference profile (handoff.reference_profile): what `handoff monitor` compares
# logged traffic with. Written by evaluate beside its report, attached to the version by register.
REFERENCE_INPUTS_FILE = "reference_inputs.parquet"  # training items' input columns
REFERENCE_OUTPUTS_FILE = "reference_outputs.parquet"  # the model's held-out output columns
REFERENCE_FILE = "reference.json"  # what both tables hold and where they come from
REFERENCE_FILES = (REFERENCE_INPUTS_FILE, REFERENCE_OUTPUTS_FILE, REFERENCE_FILE)
