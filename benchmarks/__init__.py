"""Benchmarks: seqserve beside PyTorch, sentence-transformers, CTranslate2 and transformers, in one run each."""
