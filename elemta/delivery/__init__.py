"""Outbound delivery: what happens to a spooled message after the 250."""
