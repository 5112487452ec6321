"""seqserve.protos"""
