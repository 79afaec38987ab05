"""Names of the files steps hand to each other (kept apart so no step imports another's engine)."""

ONNX_FILE = "model.onnx"  # the one self-contained ONNX model
EXAMPLE_FILE = "example.json"  # contract example as a V2 request, with the expected outputs
EXPORT_RECORD_FILE = "export.json"  # export's result (sha256, parity), read by evaluation
FP32_FILE = "model.fp32.onnx"  # the exported fp32 model, beside the optimized form served
OPTIMIZE_RECORD_FILE = "optimize.json"  # optimize's candidates and choice, read by evaluate and register
CONFIG_FILE = "config.json"  # the model.py Config the weights were trained with
EXTRA_DIR = "extra_files"  # where MLflow's log_model(extra_files=...) puts them in a model's folder
