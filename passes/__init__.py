"""Graph passes over MoE blocks: detect, observe, merge, router, losparse, lower; complex_views
(over an exported program, before ONNX). One file a pass."""
