"""Checkpoints: atomic step directories and resume, the layout-independent state, run-directory safety."""
