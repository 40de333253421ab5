"""ONNX Runtime training: artifacts built once where PyTorch is (``build``), and what a
torch-free device needs to read and train them (``artifacts``, ``optim``). Importing this
package imports neither torch nor onnxruntime."""
