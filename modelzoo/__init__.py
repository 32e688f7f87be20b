"""Seeded, real ONNX models built locally so tests and benchmarks never download weights."""
