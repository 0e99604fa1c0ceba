"""DeepSpeed and Hugging Face integration: ``initialize``, the mpu, HF attention, batch sharding, the loss.

Submodules are imported on use so that ``import ds_longctx`` stays free of deepspeed/transformers.
"""
