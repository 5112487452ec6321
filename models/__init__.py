"""seqserve.models"""
