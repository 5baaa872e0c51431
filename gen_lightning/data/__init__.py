"""Data: the shared ShardDataModule (import it from gen_lightning.data.datamodule) and the shard writers.

Kept import-free so that `gen-lightning shards ...` does not pay for importing Lightning.
"""
