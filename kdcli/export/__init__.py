"""Export: ONNX conversion and onnxruntime verification (:mod:`.onnx`), latency (:mod:`.latency`)."""
