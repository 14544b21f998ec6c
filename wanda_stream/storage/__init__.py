"""Bytes on disk: checkpoints read lazily and written atomically, quantized formats, hidden-state streams, run state, hub snapshots."""
