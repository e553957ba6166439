"""Corpora: reading text, training the tokenizer, token shards and their manifest (python -m data)."""
