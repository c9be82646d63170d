"""Datasets: fetched and verified (sources), read (idx), sharded into batches (loaders), augmented."""
