"""Process runtime: service options, guarded loops, metrics, checkpoints, TensorBoard, seeding."""
