"""Export and verification: packed safetensors, ONNX and int8 ONNX."""
