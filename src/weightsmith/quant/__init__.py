"""Quantized weight storage for fine-tuning and inference.

`nf4`: QLoRA's 4-bit NormalFloat weights and the `NF4Linear` module that
dequantizes them per matmul. `weight_only`: int8 (per channel) and int4
(group-wise) inference layers; `checkpoint`: saving and loading them. Not here: LoRA adapters (weightsmith.lora) or file
formats (GGUF quant types are read by weightsmith.checkpoint).
"""
