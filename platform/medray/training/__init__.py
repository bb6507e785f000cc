"""Ray Train fine-tuning: the backbone table, losses, freezing, augmentation on the device, the recipe,
checkpoints, experiment tracking and the trainer itself."""
