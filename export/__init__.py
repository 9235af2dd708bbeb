"""ONNX export and TensorRT engines (installed as surgery_r1_ros.export)."""
