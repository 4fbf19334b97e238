"""What the swarm trains: model, tokenizer, data pipeline, optimizer and schedule, embedded corpus."""
