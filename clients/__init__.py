"""seqserve.clients"""
