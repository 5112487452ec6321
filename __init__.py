"""seqserve: serve trained sequence models (RNN, Transformer, BERT) over gRPC with onnxruntime."""

__version__ = "0.1.0"
