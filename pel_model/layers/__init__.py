"""Building blocks of the PEL network, one idea per module."""
from .channel_attention import ChannelAttention
from .dct import FrequencyInput, SlidingDCT, dct_matrix, rgb_to_ycbcr
from .median import median3x3
from .mutual_enhancement import MutualEnhancement
from .noise_enhancement import NoiseEnhancement

__all__ = ["ChannelAttention", "FrequencyInput", "MutualEnhancement", "NoiseEnhancement",
           "SlidingDCT", "dct_matrix", "median3x3", "rgb_to_ycbcr"]
