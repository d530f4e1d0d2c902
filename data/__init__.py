"""Tokenizer, embedded corpus and token-file preparation for pretraining."""
