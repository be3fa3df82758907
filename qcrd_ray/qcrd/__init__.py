"""The QCRD method: losses (Eq. 2-8), the quality discriminator, the training step, snapshots and negatives."""
