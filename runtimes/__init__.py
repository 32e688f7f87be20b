"""What both daemons execute: onnxruntime sessions over whole models and sub-graphs."""
