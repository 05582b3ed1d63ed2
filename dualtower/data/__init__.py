"""Data pipeline: images -> tiles, chats -> tokens and labels, documents -> packed varlen batches.

Sources (synthetic, The Cauldron, local parquet/arrow) -> `document_from_sample` -> packing -> `collate` ->
dualtower.batch.PackedBatch, driven by a resumable, sharded `Loader` (`build_loader`).
"""

from dualtower.data.chat import encode_conversation, encode_prompt
from dualtower.data.collate import collate
from dualtower.data.config import DataConfig, SyntheticConfig
from dualtower.data.counters import LoaderStats
from dualtower.data.document import (
    Document,
    PreparedDocument,
    SampleError,
    document_from_prompt,
    document_from_sample,
    prepare_document,
)
from dualtower.data.images import ImageLoadError, ImageProcessor, ProcessedImage, image_string, load_image
from dualtower.data.loader import Loader, build_loader
from dualtower.data.synthetic import SyntheticSource, heldout_examples

__all__ = [
    "DataConfig",
    "Document",
    "ImageLoadError",
    "ImageProcessor",
    "Loader",
    "LoaderStats",
    "PreparedDocument",
    "ProcessedImage",
    "SampleError",
    "SyntheticConfig",
    "SyntheticSource",
    "build_loader",
    "collate",
    "document_from_prompt",
    "document_from_sample",
    "encode_conversation",
    "encode_prompt",
    "heldout_examples",
    "image_string",
    "load_image",
    "prepare_document",
]
