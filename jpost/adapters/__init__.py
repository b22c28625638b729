"""LoRA / QLoRA as a params transform: `lora` (adapters, merge), `quant` (int8 / NF4 base),
`peft` (PEFT export / import), `hook` (what the decoder's projections call).

Nothing is imported here: `jpost.models.decoder` imports `hook`, and `lora` imports
`jpost.models`, so an eager import would be circular.
"""
