"""The model layer: rotary embedding, hybrid global/local attention, transformers.

    from metalearner.model import ModelConfig, build_model, preset
    model = build_model(preset("tiny", window=16))
    model.apply_knobs(Knobs(rope_base=20_000.0, window=32))

`hf_model` puts a Hugging Face causal LM behind the same interface (`HFCausalLM`;
transformers is imported only when one is built); `hf_config` resolves and checks the
``model.hf`` section that names it (`resolve_hf_config`).

Imports torch and `metalearner.knobs` only; must not import ray, mlflow or anything above
the model layer.
"""

from metalearner.model.attention import (
    CrossAttention,
    HybridAttention,
    blocked_local_attention,
    local_block_size,
)
from metalearner.model.hf_config import FAMILIES, HFModelConfig, HFModelError, resolve_hf_config
from metalearner.model.hf_model import HFCausalLM
from metalearner.model.rope import RotaryEmbedding, rope_tables
from metalearner.model.transformer import (
    PRESETS,
    Block,
    DecoderLM,
    EncoderDecoder,
    ModelConfig,
    build_model,
    preset,
    small,
    tiny,
)

__all__ = [
    "PRESETS",
    "Block",
    "CrossAttention",
    "DecoderLM",
    "EncoderDecoder",
    "FAMILIES",
    "HFCausalLM",
    "HFModelConfig",
    "HFModelError",
    "HybridAttention",
    "ModelConfig",
    "RotaryEmbedding",
    "blocked_local_attention",
    "build_model",
    "local_block_size",
    "preset",
    "resolve_hf_config",
    "rope_tables",
    "small",
    "tiny",
]
