"""Layer-by-layer calibration machinery shared by the methods: the training step and the saved artifacts."""
