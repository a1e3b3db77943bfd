"""Batch scoring of whole archives to Parquet: the Ray Data pipeline, the writer, the ledger, one run."""
