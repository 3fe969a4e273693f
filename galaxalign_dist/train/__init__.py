"""Model, loss and training: the tri-modal CLIP, the gathered contrastive loss, DeepSpeed engine, train loop, checkpoints, export."""
