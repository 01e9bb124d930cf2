"""The code that runs inside a sandbox: `python -m sandbox.runner /path/spec.json` (cwd = out dir).

It may import only the standard library, numpy, torch, optuna, safetensors, onnx/onnxscript (export_onnx
only) and `sandbox.protocol`, so the sandbox image stays small and the host can change without rebuilding
it. This file imports nothing: the host imports the torch-free `sandbox.runner.params` without pulling in
torch.
"""
