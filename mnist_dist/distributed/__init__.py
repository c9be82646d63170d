"""What several processes and nodes need: the one Accelerator (runtime) and a bounded start-up (rendezvous)."""
