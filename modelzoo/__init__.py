"""Seeded, real ONNX models built locally so tests and benchmarks never download weights.

``modelzoo.build.MODELS`` names them (a chain, a ResNet DAG, a dynamic-H/W detector,
a dynamic-W Inception recogniser); ``python -m modelzoo.build DIR [--only NAME ...]``
writes them.
"""
