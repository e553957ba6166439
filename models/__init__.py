"""Causal language models behind one interface: this project's Transformer and Hugging Face folders."""
