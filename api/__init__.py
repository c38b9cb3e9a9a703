"""Latch's control API: devices, commands and their outcomes."""
