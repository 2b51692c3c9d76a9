"""Benchmarks of tunelab against its peers (peft + transformers Trainer, TRL): see bench/README.md."""
