"""Prompt writing: requests, LLM backends, parsing and near-duplicate filtering."""
