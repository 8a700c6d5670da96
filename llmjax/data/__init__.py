"""Data: tokenizers, document sources, packed token sequences and grain iterators."""
