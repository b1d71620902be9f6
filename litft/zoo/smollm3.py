"""SmolLM3 (``SmolLM3ForCausalLM``, 3B): the Llama layout with NoPE layers, layers that apply no RoPE
(``no_rope_layers``; by default every ``no_rope_layer_interval``-th layer)."""

from __future__ import annotations

from litft.config import Config
from litft.zoo.base import Family, llama_rules


def _read_smollm3(hf: dict, fields: dict) -> None:
    n_layer = int(hf["num_hidden_layers"])
    flags = hf.get("no_rope_layers")  # 1: the layer applies RoPE, 0: it does not (transformers' convention)
    if flags is None:
        interval = int(hf["no_rope_layer_interval"])
        if interval < 1:
            raise ValueError(f"config.json: no_rope_layer_interval must be >= 1, got {interval}")
        flags = [int((i + 1) % interval != 0) for i in range(n_layer)]
    if len(flags) != n_layer or any(f not in (0, 1) for f in flags):
        raise ValueError(f"config.json: no_rope_layers must hold {n_layer} flags of 0 or 1 (one per layer), "
                         f"got {flags}")
    fields["nope_layers"] = [i for i, f in enumerate(flags) if not f]
    # transformers slides only when use_sliding_window is set, on the layers layer_types marks as sliding
    if not hf.get("use_sliding_window"):
        if any(t == "sliding_attention" for t in hf.get("layer_types") or []):
            raise ValueError("config.json: layer_types has sliding_attention layers but use_sliding_window is false; "
                             "litft does not guess which one holds")
        fields.pop("sliding_window", None)
        fields.pop("layer_types", None)
    elif not hf.get("layer_types") and fields.get("sliding_window"):
        fields["layer_types"] = ["full" if f else "sliding" for f in flags]


def _write_smollm3(config: Config, hf: dict) -> None:
    nope = set(config.nope_layers)
    hf["no_rope_layers"] = [0 if i in nope else 1 for i in range(config.n_layer)]
    hf["use_sliding_window"] = "sliding" in config.layer_types
    hf["layer_types"] = [f"{t}_attention" for t in config.layer_types]


def _nope_every(n_layer: int, interval: int) -> list[int]:
    return [i for i in range(n_layer) if (i + 1) % interval == 0]


_S3 = dict(hf_model_type="smollm3", n_layer=36, n_embd=2048, n_head=16, n_query_groups=4, intermediate_size=11008,
           vocab_size=128256, block_size=65536, norm_eps=1e-6, rope_theta=5000000.0, tie_embeddings=True,
           nope_layers=_nope_every(36, 4), bos_token_id=128000, pad_token_id=128004)
CONFIGS = [
    Config(name="SmolLM3-3B", hf_id="HuggingFaceTB/SmolLM3-3B", eos_token_id=128012, **_S3),
    Config(name="SmolLM3-3B-Base", hf_id="HuggingFaceTB/SmolLM3-3B-Base", eos_token_id=128001, **_S3),
]

SMOLLM3 = Family(
    model_type="smollm3",
    architecture="SmolLM3ForCausalLM",
    weight_rules=llama_rules(),
    configs=CONFIGS,
    # transformers' SmolLM3Config defaults, for keys a config.json leaves out
    hf_defaults={"rms_norm_eps": 1e-6, "tie_word_embeddings": True, "max_position_embeddings": 32768,
                 "hidden_act": "silu", "rope_theta": 2000000.0, "use_sliding_window": False, "sliding_window": None,
                 "no_rope_layer_interval": 4},
    read_hf=_read_smollm3,
    write_hf=_write_smollm3,
    hf_keys=("no_rope_layers", "no_rope_layer_interval"),
)

FAMILIES = [SMOLLM3]
