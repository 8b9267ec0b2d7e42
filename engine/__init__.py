"""edgepipe's workflow engine: config validation, the stage DAG, the content-addressed cache, runs
and the CLI. It imports nothing from stages/ or boards/ and nothing heavy (torch, onnxruntime)."""

__version__ = "0.1.0"
