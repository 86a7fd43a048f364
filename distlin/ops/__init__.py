"""Pure tensor ops: linear and softmax attention, GroupNorm moments, halo arithmetic, index-safe kernels."""
