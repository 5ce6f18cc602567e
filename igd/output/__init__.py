"""Answers and what is made of them: the table of facts, result files, the safe reader, pictures, provenance."""
