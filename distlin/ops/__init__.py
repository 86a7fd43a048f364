from distlin.ops.linear_attention import LinearAttentionState, apply_state, feature_map, linear_attention, partial_state

__all__ = ["LinearAttentionState", "apply_state", "feature_map", "linear_attention", "partial_state"]
