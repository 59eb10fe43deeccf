"""Verifiable rewards: answer extraction, math-verify grading, and the process pool that owns timeouts."""
