"""seqserve.server"""
