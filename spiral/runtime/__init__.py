"""Process runtime: service options, a run's config, guarded loops, metrics, checkpoints, TensorBoard, seeding, the learners' device."""
