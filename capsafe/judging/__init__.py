"""Judging answers, as the evaluation stage runs it and the report reads it back: the rule judges and their
labels (``rules``) and the LLM judges' published prompt and verdict formats (``formats``). Pure."""
