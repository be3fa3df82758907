"""The QCRD method, torch only: losses (Eq. 2-8), the quality discriminator, the training step, the targets (the
Ray actors that hold snapshots and sample negatives are in qcrd_ray/actors/)."""
