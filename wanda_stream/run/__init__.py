"""One pruning run: its configuration, calibration data, sizing, ranks, the block loop, progress and the model card."""
