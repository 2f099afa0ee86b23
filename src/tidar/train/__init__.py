"""Training: corpora and shards, self-generated data, objectives, the trainer and the shipped-model export."""
