"""LinFusion attention layers and their checkpoint container."""

from distlin.linfusion.attention import LinFusionAttention, LinFusionAttnProcessor
from distlin.linfusion.model import LinFusion, self_attention_layers

__all__ = ["LinFusion", "LinFusionAttention", "LinFusionAttnProcessor", "self_attention_layers"]
