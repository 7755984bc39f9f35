"""The EVA-CLIP repository's `eva_clip.constants`: the OpenAI CLIP normalization its models use."""
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

__all__ = ['OPENAI_DATASET_MEAN', 'OPENAI_DATASET_STD']
