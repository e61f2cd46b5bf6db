"""Translation data: parallel corpora -> cached BPE ids -> batches bounded by token count.

``prepare_data(cfg)`` reads the corpus that ``cfg.source`` names, one split at a time:

- ``multi30k``: the Multi30K Task 1 files ``{split}.{lang}.gz`` in ``cfg.root`` (by default
  ``$MULTI30K_DIR``), downloaded into ``cfg.cache_dir/multi30k`` when that is not set;
- ``parallel_files``: ``cfg.root / cfg.file_pattern`` per split and language, plain or .gz;
- ``hub``: a Hugging Face dataset (a Hub id or a local folder) with a ``translation`` column,
  read through ``datasets``, streamed when ``cfg.streaming``.

It trains the BPE tokenizer on the training split (``transformer.tokenizer``), encodes every
split, drops empty pairs and over-long training pairs, and caches both under
``cfg.cache_dir/<key>/``, where the key hashes the files' paths, sizes and modification times
(or the Hub id) and the options, and each split's folder also the tokenizer that encoded
it: a second run loads the tokenizer and ids in well under a second. Ids are stored flat,
as in fairseq's indexed datasets, and memory-mapped.

Sequences follow fairseq: source = ids + ``</s>``; target input = ``<s>`` + ids; target
output = ids + ``</s>``. ``TokenBatchSampler`` groups pairs of similar length into batches of
at most ``max_tokens`` padded tokens per side; ``collate`` pads them into a ``Batch``.

The package, one concern a module (``from transformer.data import ...`` gives every public
name):

- ``text``: ``DataError``, ``read_lines``, ``read_parallel_lines``;
- ``corpora``: ``FileCorpus``, ``HubCorpus``, ``open_corpus``, the Multi30k download;
- ``storage``: ``Ragged`` (flat, memory-mapped rows), ``SplitStats``, ``EncodedSplit``,
  ``TranslationData``;
- ``mixing``: several training corpora with weights and tags (``data.extra_train``);
- ``multilingual``: several directions with target-language tags (``data.pairs``);
- ``prepare``: ``prepare_data``, ``tokenizer_hash``, the cache and the split encoder;
- ``sampler``: ``TokenBatchSampler``;
- ``batches``: ``Batch``, ``collate``, ``iterate_batches``.
"""

from transformer.data.batches import Batch, collate, iterate_batches
from transformer.data.corpora import (
    CHUNK_PAIRS,
    MULTI30K_PATTERN,
    MULTI30K_URL,
    SOURCES,
    FileCorpus,
    HubCorpus,
    download,
    open_corpus,
)
from transformer.data.prepare import CACHE_VERSION, prepare_data, tokenizer_hash
from transformer.data.sampler import TokenBatchSampler
from transformer.data.storage import (
    FIELDS,
    EncodedSplit,
    Ragged,
    SplitStats,
    TranslationData,
    dropped_text,
)
from transformer.data.text import DataError, read_lines, read_parallel_lines

__all__ = [
    "CACHE_VERSION", "CHUNK_PAIRS", "FIELDS", "MULTI30K_PATTERN", "MULTI30K_URL", "SOURCES",
    "Batch", "DataError", "EncodedSplit", "FileCorpus", "HubCorpus", "Ragged", "SplitStats",
    "TokenBatchSampler", "TranslationData", "collate", "download", "dropped_text",
    "iterate_batches", "open_corpus", "prepare_data", "read_lines", "read_parallel_lines",
    "tokenizer_hash",
]
