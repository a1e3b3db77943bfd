"""Batch scoring of whole archives into the scores Delta table: the Ray Data pipeline, the writer, one run."""
