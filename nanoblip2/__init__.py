"""nanoblip2: a minimal, readable BLIP-2 in PyTorch."""
from .stage1 import Blip2Stage1
from .stage2 import Blip2
from .data import ImageError, load_image
from .load import CheckpointError
from .tokenizer import load_bert_tokenizer
