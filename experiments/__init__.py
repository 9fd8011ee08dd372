"""Experiments for lorax: a real pretrained encoder (MiniLM) and real human-labelled data."""
