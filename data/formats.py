"""One import for the storage formats: writers, the format-detecting reader and torch access.

See `data.writers` (webdataset shards, HF `save_to_disk`), `data.readers` (`open_samples`) and
`data.torch_dataset` (`ImageTextDataset`, `load_images_tensor`) for the details.
"""

from data.readers import expand_urls, open_samples, open_source
from data.torch_dataset import ImageTextDataset, load_images_tensor
from data.writers import encode_png, read_dataset_info, write_hf, write_webdataset

__all__ = [
    "ImageTextDataset",
    "encode_png",
    "expand_urls",
    "load_images_tensor",
    "open_samples",
    "open_source",
    "read_dataset_info",
    "write_hf",
    "write_webdataset",
]
