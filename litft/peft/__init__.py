"""Parameter-efficient methods applied to the one GPT: they only decide which modules change and which
parameters train. bitsandbytes is imported lazily, when a quantization function runs."""

from litft.peft.adapter import (
    AdapterArgs,
    AdapterPrompt,
    adapter_state_dict,
    apply_adapter,
    load_adapter,
    load_adapter_state_dict,
    save_adapter,
)
from litft.peft.lora import (
    LoRAArgs,
    LoRALinear,
    apply_lora,
    check_trainable,
    count_parameters,
    load_lora,
    load_lora_state_dict,
    lora_name_to_peft,
    lora_state_dict,
    merge_lora,
    peft_name_to_lora,
    save_lora,
)
from litft.peft.prompt import (
    PromptTuningArgs,
    VirtualPrompt,
    apply_prompt_tuning,
    load_prompt,
    load_prompt_state_dict,
    prompt_state_dict,
    save_prompt,
)
from litft.peft.quantize import QUANTIZE_MODES, dequantize_model, dequantize_weight, quantize_model

__all__ = [
    "AdapterArgs", "AdapterPrompt", "adapter_state_dict", "apply_adapter", "load_adapter", "load_adapter_state_dict",
    "save_adapter", "LoRAArgs", "LoRALinear", "apply_lora", "check_trainable", "count_parameters", "load_lora",
    "load_lora_state_dict", "lora_name_to_peft", "lora_state_dict", "merge_lora", "peft_name_to_lora", "save_lora",
    "QUANTIZE_MODES", "dequantize_model", "dequantize_weight", "quantize_model", "PromptTuningArgs", "VirtualPrompt",
    "apply_prompt_tuning", "load_prompt", "load_prompt_state_dict", "prompt_state_dict", "save_prompt",
]
