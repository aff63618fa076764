"""Ember's data preparation: ingest, clean, filter, deduplicate, train a tokenizer, pack."""
