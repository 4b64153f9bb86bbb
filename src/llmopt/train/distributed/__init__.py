"""Distributed training on torch.distributed: DDP, FSDP2, HSDP, tensor + sequence parallel, pipeline
parallel, their 2-D and 3-D meshes, DCP checkpoints and communication accounting."""
