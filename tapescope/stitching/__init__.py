"""Stitching: flat-field, pairwise registration and the global position solve.

Usable without the rest of tapescope: imports no hardware and no Qt.
"""
