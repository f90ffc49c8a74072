"""The bottom floor: storage, the config engine, manifests and records, the shard sample format.

Imports nothing of ours and nothing heavy (no torch, ray, mlflow, deepspeed, webdataset), so every
process, a CPU-only Ray shard worker too, can use it (docs/architecture.md#layers)."""
