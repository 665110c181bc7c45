"""Hugging Face integrations: a transformers attention entry and batch sharding for accelerate."""
