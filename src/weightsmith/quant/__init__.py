"""Quantized weight storage for fine-tuning and inference.

`nf4`: QLoRA's 4-bit NormalFloat weights and the `NF4Linear` module that
dequantizes them per matmul. Not here: LoRA adapters (weightsmith.lora) or file
formats (GGUF quant types are read by weightsmith.checkpoint).
"""
