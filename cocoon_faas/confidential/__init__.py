"""confidential"""
