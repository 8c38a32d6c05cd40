"""Execution: compile a graph to a slot-indexed plan and run it."""
