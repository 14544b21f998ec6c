"""The model side: the family table, the meta skeleton, the block streamer, MoE experts, and structural shrinking of blocks and configs."""
