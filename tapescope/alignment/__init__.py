"""Section-to-section alignment: a pair's coarse and elastic alignment (`align`, `flow`), the
stack-wide solve (`zsolve`, `sparse_solve`) and the offline `tapescope align` (`stack`).

Rendering, transforms and the volume stay in `montage`; this package reads and writes
through them.
"""
