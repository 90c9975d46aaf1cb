"""Acquisition: the plan, the engine that runs it, and the run store."""
