"""Latch's wire contract: the topic scheme and the message formats.

This package is imported by the broker's ACL, the API, the simulator and the
MicroPython firmware, so it is written in the subset of Python both run:
plain functions and plain dicts, no dataclasses, no typing-only imports.
"""
