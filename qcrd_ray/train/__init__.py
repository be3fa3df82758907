"""Student training on Ray Train: ``loop`` (what each worker runs), ``trainer`` (the TorchTrainer shell,
``run_training``), ``checkpoint`` (what a round checkpoint holds)."""
